"""Distributed training in one page: data parallelism and FSDP2, switched on by `torchrun`.

    python train.py ...                                          # one process: everything below is a no-op
    torchrun --nproc_per_node 8 train.py --fsdp --bf16 ...      # 8 ranks, models sharded with FSDP2

Every rank holds the same scenarios, logs and random streams. Work is split by index (`share`):
rank r takes items r, r + W, r + 2W, ... of a batch (rollouts, SFT examples, preference pairs), and
losses are normalised so that averaging gradients over ranks gives exactly the gradient of the
single-process loss on the whole batch (`denominator`). Rollouts are gathered back (`gather`) so every
rank builds the same pairs.

FSDP2 (`--fsdp`): `fully_shard` on each decoder block (the classes in `model._no_split_modules`),
then on the root, which keeps tied input/output embeddings in one group (tied stays tied). With
`--bf16`, parameters are all-gathered in bf16 for compute while the sharded master weights,
gradients and their reduction stay fp32. Without `--fsdp`, `torchrun` gives plain data
parallelism: every rank keeps the whole model and gradients are all-reduced before each step.

Generation under FSDP: a rollout is hundreds of small forwards whose count differs between ranks
(dialogues end at different turns, replies at different lengths). Instead of all-gathering the
weights in every forward (which would force every rank to run the same number of forwards),
`gathered(model)` all-gathers one model's weights for one step of the dialogue (the Expert's
decisions, then the CS Agent's replies) and frees them after; inside, the forwards need no
communication. Every rank runs every turn of the horizon, entering the gathers even with no
dialogue left, so ranks that finish early just wait at the next turn's gather. Costs one unsharded
copy of one model per rank while it generates (see the README's memory table).
"""
import contextlib
import os

import torch
import torch.distributed as dist

FSDP = False   # set by shard(): gradients are reduced by FSDP itself


def init():
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda")
    return torch.device("cpu")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def share(items):
    """This rank's items of a batch: indices rank, rank + W, ..."""
    return items[rank()::world()]


def share_or_dummy(items):
    """(this rank's share, its weight): a rank whose share is empty gets the first item with weight 0,
    because under FSDP every rank must run every forward and backward (they hold collectives)."""
    mine = share(items)
    return (mine, 1.0) if mine else (items[:1], 0.0)


def denominator(n_total):
    """Divide a rank's *summed* loss by this: the mean over ranks of the gradients is then the
    gradient of the mean loss over all n_total items (the single-process loss)."""
    return n_total / world()


def gather(objs):
    """Inverse of `share`: every rank gets the whole batch, in the original order."""
    if world() == 1:
        return objs
    parts = [None] * world()
    dist.all_gather_object(parts, objs)
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def total(x):
    """Sum of a float over ranks."""
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def all_reduce_grads(model):
    """Plain data parallelism: average the gradients over ranks (FSDP does this itself)."""
    if world() == 1 or FSDP:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world()


def shard(model, bf16=False, grad_ckpt=False):
    """FSDP2 on each decoder block, then the root. Activation checkpointing (non-reentrant) is
    applied to the blocks first, so each block is recomputed in backward from its input."""
    global FSDP
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    blocks = set(model._no_split_modules or [])
    if not blocks:
        raise ValueError(f"{type(model).__name__} does not name its decoder blocks (_no_split_modules)")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    FSDP = True
    return model


@contextlib.contextmanager
def gathered(*models):
    """Full (unsharded) weights for the duration of a rollout: forwards inside need no collective."""
    sharded = [m for m in models if FSDP and hasattr(m, "unshard")]
    for m in sharded:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_state_dict(model):
    """The whole model's state dict on rank 0 (CPU); every rank must call this (it all-gathers)."""
    if not FSDP:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier():
    if world() > 1:
        dist.barrier()


def close():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
