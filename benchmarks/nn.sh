#!/usr/bin/env bash
# Reproduces the SPADE and PatchCore rows of BENCHMARKS.md (run from the repository root).
set -euo pipefail
DATA=${DATA:-../shared/data}
PY=.venv/bin/python
mkdir -p bench-output
for d in kolektorsdd magnetic_tile; do
  $PY benchmarks/bench.py "$DATA/$d" --method patchcore
  $PY benchmarks/bench.py "$DATA/$d" --method patchcore --param coreset_ratio=0.01
  $PY benchmarks/bench.py "$DATA/$d" --method spade
done | tee bench-output/nn-accuracy.jsonl
$PY benchmarks/knn_scaling.py | tee bench-output/knn-scaling.jsonl
