#!/usr/bin/env bash
# The fork arms of docs/forks.md at equal simulated agent turns, from one seed's SFT run:
#   SEEDS="0" ARMS="A0 A4" bash experiments/forks.sh
# T (1x) is today's desk budget, 20 x 64 dialogues, about 11,500 agent turns; each arm runs to 2x (or
# BUDGET=4) and keeps its models at every multiple of T (at-<turns>/), each evaluated on 400 held-out
# customers. Needs out/compare-desk/sft/s<seed> (python train.py --world desk --method sft --seed S
# --out out/compare-desk/sft --run sS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
T=${T:-11500}
BUDGET=${BUDGET:-2}
OUT=${OUT:-out/forks}
SEEDS=${SEEDS:-0}
ARMS=${ARMS:-"A0 A1 A2 A3 A4"}
flags() {
  case $1 in
    A0) echo "" ;;
    A1) echo "--rollouts branch --segment 1 --ref sft --gopo-epochs 8 --lr 3e-4" ;;
    A2) echo "--rollouts branch --mix 0.5" ;;
    A3) echo "--rollouts fork --nll-coef 0" ;;
    A4) echo "--rollouts fork --mix 0.5 --ref sft" ;;
  esac
}
keep=$(seq -s, "$T" "$T" $((BUDGET * T)))
for seed in $SEEDS; do
  for arm in $ARMS; do
    run="$OUT/$arm-s$seed"
    [ -f "$run/time.json" ] || $PYTHON train.py --world desk --seed "$seed" --sft-from "out/compare-desk/sft/s$seed" \
      --out "$OUT" --run "$arm-s$seed" --overwrite --iters 1000 --turn-budget $((BUDGET * T)) --keep-at "$keep" $(flags "$arm")
    for at in ${keep//,/ }; do
      [ -f "$run/at-$at/eval.json" ] || $PYTHON eval.py "$run/at-$at" --n-scenarios 400 > "$run/at-$at.eval.log"
    done
  done
done
# the learning curves of every arm and seed there so far: a table, $OUT/curves.json and the figure
$PYTHON -m experiments.curves "$OUT" --png "$OUT/curves.png"
