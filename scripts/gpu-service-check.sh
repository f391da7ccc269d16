#!/usr/bin/env bash
# The service on a machine with several GPUs (the lent device): one worker per GPU, one model loaded
# on every GPU from one RAM-cache segment. Needs the wheels in .whl/ (see docs/DEVELOPING.md).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 scripts/two_gpu_service.py --root /tmp/mk-models --out "$OUT/two_gpu_service.json" 2>&1 | grep -v torchvision | tee "$OUT/two_gpu_service.txt"
exit "${PIPESTATUS[0]}"
