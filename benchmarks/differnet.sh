#!/usr/bin/env bash
# Reproduces the DifferNet rows of BENCHMARKS.md (run from the repository root).
# 16 training images (2 of them held out for early stopping and the threshold) and all of them.
set -euo pipefail
DATA=${DATA:-../shared/data}
PY=.venv/bin/python
mkdir -p bench-output
for d in kolektorsdd magnetic_tile; do
  $PY benchmarks/bench.py "$DATA/$d" --method differnet --max-train 16 --repeats 1
  $PY benchmarks/bench.py "$DATA/$d" --method differnet --repeats 1
done | tee bench-output/differnet.jsonl
