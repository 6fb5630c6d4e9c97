#!/usr/bin/env bash
# When does splitting strategy from execution matter? The desk on a 2 x 2 grid (docs/grid.md):
#   horizon: 10 (one request per customer, about shop's length) or 24 (the default: 1-3 requests)
#   paraphrases per strategy: 2 or 20 (the default)
# gopo, ppo and gopo-noexpert from each seed's SFT, 2 seeds; then each cell's comparison and grid.png.
# A run that finished (its time.json exists) is not run again, so the grid can be run in pieces; the
# default cell takes the runs of `WORLD=desk bash experiments/compare.sh` where they exist (same flags).
#   bash experiments/grid.sh                    # out/grid/h{10,24}-p{2,20}/<method>/s{0,1}, out/grid/grid.{md,png}
#   CELLS="h10-p2 h10-p20" bash experiments/grid.sh   # some cells only
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
OUT=${OUT:-out/grid}
SEEDS=${SEEDS:-"0 1"}
CELLS=${CELLS:-"h10-p2 h10-p20 h24-p2 h24-p20"}
COMPARE=${COMPARE:-out/compare-desk}   # the default cell's runs, if compare.sh made them
entry() { case "$1" in gopo|sft) echo train.py ;; *) echo "-m experiments.baselines" ;; esac; }
for seed in $SEEDS; do       # a seed of every cell before the next seed: a grid run in pieces fills every cell early
  for cell in $CELLS; do
    horizon=${cell#h}; horizon=${horizon%-p*}; paraphrases=${cell#*-p}
    for method in sft gopo ppo gopo-noexpert; do
      run="$OUT/$cell/$method/s$seed"
      [ -f "$run/time.json" ] && continue
      if [ "$cell" = h24-p20 ] && [ -f "$COMPARE/$method/s$seed/time.json" ]; then
        mkdir -p "$(dirname "$run")" && rm -rf "$run" && cp -r "$COMPARE/$method/s$seed" "$run" && continue
      fi
      from=$([ "$method" = sft ] || echo "--sft-from $OUT/$cell/sft/s$seed")
      python $(entry "$method") --world desk --horizon "$horizon" --paraphrases "$paraphrases" --method "$method" \
        --seed "$seed" --out "$OUT/$cell" --run "$method/s$seed" --overwrite $from
    done
  done
done
for cell in $CELLS; do
  [ -f "$OUT/$cell/compare.json" ] && [ -z "$(find "$OUT/$cell" -name time.json -newer "$OUT/$cell/compare.json")" ] ||
    python -m experiments.compare "$OUT/$cell/sft" "$OUT/$cell/ppo" "$OUT/$cell/gopo-noexpert" "$OUT/$cell/gopo" \
      --out "$OUT/$cell"
done
python -m experiments.grid "$OUT"
