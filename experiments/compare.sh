#!/usr/bin/env bash
# The comparison of README "Baselines": 3 training seeds x 5 methods (+ 2 variants) on one budget, then the table.
# Every method of a seed starts from the same SFT checkpoints (--sft-from the seed's --algo sft run).
# gopo-alpha1 and gopo-noexpert-alpha1 are variant rows: R = TSE alone (--alpha 1), as the other baselines;
# gopo-refsft: the frozen SFT Expert as DPO's reference policy (--ref sft) instead of the rollout policy.
#   bash experiments/compare.sh                 # out/compare/<method>/s{0,1,2}, out/compare/compare.{md,json,png}
#   SEEDS="0" bash experiments/compare.sh       # one seed
#   WORLD=desk bash experiments/compare.sh      # on the service desk (out/compare-desk/...)
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
WORLD=${WORLD:-shop}
OUT=${OUT:-out/compare$([ "$WORLD" = shop ] || echo "-$WORLD")}
SEEDS=${SEEDS:-"0 1 2"}
entry() {   # gopo and sft: train.py; the baselines: their own entry point (train.py's stages and flags, plus theirs)
  case "$1" in gopo|sft) echo train.py ;; *) echo "-m experiments.baselines" ;; esac
}
for seed in $SEEDS; do
  python train.py --world "$WORLD" --algo sft --seed "$seed" --out "$OUT" --run "sft/s$seed" --overwrite
  for algo in gopo ppo memento gopo-noexpert; do
    python $(entry "$algo") --world "$WORLD" --algo "$algo" --seed "$seed" --out "$OUT" --run "$algo/s$seed" \
      --overwrite --sft-from "$OUT/sft/s$seed"
  done
  for algo in gopo gopo-noexpert; do
    python $(entry "$algo") --world "$WORLD" --algo "$algo" --alpha 1 --seed "$seed" --out "$OUT" \
      --run "$algo-alpha1/s$seed" --overwrite --sft-from "$OUT/sft/s$seed"
  done
  python train.py --world "$WORLD" --ref sft --seed "$seed" --out "$OUT" --run "gopo-refsft/s$seed" --overwrite \
    --sft-from "$OUT/sft/s$seed"
done
python -m experiments.compare "$OUT/sft" "$OUT/ppo" "$OUT/memento" "$OUT/gopo-noexpert" "$OUT/gopo" "$OUT/gopo-alpha1" \
  "$OUT/gopo-noexpert-alpha1" "$OUT/gopo-refsft" --out "$OUT"
