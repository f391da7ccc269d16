#!/usr/bin/env bash
# Runs the worker and protocol tests and the protocol benchmark on a CUDA machine (the lent device),
# with the wheels in .whl/ (see docs/DEVELOPING.md). Output goes to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/worker tests/protocol tests/cache -q -p no:cacheprovider --worker-device cuda:0 "$@" 2>&1 | tee "$OUT/pytest-cuda.txt"
status=${PIPESTATUS[0]}
python3 benchmarks/protocol_roundtrip.py --device cuda:0 --requests 5000 --out "$OUT/protocol_roundtrip-cuda.txt"
exit "$status"
