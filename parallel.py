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
copy of one model per rank while it generates (docs/scaling.md, "Memory").

Imports run one way: lm.py (the models, their saving and the SFT loop) stands on this module, never
the reverse. This is the bottom layer, torch.distributed and nothing of the project's, so the
distributed code reads on its own; what is about a model (activation checkpointing) stays in lm.py
and is applied by the caller before `shard`.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

FSDP = False   # set by shard(): gradients are reduced by FSDP itself
DEVICE = torch.device("cpu")   # set by init(): where this rank computes, and where collectives run


def cpu_threads():
    """CPU threads for this process: OMP_NUM_THREADS when the user set it, else the machine's cores
    shared among the ranks on it (torchrun sets LOCAL_WORLD_SIZE)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init(device="auto"):
    """Pick this rank's device ("auto": CUDA when there is one) and, under torchrun (WORLD_SIZE set),
    join the process group: NCCL on CUDA, gloo on CPU. Returns the device.

    NCCL reduces only CUDA tensors, so every collective below builds its tensors on DEVICE."""
    global DEVICE
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda:
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
        torch.backends.cuda.matmul.allow_tf32 = True    # fp32 matmuls on tensor cores (10 mantissa bits)
        torch.backends.cudnn.allow_tf32 = True
    else:
        DEVICE = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=DEVICE)
        else:
            dist.init_process_group("gloo")
    return DEVICE


def distributed():
    """Launched by torchrun: a process group, possibly of one rank."""
    return dist.is_initialized()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def n_ranks():
    """How many processes share the work (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def share(items):
    """This rank's items of a batch: indices rank, rank + W, ..."""
    return items[rank()::n_ranks()]


def share_or_dummy(items):
    """(this rank's share, its weight): a rank whose share is empty gets the first item with weight 0,
    because under FSDP every rank must run every forward and backward (they hold collectives)."""
    mine = share(items)
    return (mine, 1.0) if mine else (items[:1], 0.0)


def denominator(n_total):
    """Divide a rank's *summed* loss by this: the mean over ranks of the gradients is then the
    gradient of the mean loss over all n_total items (the single-process loss)."""
    return n_total / n_ranks()


def gather(objs):
    """Inverse of `share`: every rank gets the whole batch, in the original order."""
    if n_ranks() == 1:
        return objs
    parts = [None] * n_ranks()
    dist.all_gather_object(parts, objs)
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::n_ranks()] = part
    return out


def total(x):
    """Sum of a float over ranks."""
    if n_ranks() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t)
    return t.item()


def all_reduce_grads(model, bucket_bytes=25 << 20):
    """Plain data parallelism: average the gradients over ranks (FSDP does this itself). Gradients go
    in flat buckets of about 25 MB, one all-reduce each (as DDP does), not one per parameter."""
    if n_ranks() == 1 or FSDP:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= n_ranks()
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket, size = [], 0


def shard(model, bf16=False):
    """FSDP2 on each decoder block, then the root. Activation checkpointing, when wanted, is the
    caller's (lm.activation_checkpointing, before this: lm.place), so each sharded block is
    recomputed in backward from its input."""
    global FSDP
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
    """Full (unsharded) weights for the duration of one step of a rollout: forwards inside need no
    collective. Every FSDP unit is gathered explicitly (the root's `unshard()` covers only the root's
    own parameters, not the decoder blocks), in the same order on every rank, so a rank with no
    dialogue left joins the same all-gathers; on the way out every unit is resharded again."""
    if not FSDP:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [u for m in models for u in m.modules() if isinstance(u, FSDPModule)]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model):
    """The whole model's state dict on rank 0 (CPU); every rank must call this (it all-gathers)."""
    if not FSDP:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier():
    if n_ranks() > 1:
        dist.barrier()


def close():
    """The end of a torchrun process: every rank meets, the group is destroyed, and the process leaves
    without interpreter finalization. Gloo's worker threads can still hold tensors then, and releasing
    them while Python shuts down aborts the process now and then ("terminate called without an active
    exception"; pytorch/pytorch#179291): seen here in about 1 of 20 two-rank runs under load."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
