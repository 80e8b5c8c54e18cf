#!/usr/bin/env bash
# One prepared visit to a lent GPU machine (H100/H200), run from the repo root there after
# ../shared/tools/device-install.sh has installed DALI, the carried wheels and tcsmae into
# /tmp/site. Writes everything under $OUT: machine facts, the GPU tests' log, the benchmark.
#   usage: bash bench/gpu_visit.sh tests|bench|all
# Python runs from /tmp: in the repo root the source folder tcsmae/ (which lacks the
# pipelines/ and convert/ subpackages) would shadow the installed package.
set -u
what=${1:-all}
REPO=$(pwd)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the real CT samples travel in .devcarry/shared-data; tests look for <repo>/../shared/data
if [ -d .devcarry/shared-data ] && [ ! -f ../shared/data/README.md ]; then
  mkdir -p ../shared/data && cp -r .devcarry/shared-data/. ../shared/data/
fi
cd /tmp
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9_-')
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; echo "cpus $(nproc)";
  python3 -c "import torch, nvidia.dali as d, cupy, zarr, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'dali', d.__version__, 'cupy', cupy.__version__, 'zarr', zarr.__version__, 'smp', smp.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout=200 "$REPO/tests" 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 400 python3 -m tcsmae.cli bench --device cuda --out "$OUT/$gpu-$(date +%F).json" 2>&1 | tee "$OUT/bench.log" | tail -n 60
fi
