#!/usr/bin/env bash
# The ensemble against its members (issue 15), each fitted by bench.py on the same split of the
# same images (90 % fit, 10 % validation, seed 0) and evaluated on the real test set.
# Run from the repository root after `make install`. Writes bench-output/ensemble.jsonl.
set -euo pipefail
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
mkdir -p bench-output
for d in kolektorsdd magnetic_tile deeppcb elpv_poly; do
  for m in padim patchcore ensemble; do
    $PY benchmarks/bench.py "$DATA/$d" --method "$m" --repeats 1
  done
done | tee bench-output/ensemble.jsonl
