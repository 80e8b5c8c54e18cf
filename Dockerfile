# tcsmae on an official PyTorch CUDA runtime image.
#   docker build -t tcsmae .
#   docker run --gpus all tcsmae pretrain                       # embedded phantom default
#   docker run --gpus all -v /data:/data tcsmae pretrain --data /data/x.zarr --out /data/run
# Multi-GPU: docker run --gpus all --ipc=host --entrypoint torchrun tcsmae \
#   --nproc-per-node 8 -m tcsmae.cli pretrain --data /data/x.zarr --out /data/run
# The image's CUDA (13.0) must match the DALI and CuPy wheels below and in pyproject.toml.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TCSMAE_CACHE=/cache

WORKDIR /opt/tcsmae
COPY pyproject.toml README.md ./
COPY tcsmae ./tcsmae
COPY pipelines ./pipelines
COPY convert ./convert

# DALI and CuPy for the image's CUDA 13, then the package (keeps the image's torch).
RUN python -m pip install "nvidia-dali-cuda130>=1.50" "cupy-cuda13x>=13" \
 && python -m pip install . \
 && tcsmae --help > /dev/null

VOLUME /cache
ENTRYPOINT ["tcsmae"]
CMD ["--help"]
