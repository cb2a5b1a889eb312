#!/usr/bin/env bash
# Issue 22's one run on a lent GPU (the device tool's machine: no network, Python 3.12, torch 2.11 + CUDA,
# transformers 5.17, no bitsandbytes or pydantic). Two steps:
#
#   bash bench/gpu_lent.sh wheels   # here: the packages the app needs there, as wheels in .whl/ (~57 MiB, git-ignored)
#   bash bench/gpu_lent.sh run      # there, as the device tool's command, carrying .whl (timeout_s 480):
#                                   # a tiny smoke run, then `bench/gpu.py --quick` (<= 330 s), logs in $OUT
#
# Record what it prints in BENCHMARKS.md with the device line and this exact command.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="transformers==5.24.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 bitsandbytes==0.50.2"
case "${1:-}" in
  wheels)
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
    du -sh .whl
    ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    out="${OUT:-/tmp}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt" || true
    timeout 90 python3 bench/gpu.py --tiny --quick 2>&1 | tee "$out/gpu-tiny.log" || true
    python3 bench/gpu.py --quick 2>&1 | tee "$out/gpu-quick.log"
    ;;
  *)
    echo "usage: bash bench/gpu_lent.sh wheels|run" >&2
    exit 2
    ;;
esac
