"""The models both agents are: tokenizer and tiny Llama, pretrained backbones, placing them on a
device (FSDP2, activation checkpointing), the SFT loop and its guarded step, and log-probs with the
output layer run only where it is read. The text they read is serialize.py.

This module stands on parallel.py (the SFT loop's gradient all-reduce, sharding) and serialize.py;
parallel.py never imports it (its docstring says why).
"""
import contextlib
import copy
import os
import weakref

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from torch.utils.checkpoint import checkpoint

import cli
import lora
import parallel
import serialize

# ----------------------------------------------------------------------------- tokenizer and model
def train_tokenizer(texts, strategies, vocab_size=1024):
    """Byte-level BPE trained on the run's own text, with one special token per strategy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [serialize.PAD, serialize.BOS, serialize.EOT] + [serialize.strategy_token(z) for z in strategies]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=serialize.BOS,
                                   eos_token=serialize.EOT, pad_token=serialize.PAD, padding_side="left")


def build_tiny_model(tokenizer, d_model=128, n_layer=4, n_head=4, max_len=1024, seed=0):
    """A Llama-architecture causal LM built from config (about 1M parameters at the defaults)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=3 * d_model,
                         num_hidden_layers=n_layer, num_attention_heads=n_head,
                         num_key_value_heads=n_head, max_position_embeddings=max_len,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config)


def from_pretrained(name, strategies):
    """Any Hugging Face causal LM (hub id or local folder) as an agent backbone: its own tokenizer
    (pad = end-of-sequence where it has no pad token) plus one new token per strategy."""
    tok = AutoTokenizer.from_pretrained(name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if tok.eos_token is None:
        raise ValueError(f"{name}: the tokenizer has no end-of-sequence token to end turns with")
    tok.eos_token = serialize.end_of_turn(tok)      # every turn, and every sampled reply, ends with it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token     # only ever under a zero attention mask
    if tok.bos_token is None and not serialize.chat_parts(tok)[0]:
        tok.bos_token = tok.eos_token     # a dialogue needs an opening token
    add_strategy_tokens(model, tok, strategies)
    return model, tok


def add_strategy_tokens(model, tokenizer, strategies):
    """Make sure every strategy has its own token; its new input row (and output row, for a model
    whose output layer is not tied to its input embeddings) starts at the mean of its name's rows.

    For a tokenizer trained with the strategy tokens (the tiny model) only the initialisation runs.
    """
    tokens = [serialize.strategy_token(z) for z in strategies]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)             # untied (e.g. Qwen2.5-14B): the Expert reads these rows
    with torch.no_grad():
        for z, t in zip(strategies, tokens):
            name_ids = tokenizer.encode(" " + z.replace("_", " "), add_special_tokens=False)
            for w in tables:
                w[tokenizer.convert_tokens_to_ids(t)] = w[name_ids].mean(0)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def new_models(need, args, world, logs):
    """{name: (model, tokenizer)} for the models in `need` (expert, agent, flat), before SFT: tiny ones
    (--d-model, --n-layer) sharing a tokenizer trained on the logs, or the pretrained backbones."""
    if args.model != "tiny":
        models = {name: load_backbone(args.expert_model or args.model if name == "expert" else args.model,
                                      world.STRATEGIES) for name in need}
        return {name: (lora.add(m, tok, world.STRATEGIES, args) if name in lora.names(args) else m, tok)
                for name, (m, tok) in models.items()}
    tok = train_tokenizer([t["text"] for r in logs for t in r["turns"]] + list(world.INSTRUCTIONS.values()),
                             world.STRATEGIES, args.vocab_size)
    max_len = 1024 if args.world == "shop" and args.data == "sim" else 4096   # desk, real dialogues: ~2k tokens
    models = {}
    for name in need:   # each model its own init seed, the same whichever others are built
        models[name] = (build_tiny_model(tok, args.d_model, args.n_layer, max_len=max_len,
                                            seed=args.seed + {"expert": 0, "agent": 1, "flat": 2}[name]), tok)
        add_strategy_tokens(models[name][0], tok, world.STRATEGIES)
    return models

def reference(model, folder, args, device):
    """The frozen SFT model (--ref sft's pi_ref, kl_to_sft's reference) of a trained `model`: with LoRA,
    the SFT adapter in `folder` switched on beside the trained one (lora.reference_adapter), so no
    second copy of the base; else a second model (`frozen`). Under --fsdp the model is sharded already
    and peft cannot add an adapter to it: a second model there too (sharded, 1/W of its bytes per rank)."""
    if not lora.is_peft(model) or args.fsdp:
        return frozen(folder, args, device)
    return lora.reference_adapter(model, folder, device)


