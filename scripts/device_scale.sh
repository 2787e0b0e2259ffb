#!/usr/bin/env bash
# The scale session on a lent GPU machine (never part of the tests or CI): after the setup and one curvature cache
# of all 30 down-projections, independent measurements run side by side as separate processes (the GPU is
# launch-bound at this model size, so they barely slow each other; wall times below are therefore upper bounds):
#   1000 CounterFact edits: CrispEdit (defaults), FT lr 1e-3, CrispEdit-Seq in chunks of 100; 800 zsRE: CrispEdit;
#   100 + 100 dev edits: locality anchors, LoRA, Adam-NSCL, the LocBF-FT layer sweep, the closed-form baselines
#   (when crispedit.baselines exists), and reliability against the KL budget.
# Each writes JSON lines to $OUT as it finishes a run. Runs are in scripts/grids/scale.json.
set -u
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
N=${N:-100}
N_BIG=${N_BIG:-1000}
N_ZSRE=${N_ZSRE:-800}
LIMIT=${LIMIT:-420}
mkdir -p "$OUT" /tmp/grids
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
source scripts/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

stamp "curvature of 30 layers"
timeout ${CACHE_SECONDS:-100} $PY -m crispedit curvature --model smollm2-135m-instruct --device $DEVICE \
  --layers 'model.layers.{0-29}.mlp.down_proj' --samples ${CURV_SAMPLES:-200} --out /tmp/cache-all > "$OUT/curvature.log" 2>&1
stamp "curvature rc=$?"; tail -4 "$OUT/curvature.log"

$PY -c "
import json; g = json.load(open('scripts/grids/scale.json'))
for k, v in g.items(): json.dump(v, open(f'/tmp/grids/{k}.json', 'w'))"
run() {  # NAME GRID DATA... : one process
  local name=$1 grid=$2; shift 2
  local data=(); for d in "$@"; do data+=(--data "$d"); done
  timeout $LIMIT $PY scripts/wild_ablation.py --device $DEVICE --gen-batch 512 --cache /tmp/cache-all \
    --runs /tmp/grids/$grid.json --jsonl --slim --out "$OUT/$name.jsonl" "${data[@]}" > "$OUT/$name.log" 2>&1
  echo "[$(( $(date +%s) - T0 )) s] $name rc=$?"
}
stamp "parallel runs"
run cf1000_crispedit crispedit "cf$N_BIG=$CF:$N_BIG" &
run cf1000_ft ft "cf$N_BIG=$CF:$N_BIG" &
run cf1000_seq seq "cf$N_BIG=$CF:$N_BIG" &
run zsre800_crispedit crispedit "zsre$N_ZSRE=$ZSRE:$N_ZSRE" &
run anchors anchors "cf=$CF:$N" "zsre=$ZSRE:$N" &
run methods methods "cf=$CF:$N" "zsre=$ZSRE:$N" &
run locbf locbf "cf=$CF:$N" "zsre=$ZSRE:$N" &
if [ -d crispedit/baselines ]; then run closed closed "cf=$CF:$N" "zsre=$ZSRE:$N" & fi
timeout $LIMIT $PY scripts/kl_budget_curve.py --device $DEVICE --gen-batch 512 --cache /tmp/cache-all \
  --data "cf=$CF:$N" --eps 0.0005,0.001,0.002,0.005,0.01,0.02 --out "$OUT/kl_budget.jsonl" > "$OUT/kl_budget.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 20; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; done
wait
stamp "end"
