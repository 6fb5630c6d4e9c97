"""Shared language-model helpers: tokenizer and tiny model, dialogue serialization, log-probs, sampling.

Both agents read the same serialized dialogue, built segment by segment so token positions are
known exactly (no re-tokenization drift between rollout and scoring):

    <|bos|>  C: Hi.<|eot|>  <|strategy:greet|> (greet the customer)\nA: Hello and welcome!<|eot|>
    C: Hi, I want a laptop.<|eot|>  <|strategy:elicit_need|> (...)\nA: What matters most...<|eot|> ...

  - the Expert's decision at agent turn t is the strategy token: its log-prob comes from the
    logits one position earlier, restricted to the strategy tokens and masked to the SOP set;
  - the CS Agent's reply is the span after "\nA:" up to and including <|eot|>.

This module stands on parallel.py (saving a sharded model, the SFT loop's gradient all-reduce and
barrier); parallel.py never imports it (its docstring says why).
"""
import contextlib
import functools
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from torch.utils.checkpoint import checkpoint

import parallel

BOS, EOT, PAD = "<|bos|>", "<|eot|>", "<|pad|>"


def strategy_token(z):
    return f"<|strategy:{z}|>"


# ----------------------------------------------------------------------------- tokenizer and model
def train_tokenizer(texts, strategies, vocab_size=1024):
    """Byte-level BPE trained on the run's own text, with one special token per strategy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOT] + [strategy_token(z) for z in strategies]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
                                   pad_token=PAD, padding_side="left")


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
    tok.eos_token = end_of_turn(tok)      # every turn, and every sampled reply, ends with it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token     # only ever under a zero attention mask
    if tok.bos_token is None and not chat_parts(tok)[0]:
        tok.bos_token = tok.eos_token     # a dialogue needs an opening token
    add_strategy_tokens(model, tok, strategies)
    return model, tok


def end_of_turn(tok):
    """The token that ends a turn in the tokenizer's chat template (the first special token after a
    user message), or its end-of-sequence token without a template. They differ for base models:
    Qwen2.5's eos is <|endoftext|>, its template ends turns with <|im_end|>."""
    if not getattr(tok, "chat_template", None):
        return tok.eos_token
    text = tok.apply_chat_template([{"role": "user", "content": "XXX"}, {"role": "assistant", "content": "YYY"}],
                                   tokenize=False)
    after_user = text.split("XXX", 1)[1].split("YYY", 1)[0]
    specials = set(tok.all_special_tokens) | set(tok.get_added_vocab())
    found = [(after_user.find(t), t) for t in specials if t and t in after_user]
    return min(found)[1] if found else tok.eos_token


def add_strategy_tokens(model, tokenizer, strategies):
    """Make sure every strategy has its own token; its new input row (and output row, for a model
    whose output layer is not tied to its input embeddings) starts at the mean of its name's rows.

    For a tokenizer trained with the strategy tokens (the tiny model) only the initialisation runs.
    """
    tokens = [strategy_token(z) for z in strategies]
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


def save(model, tokenizer, path):
    """A folder that `AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)` loads, written atomically.
    Distributed: every rank joins the gather of the full state dict, rank 0 writes."""
    state = parallel.full_state_dict(model) if parallel.FSDP else None
    if parallel.is_main():
        atomic_dir(path, lambda tmp: (model.save_pretrained(tmp, state_dict=state), tokenizer.save_pretrained(tmp)))
    parallel.barrier()


