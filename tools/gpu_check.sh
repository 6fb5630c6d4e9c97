#!/usr/bin/env bash
# The prepared GPU check (about 8 minutes on one H100, start included, before stage (e); stage (e)
# adds about 7, within its own 420 s budget). Run it from the repo root whenever a GPU is at hand,
# and paste its output into docs/scaling.md with the card it ran on. A short lease (15 minutes of
# device time): run stage (e) alone, `timeout 540 python tools/gpu_check.py e`.
#
#   bash tools/gpu_check.sh                 # on a CUDA machine
#   DRY_RUN=1 bash tools/gpu_check.sh       # the same stages on CPU, tiny sizes (tests/test_device.py runs this)
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh   # the interpreter to use (default: python on PATH)
#
# (a) device checks on CUDA (tools/gpu_check.py a)
# (c) a Qwen2.5-1.5B-shaped model as both agents: a GOPO iteration, a PPO step and an eval in
#     single-process bf16, without and with --grad-ckpt: tokens/s, step time, peak memory vs formula
# (l) LoRA r = 16 on the same pair, bf16 base, --grad-ckpt: a GOPO iteration, peak memory vs formula
# (e) where a rollout's time goes (about 7 min, a 420 s budget inside): versions and packed GQA, cold
#     and warm rollouts, rollouts at 8/64/256 dialogues (fp32 + autocast, bf16 copy) beside a sampled
#     generate (targets at 64: >= 0.85 x generate, >= 2,000 reply tokens/s), the time split and live
#     rows per turn, decode ms/step per arm at B = 8/64/256, a profile of one step; dry run: toy sizes
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

stage "(l) LoRA r = 16 on the 1.5B-shaped pair, bf16 base, --grad-ckpt: a GOPO iteration's peak against the formula"
"$PYTHON" tools/gpu_check.py l

stage "(e) where a rollout's time goes: cold/warm, rollouts against a sampled generate, decode arms, profile"
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
