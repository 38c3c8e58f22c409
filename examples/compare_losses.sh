#!/usr/bin/env bash
# Run the quickstart task with grpo, dapo, nsr and nsr-decay (same seed, same data, same initial model)
# and draw their reward curves in one PNG.
#   bash examples/compare_losses.sh                   # -> runs/compare/reward_comparison.png
#   OUT=runs/cmp LOSSES="dapo nsr" bash examples/compare_losses.sh run.steps=100
# Extra arguments are config overrides applied to every run.
set -euo pipefail
OUT=${OUT:-runs/compare}
LOSSES=${LOSSES:-"grpo dapo nsr nsr-decay"}
NSR=${NSR:-nsr-megatron}
mkdir -p "$OUT"
args=()
for loss in $LOSSES; do
  echo "== $loss"
  $NSR quickstart --no-progress loss.name="$loss" run.run_dir="$OUT/$loss" checkpoint.resume=auto "$@"
  args+=("$loss=$OUT/$loss")
done
$NSR plot --compare "${args[@]}" --out "$OUT/reward_comparison.png" --smooth 5
