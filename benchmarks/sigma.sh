#!/usr/bin/env bash
# The map's smoothing (`fit --sigma`): PaDiM with its defaults fitted twice per set, with the
# default sigma = 4 and with 0 (no smoothing), each evaluated on the whole test split.
# One JSON line per (set, sigma) appended to benchmarks/results/sigma.jsonl.
#   SETS="deeppcb kolektorsdd magnetic_tile" bash benchmarks/sigma.sh   (about 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-benchmarks/results/sigma.jsonl}
WORK=${WORK:-bench-output/sigma}
mkdir -p "$WORK" "$(dirname "$OUT")"
for d in ${SETS:-deeppcb kolektorsdd magnetic_tile}; do
  for s in 4 0; do
    .venv/bin/defectlens fit "$DATA/$d" --sigma $s --out "$WORK/$d-s$s" -q
    rm -rf "$WORK/eval-$d-s$s"  # a rerun's evaluation replaces the last one
    .venv/bin/defectlens evaluate "$WORK/$d-s$s" "$DATA/$d" --out "$WORK/eval-$d-s$s" --no-report -q
    .venv/bin/python -c "import json, sys
m = json.load(open(sys.argv[1]))
keys = ('image_auroc', 'pixel_auroc', 'aupro')
print(json.dumps({'dataset': sys.argv[2], 'method': 'padim', 'sigma': float(sys.argv[3]),
                  **{k: m.get(k) for k in keys}}))" \
      "$WORK/eval-$d-s$s/metrics.json" "$d" "$s" | tee -a "$OUT"
  done
done
