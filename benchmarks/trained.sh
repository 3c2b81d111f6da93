#!/usr/bin/env bash
# The rows of BENCHMARKS.md for the methods that train a network (issue 10): MemAE, MNAD,
# GradCon and OGNet with their defaults on both development sets, on pixels (the papers'
# setting), then on the backbone's standardised stride-8/16 maps (space=features). Up to 3
# hours on 2 cores with the default 10-minute budgets; run nothing else meanwhile (the budgets
# are wall-clock: a busy machine trains fewer epochs).
#   SPACES="features" EXTRA="--param max_minutes=4" bash benchmarks/trained.sh
# reruns only the feature rows, with the budget BENCHMARKS.md's feature rows had.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-benchmarks/results/trained.jsonl}
SPACES=${SPACES:-pixels features}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$(dirname "$OUT")"
for space in $SPACES; do
  for d in magnetic_tile kolektorsdd; do
    for m in memae mnad gradcon ognet; do
      .venv/bin/python benchmarks/trained.py "$DATA/$d" --method "$m" \
        --param "space=\"$space\"" "${EXTRA[@]}" | tee -a "$OUT"
    done
  done
done
