#!/usr/bin/env bash
# The paper's comparison (docs/baselines.md): 3 training seeds x 4 methods at their defaults, one budget, each
# method with one alternative setting (the tuning: the same small search for every method; a method's default is
# the setting with the better training-side TSE, never the held-out one), then the table.
# Every method of a seed starts from the same SFT checkpoints (--sft-from the seed's --method sft run).
#   rows: sft (and sft-flat); gopo, ppo, memento, gopo-noexpert (the defaults);
#   the tuning: gopo-<the other --rollouts>, gopo-noexpert-<the other --rollouts>, ppo-lr1e-4, memento-k8;
#   EXTRA=1 adds the shop's earlier variant rows: gopo-alpha1 and gopo-noexpert-alpha1 (R = TSE alone, --alpha 1),
#   gopo-refsft (the frozen SFT Expert as DPO's reference, --ref sft).
# A run that finished (its time.json exists) is not run again: the comparison can be run in pieces.
#   bash experiments/compare.sh                 # out/compare/<row>/s{0,1,2}, out/compare/compare.{md,json,png}
#   SEEDS="0" bash experiments/compare.sh       # one seed (the table: of the seeds that finished)
#   WORLD=desk bash experiments/compare.sh      # on the service desk (out/compare-desk/...)
#   PLANNERS="models/smollm2" PLANNER_SHOTS=3 bash experiments/compare.sh   # + prompted planners' rows (planner.py):
#                                               # each a local instruct model folder, on each seed's gopo run
# With each seed's experiments.ceilings of its gopo run (python -m experiments.ceilings out/compare-desk/gopo/sS),
# the table adds the share of the SFT -> Expert-ceiling gap GOPO closes.
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
PYTHON=${PYTHON:-python}
WORLD=${WORLD:-shop}
OUT=${OUT:-out/compare$([ "$WORLD" = shop ] || echo "-$WORLD")}
SEEDS=${SEEDS:-"0 1 2"}
EXTRA=${EXTRA:-}
PLANNERS=${PLANNERS:-}
PLANNER_SHOTS=${PLANNER_SHOTS:-0}
DEFAULT_ROLLOUTS=$($PYTHON -c "import train; print(train.parser().get_default('rollouts'))")
OTHER_ROLLOUTS=$([ "$DEFAULT_ROLLOUTS" = branch ] && echo independent || echo branch)
train() {   # train ROW SEED ALGO [FLAGS...]: one run, unless it finished; every method from the seed's SFT run
  local row=$1 seed=$2 method=$3; shift 3
  [ -f "$OUT/$row/s$seed/time.json" ] && return 0
  local entry="-m experiments.baselines" from="--sft-from $OUT/sft/s$seed"   # the baselines' own entry point
  case "$method" in gopo|sft) entry=train.py ;; esac
  [ "$method" = sft ] && from=""
  $PYTHON $entry --world "$WORLD" --method "$method" --seed "$seed" --out "$OUT" --run "$row/s$seed" --overwrite $from "$@"
}
rows="sft ppo memento gopo-noexpert gopo"
for seed in $SEEDS; do
  train sft "$seed" sft
  for method in gopo ppo memento gopo-noexpert; do
    train "$method" "$seed" "$method"
  done
  train "gopo-$OTHER_ROLLOUTS" "$seed" gopo --rollouts "$OTHER_ROLLOUTS"
  train "gopo-noexpert-$OTHER_ROLLOUTS" "$seed" gopo-noexpert --rollouts "$OTHER_ROLLOUTS"
  train ppo-lr1e-4 "$seed" ppo --flat-lr 1e-4
  train memento-k8 "$seed" memento --memento-k 8
  if [ -n "$EXTRA" ]; then
    train gopo-alpha1 "$seed" gopo --alpha 1
    train gopo-noexpert-alpha1 "$seed" gopo-noexpert --alpha 1
    train gopo-refsft "$seed" gopo --ref sft
  fi
done
rows="$rows gopo-$OTHER_ROLLOUTS gopo-noexpert-$OTHER_ROLLOUTS ppo-lr1e-4 memento-k8"
[ -n "$EXTRA" ] && rows="$rows gopo-alpha1 gopo-noexpert-alpha1 gopo-refsft"
$PYTHON -m experiments.compare $(for r in $rows; do echo "$OUT/$r"; done) --out "$OUT" \
  $(for m in $PLANNERS; do echo "--planner $m"; done) $([ -z "$PLANNERS" ] || echo "--planner-shots $PLANNER_SHOTS")
