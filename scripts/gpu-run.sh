#!/usr/bin/env bash
# One lent-GPU call: the worker/protocol/cache tests on cuda:0, gpu_load (warm paths) and formats
# (a trimmed Flux), each under its own time limit; outputs under $OUT. Wheels from .whl/.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' | tee -a "$OUT/gpu.txt"
timeout "${TESTS_S:-170}" python3 -m pytest tests/worker tests/protocol tests/cache -q -x -p no:cacheprovider \
  --worker-device cuda:0 -o timeout=120 2>&1 | tail -40 > "$OUT/pytest-cuda.txt"
timeout "${LOAD_S:-150}" python3 benchmarks/gpu_load.py --skip-cold --repeats 3 --out "$OUT/gpu_load.txt" > "$OUT/gpu_load.log" 2>&1
timeout "${FORMATS_S:-200}" python3 benchmarks/formats.py --blocks 6,12 --forms bf16,fp8,q8_0,q4_k --repeats 2 \
  --steps 3 --out "$OUT/formats.txt" > "$OUT/formats.log" 2>&1
tail -5 "$OUT"/*.txt
