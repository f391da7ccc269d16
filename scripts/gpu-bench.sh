#!/usr/bin/env bash
# Runs the GPU benchmarks on the lent CUDA machine with the wheels in .whl/; output under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
for bench in "$@"; do
  python3 "benchmarks/$bench.py" --out "$OUT/$bench.txt" 2>&1 | tee "$OUT/$bench.log"
done
