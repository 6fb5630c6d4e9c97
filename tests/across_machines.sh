#!/usr/bin/env bash
# The suite under the float arithmetic of other machines: each instruction-set level torch can pick
# (ATEN_CPU_CAPABILITY: this CPU's own, avx2, default = no vector extensions) with 2 threads and
# with 1. A "learns" margin that holds only natively is a margin smaller than machine-to-machine noise.
#
#   bash tests/across_machines.sh                          # the whole suite, 6 times (about 40 min on 2 cores)
#   bash tests/across_machines.sh -k "follows"             # only the learning tests (about 15 min)
#   PYTHON=.venv/bin/python bash tests/across_machines.sh  # an interpreter that is not `python` on PATH
#
# Prints, per setup, the pytest summary and each learning test's measured scores (its LEARNS lines).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
status=0
for capability in native avx2 default; do
  for threads in 2 1; do
    env=(OMP_NUM_THREADS=$threads)
    [ "$capability" != native ] && env+=(ATEN_CPU_CAPABILITY=$capability)
    log=$(mktemp)
    start=$(date +%s)
    env "${env[@]}" "$PYTHON" -m pytest -q -rP tests/ "$@" > "$log" 2>&1 || status=1
    echo "== capability $capability, $threads thread(s): $(tail -n 1 "$log") [$(( $(date +%s) - start )) s]"
    grep -E "^LEARNS|^FAILED" "$log" | sed 's/^/   /'
    rm -f "$log"
  done
done
exit $status
