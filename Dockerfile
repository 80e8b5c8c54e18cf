# tcsmae in a container: the `tcsmae` command is the entrypoint.
#   docker build -t tcsmae .
#   docker run --gpus all -v tcsmae-cache:/cache tcsmae pretrain     # embedded phantom default
#   docker run --gpus all -v tcsmae-cache:/cache -v /data:/data tcsmae pretrain --data /data/x.zarr --out /data/run
# Multi-GPU (torchrun replaces tini as PID 1, so give Docker's --init):
#   docker run --gpus all --ipc=host --init --entrypoint torchrun -v /data:/data tcsmae \
#     --nproc-per-node 8 -m tcsmae.cli pretrain --data /data/x.zarr --out /data/run
# See docs/docker.md (building without a registry, the smoke test, GPU hosts).
#
# Base: plain Debian bookworm (slim) and its Python 3.11, not a CUDA image. The CUDA 13
# user-space libraries come from PyPI as the wheels torch, DALI and CuPy depend on
# (nvidia-cublas, nvidia-cudnn-cu13, nvidia-nvjpeg, ...), so one CUDA of one origin serves
# all three and there is no base CUDA to keep in step with DALI's and CuPy's; the host only
# needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit. A CUDA runtime base
# would ship a second copy of those libraries. BASE_IMAGE may be any Debian bookworm root
# (docker/make-base.sh makes one with debootstrap where no registry is reachable).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# The CUDA major of the three GPU stacks: torch's PyPI build, DALI (-cuda130) and CuPy
# (-cuda13x) below must all be built for it (checked after the install).
ARG CUDA_MAJOR=13

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    TCSMAE_CACHE=/cache \
    CUPY_CACHE_DIR=/cache/cupy \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    MPLCONFIGDIR=/cache/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# PEM text of extra root certificates for pip's downloads (a TLS-inspecting proxy); they join
# the system trust store, which pip uses (PIP_CERT). Empty by default.
ARG EXTRA_CA_CERTS=""

# Python 3.11; tini (PID 1: forwards docker stop's SIGTERM to tcsmae, reaps children); gcc
# and Python's headers, with which Triton builds its kernel launchers at run time (torch.compile,
# `pretrain --compile`; ~0.2 GB); a non-root user owning the working folder and the cache
# volume (which any --user may also write: the caches above all live in it).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates tini gcc libc6-dev libpython3-dev \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/extra.crt && update-ca-certificates; \
    fi \
 && python3 -m venv /opt/venv \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash tcsmae \
 && mkdir -p /cache /data \
 && chown tcsmae:tcsmae /cache /data \
 && chmod 1777 /cache

# The GPU stack first, in its own layer (several GB; a code change does not refetch it).
# Pinned to the releases tested together; all three for CUDA ${CUDA_MAJOR}.
RUN pip install torch==2.14.1 torchvision==0.29.1 nvidia-dali-cuda130==2.4.0 cupy-cuda13x==14.2.0 \
 && python -c "import sys, torch; c = torch.version.cuda or 'none'; \
sys.exit(0 if c.split('.')[0] == '${CUDA_MAJOR}' else f'torch {torch.__version__} is built for CUDA {c}, not ${CUDA_MAJOR}')"

# The package (its other dependencies from pyproject.toml), then a check that it runs (as
# root: what that leaves in the cache folder goes, so the volume starts empty and writable).
WORKDIR /opt/tcsmae
COPY pyproject.toml README.md ./
COPY tcsmae ./tcsmae
COPY pipelines ./pipelines
COPY convert ./convert
RUN pip install . \
 && rm -rf build ./*.egg-info \
 && tcsmae --help > /dev/null \
 && find /cache -mindepth 1 -delete

USER tcsmae
WORKDIR /data
# The embedded phantom default (and compiled kernels) are built once per cache volume:
# -v tcsmae-cache:/cache.
VOLUME /cache
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "tcsmae"]
CMD ["--help"]
