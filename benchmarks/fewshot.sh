#!/usr/bin/env bash
# The few-shot rows of BENCHMARKS.md (issue 9). Needs ../shared/data; about 2 hours on 2 cores.
# Pass 1: K = 8, three support draws, every method; pass 2: K = 2 and 4, two draws, the
# registration ablation and PaDiM. Resumable: finished rows in the JSONL are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/fewshot.jsonl}
REG=${REG:-/tmp/defectlens-fewshot-registrations}
DATA=../shared/data
for c in kolektorsdd deeppcb magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --out "$OUT" --registrations "$REG" \
    --reg-minutes 6 --shots 8 --draws 3 \
    --methods padim_full regad regad_identity regad_default padim patchcore
done
for c in kolektorsdd deeppcb magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --out "$OUT" --registrations "$REG" \
    --reg-minutes 6 --shots 2 4 --draws 2 --methods regad regad_identity padim
done
.venv/bin/python benchmarks/fewshot.py --summary --out "$OUT" x