def atomic_dir(path, write):
    """Write a folder so that a crash at any moment leaves either the old folder or the new one.

    `write(tmp)` fills a temporary folder; then the old folder moves aside, the new one takes its
    name and the old one is deleted. A crash between the two renames leaves `path.old`, which
    `recover` puts back.
    """
    tmp, old = path + ".tmp", path + ".old"
    recover(path)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path):
    """Undo a save that died between its two renames; drop half-written temporaries."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.replace(path + ".old", path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def sft_loop(model, step_loss, steps, lr, cycle, desc):
    """The SFT loop both agents share: AdamW, `sft_schedule`, guarded steps, a progress bar.

    step_loss(step) -> scalar loss tensor of this rank's share of that step's batch, scaled with
    `parallel.denominator` (in one process: the batch's loss). Returns the list of losses.
    """
    from tqdm import tqdm
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sft_schedule(s, cycle))
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, disable=not parallel.is_main())):
        loss = step_loss(step)
        if not guarded_step(model, opt, loss):
            bar.write(f"{desc}: non-finite loss or gradient at step {step}, step skipped")
        sched.step()
        losses.append(parallel.total(loss.item()) / parallel.world())   # the loss of the whole batch
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def guarded_step(model, opt, loss, max_norm=1.0):
    """backward + clip + step, unless the loss or the gradient is not finite (then skip, return False)."""
    opt.zero_grad(set_to_none=True)
    if parallel.total(float(not torch.isfinite(loss))):     # any rank: all ranks skip together
        return False
    loss.backward()
    parallel.all_reduce_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm     # FSDP: a DTensor
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    opt.zero_grad(set_to_none=True)      # free the gradients now: rollouts come next, not backward
    return True


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


def activation_checkpointing(model):
    """Recompute each decoder block in backward from its input (non-reentrant). transformers 5.24
    renamed the switch (the old name still works there, with a warning); 5.17 has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model, tokenizer


def sft_schedule(step, cycle):
    """LR multiplier for SFT: 20-step warmup, then linear decay to 0, restarting every `cycle` steps.

    Why restarts: on the tiny models, the copy skill the CS Agent needs (repeat the customer's
    must-have, name the product that has it) appeared reliably after two 100-step cycles and not
    after one 200-step decay (measured in the README's notes).
    """
    s = step % cycle
    return min(1.0, (s + 1) / 20) * (1 - s / cycle)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- serialization
@functools.lru_cache(maxsize=1 << 16)
def _encode(tok, vocab_size, text):
    """Memoised tok.encode (a dialogue repeats its templates and instructions constantly);
    vocab_size is in the key so that adding tokens to a tokenizer never returns a stale encoding."""
    return tuple(tok.encode(text, add_special_tokens=False))


def encode(tok, text):
    return list(_encode(tok, len(tok), text))


@functools.lru_cache(maxsize=None)
def chat_parts(tok):
    """(opening, user_open, assistant_open): the role markers of the tokenizer's chat template, or
    (None, "", "") without one. Found by rendering a user/assistant exchange and cutting it at the
    contents and at the end-of-turn token, e.g. for ChatML (SmolLM2):
      opening "<|im_start|>system\n...<|im_end|>", user_open "\n<|im_start|>user\n",
      assistant_open "\n<|im_start|>assistant\n"."""
    if not getattr(tok, "chat_template", None):
        return None, "", ""
    text = tok.apply_chat_template([{"role": "user", "content": "XXX"}, {"role": "assistant", "content": "YYY"},
                                    {"role": "user", "content": "ZZZ"}], tokenize=False)
    pre, rest = text.split("XXX", 1)
    mid, rest = rest.split("YYY", 1)
    post = rest.split("ZZZ", 1)[0]
    eos = tok.eos_token
    user_open, assistant_open = post.split(eos)[-1], mid.split(eos)[-1]
    for head in (user_open, user_open.lstrip()):   # what opens the dialogue before the first user turn
        if pre.endswith(head):
            return pre[:len(pre) - len(head)], user_open, assistant_open
    return pre, user_open, assistant_open


def start_ids(tok):
    """The tokens that open every dialogue: the chat template's opening (system prompt), or BOS."""
    opening = chat_parts(tok)[0]
    return encode(tok, opening) if opening else [tok.bos_token_id]


def customer_ids(tok, text):
    """A customer turn, then the marker that hands the word to the agent (chat templates only)."""
    _, user_open, assistant_open = chat_parts(tok)
    return encode(tok, user_open + "C: " + text) + [tok.eos_token_id] + \
        (encode(tok, assistant_open) if assistant_open else [])


def agent_prompt_ids(tok, z, instruction):
    """Strategy token, then the one-line instruction the CS Agent follows."""
    return [tok.convert_tokens_to_ids(strategy_token(z))] + encode(tok, f" ({instruction})\nA:")


def flat_prompt_ids(tok):
    """The prompt of a flat agent (the PPO baseline and the no-Expert ablation): no strategy, no
    instruction, only the hand-over to the reply."""
    return encode(tok, "\nA:")


def reply_ids(tok, text):
    return encode(tok, " " + text) + [tok.eos_token_id]


def encode_dialogue(tok, turns, instructions):
    """Serialize a record's turns; instructions=None serializes them for a flat agent (no strategy
    token before a reply, so no decisions).

    Returns ids (list[int]), decisions [(position of the strategy token, strategy)], and
    replies [(start, end)] half-open spans of each agent reply (its <|eot|> included).
    """
    ids, decisions, replies = start_ids(tok), [], []
    for turn in turns:
        if turn["role"] == "customer":
            ids += customer_ids(tok, turn["text"])
        else:
            if instructions is None:
                ids += flat_prompt_ids(tok)
            else:
                decisions.append((len(ids), turn["strategy"]))
                ids += agent_prompt_ids(tok, turn["strategy"], instructions[turn["strategy"]])
            start = len(ids)
            ids += reply_ids(tok, turn["text"])
            replies.append((start, len(ids)))
    return ids, decisions, replies


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


def length_groups(examples, groups=4, n_total=None, length=len):
    """Split a batch into `groups` runs of similar length, each padded and run on its own; summing
    their losses gives the batch's loss. Why: padding a random batch of whole desk dialogues to its
    longest wastes ~40% of the tokens and, attention being quadratic, more of the time (4 groups:
    1.44x faster per SFT step, `python -m experiments.bench --sft RUN`). The count follows from n_total (the whole batch over
    all ranks, default len(examples)), so every rank runs the same number of forwards (FSDP)."""
    n = max(1, min(groups, (n_total or len(examples)) // parallel.world()))
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


def head_rows(hidden, head, rows):
    """fp32 logits of the output rows `rows` (R,) for hidden states (..., d): (..., R). fp32 even
    under bf16 autocast or FSDP mixed precision: a log-softmax of bf16 logits is off by ~1e-2."""
    bias = head.bias[rows].float() if head.bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight[rows].float(), bias)


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
        weight = head.weight.float()
        bias = head.bias.float() if head.bias is not None else None
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
