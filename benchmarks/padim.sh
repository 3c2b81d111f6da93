#!/usr/bin/env bash
# Reproduces the PaDiM rows of BENCHMARKS.md. Run from the repository root after `make install`.
# Writes bench-output/padim-*.jsonl and prints the predict timings.
set -euo pipefail
DATA=${DATA:-../shared/data}
PY=.venv/bin/python
mkdir -p bench-output
for d in magnetic_tile kolektorsdd; do
  $PY benchmarks/bench.py "$DATA/$d" --method padim
done | tee bench-output/padim-accuracy.jsonl
for n in 100 700; do
  $PY benchmarks/bench.py "$DATA/magnetic_tile" --method padim --fit-only --max-train $n
done | tee bench-output/padim-fit-memory.jsonl
for d in magnetic_tile kolektorsdd; do
  .venv/bin/defectlens fit "$DATA/$d" --method padim --out "bench-output/models/padim-$d" -q
  /usr/bin/time -f "$d predict wall %e s, peak RSS %M KB" \
    .venv/bin/defectlens predict "bench-output/models/padim-$d" "$DATA/$d/test" \
    --out "bench-output/predict-$d" --no-images -q
done 2>&1 | tee bench-output/padim-predict.txt