def trainable(model):
    """The parameters an optimizer steps: all of them, or with LoRA the adapters and strategy rows."""
    return [p for p in model.parameters() if p.requires_grad]


def check_model(name):
    """Fail before anything is written if a pretrained backbone is not there (a config is enough)."""
    if name is None or name == "tiny":
        return
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        cli.die(f"--model {name}: the folder holds no config.json (not a Hugging Face model folder)")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        load_backbone(name, None)   # the one-line error that says what to do

def load_backbone(name, strategies):
    """A pretrained model + tokenizer, or a one-line error that says how to get one offline."""
    try:
        return from_pretrained(name, strategies)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            cli.die(f"cannot load a model from the folder {name}: {str(e).splitlines()[0]}")
        hint = " (offline: pass a local folder, e.g. python tools/convert.py models/smollm2 then " \
               "--model models/smollm2, or add --no-offline to download)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        cli.die(f"cannot load --model '{name}': not a local folder and not in the Hugging Face cache{hint}")

def place(model, args, device):
    """Move a model to the device; under torchrun --fsdp, shard it (FSDP2); --grad-ckpt either way.
    A LoRA model with --bf16: its frozen base in bf16 (half the bytes), the trained parameters fp32."""
    if lora.is_peft(model) and args.bf16:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.to(device)
    if args.grad_ckpt:          # on the blocks before sharding them, so FSDP wraps checkpointed blocks
        activation_checkpointing(model)
    return parallel.shard(model, bf16=args.bf16) if args.fsdp else model

def frozen(folder, args, device):
    """A model that is only read, placed like the trained ones: the SFT Expert (pi_ref with --ref sft,
    and the reference of the kl_to_sft metric). It costs one more Expert's weights (docs/scaling.md)."""
    return place(load(folder)[0].requires_grad_(False).eval(), args, device)

def sft_loop(model, step_loss, steps, lr, cycle, desc):
    """The SFT loop both agents share: AdamW, `sft_schedule`, guarded steps, a progress bar.

    step_loss(step) -> scalar loss tensor of this rank's share of that step's batch, scaled with
    `parallel.denominator` (in one process: the batch's loss), or an iterable of them, one per
    micro-batch (--device-batch-size; `guarded_step`). Returns the list of losses.
    """
    from tqdm import tqdm
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sft_schedule(s, cycle))
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, disable=not parallel.is_main())):
        values = []
        if not guarded_step(model, opt, step_loss(step), values=values):
            bar.write(f"{desc}: non-finite loss or gradient at step {step}, step skipped")
        sched.step()
        losses.append(parallel.total(sum(values)) / parallel.n_ranks())   # the loss of the whole batch
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def guarded_step(model, opt, loss, max_norm=1.0, values=None):
    """backward + clip + step, unless the loss or the gradient is not finite (then skip, return False).

    loss: a scalar tensor, or an iterable of them, one per micro-batch (--device-batch-size): each is
    backpropagated before the next is computed (pass a generator), so only one micro-batch's
    activations are alive at a time, and the gradients add up to those of the sum of the losses.
    values: a list that receives each part's loss as a float (this rank's; a non-finite part is the
    last one taken)."""
    opt.zero_grad(set_to_none=True)
    for part in [loss] if torch.is_tensor(loss) else loss:
        if values is not None:
            values.append(part.item())
        if parallel.total(float(not torch.isfinite(part))):     # any rank: all ranks skip together
            opt.zero_grad(set_to_none=True)
            return False
        part.backward()
    parallel.all_reduce_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm     # FSDP: a DTensor
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    opt.zero_grad(set_to_none=True)      # free the gradients now: rollouts come next, not backward
    return True


