#!/usr/bin/env bash
# The comparison of README "Baselines": 3 training seeds x 5 methods (+ 3 variants) on one budget, then the table.
# Every method of a seed starts from the same SFT checkpoints (--sft-from the seed's --algo sft run).
# gopo-alpha1 and gopo-noexpert-alpha1 are variant rows: R = TSE alone (--alpha 1), as the other baselines;
# gopo-refsft: the frozen SFT Expert as DPO's reference policy (--ref sft) instead of the rollout policy.
# A run that finished (its time.json exists) is not run again: the comparison can be run in pieces.
#   bash experiments/compare.sh                 # out/compare/<method>/s{0,1,2}, out/compare/compare.{md,json,png}
#   SEEDS="0" bash experiments/compare.sh       # one seed (the table: of the seeds that finished)
#   WORLD=desk bash experiments/compare.sh      # on the service desk (out/compare-desk/...)
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
WORLD=${WORLD:-shop}
OUT=${OUT:-out/compare$([ "$WORLD" = shop ] || echo "-$WORLD")}
SEEDS=${SEEDS:-"0 1 2"}
train() {   # train ROW SEED ALGO [FLAGS...]: one run, unless it finished; every method from the seed's SFT run
  local row=$1 seed=$2 algo=$3; shift 3
  [ -f "$OUT/$row/s$seed/time.json" ] && return 0
  local entry="-m experiments.baselines" from="--sft-from $OUT/sft/s$seed"   # the baselines' own entry point
  case "$algo" in gopo|sft) entry=train.py ;; esac
  [ "$algo" = sft ] && from=""
  python $entry --world "$WORLD" --algo "$algo" --seed "$seed" --out "$OUT" --run "$row/s$seed" --overwrite $from "$@"
}
for seed in $SEEDS; do
  train sft "$seed" sft
  for algo in gopo ppo memento gopo-noexpert; do
    train "$algo" "$seed" "$algo"
  done
  train gopo-alpha1 "$seed" gopo --alpha 1
  train gopo-noexpert-alpha1 "$seed" gopo-noexpert --alpha 1
  train gopo-refsft "$seed" gopo --ref sft
done
python -m experiments.compare "$OUT/sft" "$OUT/ppo" "$OUT/memento" "$OUT/gopo-noexpert" "$OUT/gopo" "$OUT/gopo-alpha1" \
  "$OUT/gopo-noexpert-alpha1" "$OUT/gopo-refsft" --out "$OUT"
