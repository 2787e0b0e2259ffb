#!/usr/bin/env bash
# Reproduces the README's results section on the embedded SmolLM2-135M-Instruct (CPU, ~1 h on 2 cores).
# Usage: bash scripts/results_counterfact.sh [RUNS_DIR] [CHAIN]   (CHAIN: a, b, c or all; chains may run in parallel)
set -euo pipefail
RUNS=${1:-runs}; CHAIN=${2:-all}
CF=../shared/data/counterfact/counterfact-edit.json
ZSRE=../shared/data/zsre/zsre_mend_800.json
M=smollm2-135m-instruct
CE=${CRISPEDIT:-.venv/bin/crispedit}
mkdir -p "$RUNS"
[ -f "$RUNS/cache/curvature.json" ] || $CE curvature --model $M --samples 128 --max-length 256 --out "$RUNS/cache"
EVAL="--edits $CF --limit 100 --contexts raw,qa --benchmarks mmlu,arc --benchmark-limit 200 --heldout-samples 32 --max-length 256"
one() {  # name method gamma lr [extra edit options]
  [ -f "$RUNS/$1.json" ] && return 0
  # shellcheck disable=SC2086
  [ -f "$RUNS/$1/delta/delta.json" ] || $CE edit --model $M --edits $CF --limit 100 --curvature "$RUNS/cache" --method $2 --gamma $3 --lr $4 \
      ${5:-} --no-save-model --out "$RUNS/$1" --force
  $CE eval --model $M --base $M --delta "$RUNS/$1/delta" $EVAL --label "$1" --out "$RUNS/$1.json"
}
if [ "$CHAIN" = a ] || [ "$CHAIN" = all ]; then
  one ft-lr1e-3 ft 0.9 1e-3
  one crispedit-g0.9 crispedit 0.9 5e-3
  one crispedit-g0.99 crispedit 0.99 5e-3
fi
if [ "$CHAIN" = b ] || [ "$CHAIN" = all ]; then
  [ -f "$RUNS/base-counterfact.json" ] || $CE eval --model $M $EVAL --label base --out "$RUNS/base-counterfact.json"
  [ -f "$RUNS/base-zsre.json" ] || $CE eval --model $M --edits $ZSRE --skip-invalid --limit 100 --contexts raw,qa \
      --benchmarks none --heldout-samples 0 --label base-zsre --out "$RUNS/base-zsre.json"
  one adam-nscl-g0.9 adam-nscl 0.9 5e-3
  one crispedit-g0.5 crispedit 0.5 5e-3
  one ft-lr5e-3 ft 0.9 5e-3
fi
if [ "$CHAIN" = c ] || [ "$CHAIN" = all ]; then
  mkdir -p "$RUNS/extras"  # the base model's remaining capability metrics (not part of the comparison)
  [ -f "$RUNS/extras/base-benchmarks.json" ] || $CE eval --model $M --benchmarks truthfulqa --benchmark-limit 200 \
      --gsm8k --heldout-samples 0 --label base-benchmarks --out "$RUNS/extras/base-benchmarks.json"
  one crispedit-g0.99-lr2e-2 crispedit 0.99 2e-2
  one crispedit-g0.7 crispedit 0.7 5e-3
  one crispedit-seq-g0.9 crispedit 0.9 5e-3 "--sequential --chunk-size 20 --state $RUNS/crispedit-seq-g0.9.state"
  for w in 16 64; do
    one crispedit-seq-g0.9-w$w crispedit 0.9 5e-3 \
        "--sequential --chunk-size 20 --edit-weight $w --state $RUNS/crispedit-seq-g0.9-w$w.state"
  done
fi
REPORTS=$(ls "$RUNS"/*.json | grep -v -e zsre -e /results.json)
# shellcheck disable=SC2086
$CE compare $REPORTS --plot "$RUNS/tradeoff.png" --out "$RUNS/compare.md" || true
${PYTHON:-.venv/bin/python} scripts/results_table.py "$RUNS" --json "$RUNS/results.json" > "$RUNS/results.md"
