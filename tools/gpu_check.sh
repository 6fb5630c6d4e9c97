#!/usr/bin/env bash
# The prepared GPU check (about 8 minutes on one H100, start included, before stage (e), which has
# not run on a GPU yet: budget a few minutes more). Run it from the repo root
# whenever a GPU is at hand, and paste its output into docs/scaling.md with the card it ran on.
#
#   bash tools/gpu_check.sh                 # on a CUDA machine
#   DRY_RUN=1 bash tools/gpu_check.sh       # the same stages on CPU, tiny sizes (tests/test_device.py runs this)
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh   # the interpreter to use (default: python on PATH)
#
# (a) device checks on CUDA (tools/gpu_check.py a)
# (c) a Qwen2.5-1.5B-shaped model as both agents: a GOPO iteration, a PPO step and an eval in
#     single-process bf16, without and with --grad-ckpt: tokens/s, step time, peak memory vs formula
# (e) the same pair's rollout tokens/s at 8, 64 and 256 dialogues (single-process bf16) beside a bare
#     HF model.generate at the same batch and final lengths, and their ratio (target >= 0.85 at 64);
#     the dry run uses 2, 4 and 8 dialogues of the toy model
# (d) one `torchrun --nproc_per_node 1 train.py --fsdp --bf16` iteration
# (b) the tiny default run on CUDA: train.py, then eval.py's table, with wall times (last: the longest)
# A machine with no network (the GPU image) is fine: nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python}   # an unactivated venv's interpreter works too: every stage runs "$PYTHON"
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  TINY=(--n-logs 60 --d-model 32 --sft-steps 4 --sft-window-steps 2 --iters 1 --scenarios 4 --k 2 --cs-samples 4)
  EVAL=(--n-scenarios 8)
else
  DEVICE=cuda
  TINY=()
  EVAL=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
stage() { echo; echo "== $1"; }
secs() { local t0=$1; echo "$(( $(date +%s) - t0 )) s"; }

stage "(a) device checks on $DEVICE"
"$PYTHON" tools/gpu_check.py a

stage "(c) Qwen2.5-1.5B-shaped model, single-process bf16, no activation checkpointing"
"$PYTHON" tools/gpu_check.py c
stage "(c) the same with --grad-ckpt"
"$PYTHON" tools/gpu_check.py c --grad-ckpt

stage "(e) rollout tokens/s against a bare model.generate, single-process bf16"
"$PYTHON" tools/gpu_check.py e

stage "(d) torchrun --nproc_per_node 1 train.py --fsdp --bf16 on $DEVICE"
t0=$(date +%s)
"$PYTHON" -m torch.distributed.run --nproc_per_node 1 -- train.py --device "$DEVICE" --fsdp --bf16 --out "$OUT" \
  --run fsdp1 --overwrite --n-logs 60 --sft-steps 4 --sft-window-steps 2 --iters 1 --scenarios 4 --k 2 \
  --cs-samples 4 2>&1 | grep -v "it/s\]" | tail -n 3
echo "wall time: $(secs "$t0")"

stage "(b) the tiny default run on $DEVICE"
t0=$(date +%s)
"$PYTHON" train.py --device "$DEVICE" --out "$OUT" --run tiny --overwrite "${TINY[@]}" 2>&1 | grep -v "it/s\]" | tail -n 4
echo "train.py wall time: $(secs "$t0")"
t0=$(date +%s)
"$PYTHON" eval.py "$OUT/tiny" --device "$DEVICE" "${EVAL[@]}" > "$OUT/eval.txt"   # whole: head on a pipe cuts eval.py off
head -n 16 "$OUT/eval.txt"
echo "eval.py wall time: $(secs "$t0")"

echo
echo "GPU CHECK PASSED"
