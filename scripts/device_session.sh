#!/usr/bin/env bash
# One measurement session on a lent GPU machine (never part of the tests or CI).
#
# The machine has no network: the model (the embedded GGUF, split in two halves that travel in two calls), the data
# (CounterFact, zsRE, the Wikipedia excerpt, MMLU/ARC/TruthfulQA) and two pure-Python wheels (gguf, platformdirs)
# come from .gpu/a and .gpu/b (see scripts/device_prepare.sh). Phases, each under its own time limit, each writing
# its results to $OUT as it goes:
#   1. environment and CUDA checks: the CLI's curvature -> edit -> eval on cuda in bfloat16 (small sizes)
#   2. the curvature of all 30 down-projections (float32 model, statistics in float64), for the grid
#   3. the ablation grid (scripts/grids/gpu_grid.json) on 100 CounterFact + 100 zsRE dev edits, float32
#   4. the recipe chosen by scripts/select_recipe.py (a rule fixed before the grid ran), then the final runs with it
#   4b. reliability against the KL budget ε (scripts/kl_budget_curve.py)
#   5. bench_edit.py on cuda in bfloat16 (step times; whole edits of 100 / 1,000 / 3,000 facts)
set -u
# Sizes and device can be shrunk for a dry run on a CPU machine (DEVICE=cpu PY=.venv/bin/python N=3 ...).
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
N=${N:-100}
N_FINAL=${N_FINAL:-1000}
SIZES=${SIZES:-100,1000,3000}
CURV_SAMPLES=${CURV_SAMPLES:-200}
GRID=${GRID:-scripts/grids/gpu_grid.json}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

source scripts/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"

# 1. CUDA paths through the CLI (bf16 weights, small sizes)
stamp "phase 1: CLI on cuda/bf16"
C=/tmp/cuda-check
timeout ${CHECK_SECONDS:-45} bash -c "
  $PY -m crispedit curvature --model smollm2-135m-instruct --device $DEVICE --dtype bfloat16 \
    --samples 4 --max-length 64 --out $C/cache &&
  $PY -m crispedit edit --model smollm2-135m-instruct --device $DEVICE --dtype bfloat16 \
    --edits '$CF' --limit 2 --epochs 2 --curvature $C/cache --out $C/edit &&
  $PY -m crispedit eval --model $C/edit --base smollm2-135m-instruct --device $DEVICE --dtype bfloat16 \
    --edits '$CF' --limit 2 --heldout-samples 2 --contexts qa,raw --benchmarks none --out $C/report.json &&
  cp $C/report.json '$OUT/cuda_check_report.json'"
stamp "phase 1 rc=$?"

# 2. curvature of every down-projection (for the grid's layer choices)
stamp "phase 2: curvature of 30 layers on cuda"
if [ -n "${CACHE_DIR:-}" ]; then ln -sfn "$CACHE_DIR" /tmp/cache-all; else
timeout ${CACHE_SECONDS:-100} $PY -m crispedit curvature --model smollm2-135m-instruct --device $DEVICE \
  --layers 'model.layers.{0-29}.mlp.down_proj' --samples $CURV_SAMPLES --out /tmp/cache-all; fi
stamp "phase 2 rc=$?"

# 3. the grid
stamp "phase 3: grid"
timeout ${GRID_SECONDS:-190} $PY scripts/wild_ablation.py --device $DEVICE --gen-batch 512 --cache /tmp/cache-all \
  --runs "$GRID" --jsonl --out "$OUT/grid.jsonl" \
  --data "cf=$CF:$N" --data "zsre=$ZSRE:$N"
stamp "phase 3 rc=$?"

# 4. the recipe chosen by the fixed rule, then the final runs (100 CF + 100 zsRE with every method, 1,000 CF)
stamp "phase 4: selection and final runs"
$PY scripts/select_recipe.py "$OUT/grid.jsonl" --out /tmp/chosen.json
$PY scripts/final_runs.py /tmp/chosen.json > /tmp/final.json
timeout ${FINAL_SECONDS:-100} $PY scripts/wild_ablation.py --device $DEVICE --gen-batch 512 --cache /tmp/cache-all \
  --runs /tmp/final.json --jsonl --slim --out "$OUT/final.jsonl" --benchmarks mmlu,arc \
  --data "cf$N_FINAL=$CF:$N_FINAL"
stamp "phase 4 rc=$?"

# 4b. reliability against the KL budget (one edit with the chosen recipe, backed off to each ε)
stamp "phase 4b: KL budget curve"
timeout ${CURVE_SECONDS:-50} $PY scripts/kl_budget_curve.py --device $DEVICE --gen-batch 512 --cache /tmp/cache-all \
  --recipe /tmp/chosen.json --data "cf=$CF:$N" --eps 0.0005,0.001,0.002,0.005,0.01,0.02 --out "$OUT/kl_budget.jsonl"
stamp "phase 4b rc=$?"

# 5. speed on cuda/bf16
stamp "phase 5: bench_edit"
timeout ${BENCH_SECONDS:-55} $PY benchmarks/bench_edit.py --curvature /tmp/cache-all --device $DEVICE --dtype bfloat16 \
  --recipe /tmp/chosen.json --edits "$CF" --sizes $SIZES --out "$OUT/bench_edit_cuda_bf16.json"
stamp "phase 5 rc=$? (end)"