def micro_batches(items, size, n_total, length=None):
    """--device-batch-size: this rank's share of a batch (`items`, from parallel.share_or_dummy) in
    runs of at most `size` items, sorted by `length` when given (each run pads little): a list of
    (run, weight). Every rank gets the same number of runs, ceil(ceil(n_total / ranks) / size), because
    under FSDP each run is a forward and a backward that hold collectives; a rank with fewer items
    runs (items[:1], 0.0) as a dummy, as `parallel.share_or_dummy` does."""
    n_runs = -(-(-(-n_total // parallel.n_ranks())) // size)
    ranked = sorted(items, key=length) if length else list(items)
    runs = [ranked[i * size:(i + 1) * size] for i in range(n_runs)]
    return [(run, 1.0) if run else (items[:1], 0.0) for run in runs]


@contextlib.contextmanager
def autocast(device, enabled, fsdp=False):
    """--bf16 in one process: matmuls in bf16, weights and AdamW states in fp32 (bf16 weights would
    round small updates away). cache_enabled=False because the region spans optimizer steps, and a
    cached bf16 copy of a weight would be stale after the first one. fsdp=True: FSDP2's mixed
    precision casts the weights itself, so no autocast, but the attention rule below still holds.

    bf16 on CPU takes the math attention kernel. torch's fused CPU kernel chooses its AMX packing from
    the CPU's flags, not from ATEN_CPU_CAPABILITY, and under ATEN_CPU_CAPABILITY=default on an AMX CPU
    (tests/across_machines.sh) it dies: "pack_vnni2 is only supported when avx512 is supported". We
    take math for every bf16 CPU run, not only when the variable is set, so that this path is the one
    the bf16 tests run on every machine (CPU bf16 is for tests; the math kernel upcasts to fp32 there).
    fp32 (enabled=False) and CUDA keep their kernels, and their numbers, bit for bit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    math_attention = enabled and device.type == "cpu"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and not fsdp, cache_enabled=False), \
            (sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()):
        yield


def rollout_model(model, args):
    """The model a rollout plays with: under --bf16 in one process on a GPU, a bf16 copy of `model`
    (`bf16_copy`), so that no linear casts its fp32 weight at every decode step (about 9 GB of
    traffic per step for a 1.5B model); else `model` itself. It costs 2 bytes per parameter per
    model (docs/scaling.md). CPU keeps the autocast path: its numbers, and every CPU run's, unchanged.
    A LoRA model plays itself: `place` already made its frozen base bf16, and a copy would add 2 bytes
    per parameter to cast only the adapters, a few percent of them."""
    if lora.is_peft(model):
        return model
    if getattr(args, "bf16", False) and not getattr(args, "fsdp", False) and model.device.type == "cuda":
        return bf16_copy(model)
    return model


_copies = weakref.WeakKeyDictionary()      # model -> (its bf16 copy, the weights' version it copies)


def bf16_copy(model):
    """A bf16 copy of `model` for generation, refreshed in place (`copy_`, no new memory) whenever the
    model's weights changed since the last call: an optimizer step bumps every updated parameter's
    version counter, so the copy is never stale and never refreshed for nothing. Only the parameters
    are bf16 (tied ones stay tied); buffers keep their dtype (RoPE's inv_freq stays fp32). Built
    parameter by parameter, so it never holds a second fp32 copy."""
    version = sum(p._version for p in model.parameters())
    if model in _copies:
        copy_, seen = _copies[model]
        if seen != version:
            with torch.no_grad():
                for c, p in zip(copy_.parameters(), model.parameters()):
                    c.copy_(p)
            _copies[model] = (copy_, version)
        return copy_
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False) for p in model.parameters()}
    copy_ = copy.deepcopy(model, memo).eval()
    _copies[model] = (copy_, version)
    return copy_


def activation_checkpointing(model):
    """Recompute each decoder block in backward from its input (non-reentrant). transformers 5.24
    renamed the switch (the old name still works there, with a warning); 5.17 has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load(path):
    """(model, tokenizer) of a checkpoint folder: a whole model, or LoRA adapters with their
    strategy-token rows (peft's adapter_config.json, --lora-r) over the base they name, which is
    loaded again (fp32; `place` casts a frozen base to bf16 with --bf16)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if lora.is_adapter_folder(path):
        return lora.load(path, len(tokenizer)), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def sft_schedule(step, cycle):
    """LR multiplier for SFT: 20-step warmup, then linear decay to 0, restarting every `cycle` steps.

    Why restarts: on the tiny models, the copy skill the CS Agent needs (repeat the customer's
    must-have, name the product that has it) appeared reliably after two 100-step cycles and not
    after one 200-step decay (measured in docs/design.md).
    """
    s = step % cycle
    return min(1.0, (s + 1) / 20) * (1 - s / cycle)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- batching and log-probs
def pad(seqs, pad_id, left=False):
    """list of id lists -> ids (B, L) long, attention mask (B, L) long."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        attn[i, sl] = 1
    return ids, attn


def length_buckets(examples, buckets=4, n_total=None, length=len):
    """Split a batch into `buckets` runs of similar length, each padded and run on its own; summing
    their losses gives the batch's loss. Why: padding a random batch of whole desk dialogues to its
    longest wastes ~40% of the tokens and, attention being quadratic, more of the time (4 buckets:
    1.44x faster per SFT step, `python -m experiments.bench --sft RUN`). The count follows from n_total (the whole batch over
    all ranks, default len(examples)), so every rank runs the same number of forwards (FSDP)."""
    n = max(1, min(buckets, (n_total or len(examples)) // parallel.n_ranks()))
    ranked = sorted(examples, key=length)
    return [ranked[i * len(ranked) // n:(i + 1) * len(ranked) // n] for i in range(n)]


def forward_logits(model, ids, attn, logits_to_keep=0):
    """Logits (B, L, V) for a padded batch (the last `logits_to_keep` positions only, if > 0); left
    padding is handled with explicit positions."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, pos = ids.to(model.device), attn.to(model.device), pos.to(model.device)
    return model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=logits_to_keep,
                 use_cache=False).logits


def token_logps(logits, ids):
    """log p(ids[:, i] | ids[:, :i]) for i >= 1: (B, L-1), from full logits (the reference the
    memory-light `target_logps` is tested against)."""
    return torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, ids[:, 1:, None]).squeeze(2)


# ----------------------------------------------------------------------------- the LM head, only where needed
# A 150k-vocabulary model's logits over a training batch are tens of GB ((B, L, V) fp32, again for
# the log-softmax, again in backward), yet the Expert needs Z strategy columns at T decision
# positions, and a reply's log-prob needs one column per reply token. `head_only` runs the model's
# own forward (so FSDP's hooks, autocast and checkpointing behave as usual) but swaps what its output
# layer computes: the layer receives zero positions, and its output is replaced by fn(hidden, head).
@contextlib.contextmanager
def head_only(model, fn):
    """Inside: model(...).logits == fn(hidden (B, L, d), output layer), the final hidden states
    (after the last norm) being what the output layer would have read."""
    head, hidden = model.get_output_embeddings(), []

    def take_input(module, args):
        hidden.append(args[0])
        return (args[0][:, :0],)                       # the full-vocabulary matmul runs on 0 positions

    def replace_output(module, args, output):
        return fn(hidden.pop(), module)
    handles = [head.register_forward_pre_hook(take_input), head.register_forward_hook(replace_output)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def head_weight(head):
    """The output layer's weight as its own forward uses it: with LoRA, peft's trainable strategy-token
    rows (a TrainableTokensWrapper, tied or not) replace those rows of the frozen base, unless the
    adapters are switched off."""
    adapter = getattr(head, "token_adapter", None)
    if adapter is None or adapter.disable_adapters or adapter.merged or not adapter.active_adapters:
        return head.weight
    return adapter.get_merged_weights(adapter.active_adapters)


def head_rows(hidden, head, rows):
    """fp32 logits of the output rows `rows` (R,) for hidden states (..., d): (..., R). fp32 even
    under bf16 autocast or FSDP mixed precision: a log-softmax of bf16 logits is off by ~1e-2."""
    bias = getattr(head, "bias", None)
    bias = bias[rows].float() if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head_weight(head)[rows].float(), bias)


def _chunk_logps(hidden, weight, bias, targets, temperature):
    with torch.autocast(hidden.device.type, enabled=False):                       # fp32, as in head_rows
        logits = F.linear(hidden.float(), weight, bias) / temperature             # (n, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)   # (n,)


def target_logps(model, ids, attn, target_mask, temperature=1.0, extra=None, chunk=1024):
    """log pi_T(ids[:, j+1] | ids[:, :j+1]) (B, L-1) where target_mask[:, j+1] is 1, else 0; with
    `extra` (a module on the hidden states, e.g. a value head), also extra(hidden)[:, :-1] (B, L-1).

    Never builds (B, L, V) logits: the head runs only on target positions, `chunk` positions at a
    time, in fp32, and each chunk is recomputed in backward instead of keeping its logits. Equal to
    `token_logps(forward_logits(...))` masked (tested)."""
    dev = model.device
    ids, attn, target_mask = ids.to(dev), attn.to(dev), target_mask.to(dev)
    where = target_mask[:, 1:].bool()                                              # (B, L-1)
    targets = ids[:, 1:][where]                                                    # (N,)

    def fn(hidden, head):
        h = hidden[:, :-1][where]                                                  # (N, d)
        weight = head_weight(head).float()
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        parts = [checkpoint(_chunk_logps, h[i:i + chunk], weight, bias, targets[i:i + chunk], temperature,
                            use_reentrant=False) for i in range(0, len(h), chunk)]
        out = torch.zeros(where.shape, device=hidden.device, dtype=torch.float32)
        out = out.masked_scatter(where, torch.cat(parts)) if parts else out       # (B, L-1)
        if extra is None:
            return out
        return torch.stack([out, extra(hidden[:, :-1].float()).squeeze(-1)], -1)   # (B, L-1, 2)
    with head_only(model, fn):
        out = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return out if extra is None else (out[..., 0], out[..., 1])
