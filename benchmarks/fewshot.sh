#!/usr/bin/env bash
# The few-shot rows of BENCHMARKS.md (issue 9). Needs ../shared/data. Pass 1: K = 8, three
# support draws, every method, every set left out in turn; pass 2: K = 2 and 4, two draws,
# RegAD, its ablation and PaDiM; pass 3: 100 channels; pass 4: DifferNet, K = 8, one draw;
# pass 5: PaDiM with Ledoit-Wolf shrinkage; pass 6: RegAD with a registration trained on
# images turned by up to 20 degrees (`regad train --pose-jitter 20`), on magnetic_tile and
# elpv_poly (where RegAD trails PatchCore the most at K = 8); pass 7: RegAD with the backbone
# trained too (`regad train --backbone-lr`, the paper's way), on the same two sets; pass 8:
# the registrations retrained with the current code, RegAD and regpatchcore on them.
# Passes 1-3 take about 2.5 hours on 2 cores; pass 4 about an hour more (DifferNet's maps need a
# backward pass per image).
# Resumable: finished rows in the JSONL are skipped, trained registrations are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/fewshot.jsonl}
REG=${REG:-/tmp/defectlens-fewshot-registrations}
COMMON=(--out "$OUT" --registrations "$REG" --reg-epochs 10 --reg-minutes 30)
DATA=../shared/data
for c in kolektorsdd deeppcb magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c "${COMMON[@]}" --shots 8 \
    --draws 3 --methods padim_full regad regad_identity regad_default padim patchcore
done
for c in kolektorsdd magnetic_tile deeppcb elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c "${COMMON[@]}" --shots 2 4 \
    --draws 2 --methods regad regad_identity padim
done
# Pass 3: RegAD and PaDiM keeping 100 random channels (the speed/accuracy trade-off).
for c in kolektorsdd magnetic_tile elpv_poly deeppcb; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c "${COMMON[@]}" --shots 8 \
    --draws 3 --methods regad@c100 padim@c100
done
# Pass 4: DifferNet on the same first support draw.
for c in kolektorsdd deeppcb magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$REG" \
    --out benchmarks/results/fewshot_differnet.jsonl --shots 8 --draws 1 --methods differnet
done
# Pass 5: PaDiM with Ledoit-Wolf shrinkage on the same supports (about 15 minutes).
for c in kolektorsdd magnetic_tile elpv_poly deeppcb; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$REG" \
    --out benchmarks/results/fewshot_lw.jsonl --shots 8 --draws 3 --methods padim@lw
done
# Pass 6: pose-jittered registration training (about 25 minutes: two registrations).
for c in magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c "${COMMON[@]}" \
    --out benchmarks/results/fewshot_jitter.jsonl --shots 8 --draws 3 --methods regad@j20
done
# Pass 7: the backbone trained with the transformers (about 55 minutes: three registrations of
# 15-17 minutes each, at 4x the frozen backbone's time per epoch).
for c in magnetic_tile elpv_poly; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c "${COMMON[@]}" \
    --out benchmarks/results/fewshot_backbone.jsonl --shots 8 --draws 3 --methods regad@b0.001
done
.venv/bin/python benchmarks/fewshot.py $DATA --categories magnetic_tile "${COMMON[@]}" \
  --out benchmarks/results/fewshot_backbone.jsonl --shots 8 --draws 3 --methods regad@b0.0001
# Pass 8: every registration retrained with the current code into a fresh folder (about 15
# minutes a set), RegAD and PatchCore-on-registered-features on it; kolektorsdd also with a
# second registration seed.
FRESH=${FRESH:-/tmp/defectlens-fewshot-registrations-rerun}
for c in elpv_poly magnetic_tile kolektorsdd deeppcb; do
  methods=(regad)
  [[ $c != deeppcb ]] && methods+=(regpatchcore)
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$FRESH" \
    --reg-epochs 10 --reg-minutes 25 --out benchmarks/results/fewshot_rerun.jsonl --shots 8 \
    --draws 3 --methods "${methods[@]}"
done
.venv/bin/python benchmarks/fewshot.py $DATA --categories kolektorsdd --registrations "$FRESH" \
  --reg-epochs 10 --reg-minutes 25 --reg-seed 1 --out benchmarks/results/fewshot_rerun_seed1.jsonl \
  --shots 8 --draws 3 --methods regad
# Pass 9: 100 channels (RegAD's default since 2026-12-07) against all 176, on the same retrained
# registrations and on the shipped one (fast: no training).
for c in kolektorsdd magnetic_tile elpv_poly deeppcb; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$FRESH" \
    --reg-epochs 10 --reg-minutes 25 --out benchmarks/results/fewshot_rerun.jsonl --shots 8 \
    --draws 3 --methods regad@c100 regad_default regad_default@c100
done
# Pass 10 (2026-12-08): a second registration seed on the other three sets, so that RegAD's
# numbers carry the spread of the registration run as well as of the support draws; RegAD's
# default 100 channels and all 176 on each.
for c in magnetic_tile elpv_poly deeppcb kolektorsdd; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$FRESH" \
    --reg-epochs 10 --reg-minutes 25 --reg-seed 1 --out benchmarks/results/fewshot_rerun_seed1.jsonl \
    --shots 8 --draws 3 --methods regad regad@c100
done
# Pass 11 (2026-12-08): K = 16, RegAD (its default 100 channels, the seed-1 registrations of
# pass 10) against PaDiM and PatchCore on the same supports.
for c in kolektorsdd magnetic_tile elpv_poly deeppcb; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$FRESH" \
    --reg-epochs 10 --reg-minutes 25 --reg-seed 1 --out benchmarks/results/fewshot_k16.jsonl \
    --shots 16 --draws 3 --methods regad@c100 padim patchcore
done
# Pass 12 (2026-12-08): a larger pool: the three other sets plus the 15 generated pose
# categories of the shipped registration (seed 1, to compare with pass 10's seed-1 rows).
for c in kolektorsdd magnetic_tile elpv_poly deeppcb; do
  .venv/bin/python benchmarks/fewshot.py $DATA --categories $c --registrations "$FRESH" \
    --reg-epochs 10 --reg-minutes 25 --reg-seed 1 --out benchmarks/results/fewshot_pose_pool.jsonl \
    --shots 8 --draws 3 --methods regad@c100@pose
done
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_backbone.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_rerun.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_jitter.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_lw.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_differnet.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_rerun_seed1.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_k16.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out benchmarks/results/fewshot_pose_pool.jsonl
.venv/bin/python benchmarks/fewshot.py x --summary --out "$OUT"
# RegAD's speed next to PaDiM's (fit with K = 8, scoring), in one process:
.venv/bin/python benchmarks/fewshot_speed.py $DATA/magnetic_tile --registration "$REG/reg-magnetic_tile"
.venv/bin/python benchmarks/fewshot_speed.py $DATA/magnetic_tile --registration "$REG/reg-magnetic_tile" \
  --n-channels 100
# The same with the shipped registration, both channel counts (the 2026-12-07 default change):
SHIPPED=src/defectlens/weights/registration-efficientnet_lite0-256
for n in "--n-channels 100" ""; do
  # shellcheck disable=SC2086
  .venv/bin/python benchmarks/fewshot_speed.py $DATA/magnetic_tile --registration "$SHIPPED" $n
done
