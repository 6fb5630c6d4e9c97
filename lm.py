"""Shared language-model helpers: tokenizer and tiny model, dialogue serialization, log-probs, sampling.

Both agents read the same serialized dialogue, built segment by segment so token positions are
known exactly (no re-tokenization drift between rollout and scoring):

    <|bos|>  C: Hi.<|eot|>  <|strategy:greet|> (greet the customer)\nA: Hello and welcome!<|eot|>
    C: Hi, I want a laptop.<|eot|>  <|strategy:elicit_need|> (...)\nA: What matters most...<|eot|> ...

  - the Expert's decision at agent turn t is the strategy token: its log-prob comes from the
    logits one position earlier, restricted to the strategy tokens and masked to the SOP set;
  - the CS Agent's reply is the span after "\nA:" up to and including <|eot|>.
"""
import functools
import inspect
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.cache_utils import Cache, DynamicLayer

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
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token     # only ever under a zero attention mask
    if tok.bos_token is None and not chat_parts(tok)[0]:
        tok.bos_token = tok.eos_token     # a dialogue needs an opening token
    add_strategy_tokens(model, tok, strategies)
    return model, tok


def add_strategy_tokens(model, tokenizer, strategies):
    """Make sure every strategy has its own token; new rows start at the mean embedding of its name.

    For a tokenizer trained with the strategy tokens (the tiny model) only the initialisation runs.
    """
    tokens = [strategy_token(z) for z in strategies]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for z, t in zip(strategies, tokens):
            name_ids = tokenizer.encode(" " + z.replace("_", " "), add_special_tokens=False)
            emb[tokenizer.convert_tokens_to_ids(t)] = emb[name_ids].mean(0)
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


def forward_logits(model, ids, attn, logits_to_keep=0):
    """Logits (B, L, V) for a padded batch (the last `logits_to_keep` positions only, if > 0); left
    padding is handled with explicit positions."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, pos = ids.to(model.device), attn.to(model.device), pos.to(model.device)
    return model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=logits_to_keep).logits


def token_logps(logits, ids):
    """log p(ids[:, i] | ids[:, :i]) for i >= 1: (B, L-1)."""
    return torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, ids[:, 1:, None]).squeeze(2)


def gumbel_argmax(scores, uniforms):
    """An exact sample from softmax(scores) (Gumbel-max), cheaper than torch.multinomial on CPU:
    scores (..., K), uniforms (..., K) in (0, 1). -inf scores are never chosen."""
    return (scores - (-uniforms.clamp(min=1e-20).log()).log()).argmax(-1)


class GrowingLayer(DynamicLayer):
    """A KV-cache layer whose buffers grow geometrically, so appending n tokens costs O(n) instead of
    copying the whole cache (DynamicLayer's torch.cat per step makes a dialogue quadratic).
    keys/values are views of the first `n` slots of the (B, H, capacity, D) buffers."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buf_k = self.buf_v = None
            self.n = 0
        n, add = self.n, key_states.shape[-2]
        if self.buf_k is None or n + add > self.buf_k.shape[-2]:
            B, H, _, D = key_states.shape
            cap = max(2 * (n + add), 64)
            k, v = key_states.new_empty(B, H, cap, D), value_states.new_empty(B, H, cap, D)
            if n:
                k[:, :, :n], v[:, :, :n] = self.buf_k[:, :, :n], self.buf_v[:, :, :n]
            self.buf_k, self.buf_v = k, v
        self.buf_k[:, :, n:n + add] = key_states
        self.buf_v[:, :, n:n + add] = value_states
        self.n = n + add
        self.keys, self.values = self.buf_k[:, :, :self.n], self.buf_v[:, :, :self.n]
        return self.keys, self.values

    def select(self, rows, slots):
        """Keep batch rows `rows` (B',) and, for each kept row, its cache slots `slots` (B', S')."""
        if self.is_initialized and self.n:
            r, s = rows[:, None], slots                                   # (B', 1), (B', S')
            self.buf_k = self.keys[r, :, s].transpose(1, 2)               # (B', S', H, D) -> (B', H, S', D)
            self.buf_v = self.values[r, :, s].transpose(1, 2)
            self.n = slots.shape[1]
            self.keys, self.values = self.buf_k, self.buf_v

    def batch_select_indices(self, indices):
        self.select(indices, torch.arange(self.n, device=self.keys.device).expand(len(indices), -1))


def cache_argument(model):
    """The name under which this model's forward takes and returns the KV cache: `past_key_values`
    in transformers 5.17 (the GPU image), `cache` in 5.24, where the old name still works but is
    deprecated (to be removed in 5.40)."""
    return _cache_argument(type(model))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class):
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Context:
    """The growing token contexts of B dialogues for one model: the rollout's state.

    `ids` (B id lists) is the text so far; `extend(rows)` appends tokens without running the model;
    `logits()` runs the model on every token not yet encoded and returns each row's next-token
    logits (B, V). With cache=True the KV cache is kept across calls, and so across turns: a turn
    encodes only its new tokens, never the history again. Each call appends one left-padded chunk
    to the cache, so a row's cache may hold masked holes; positions count real tokens only, so the
    model sees exactly the unpadded dialogue. With cache=False every call re-encodes the whole
    history, left-padded: the slow reference path that the cached one is tested against.
    `keep(rows)` drops finished dialogues from the batch and the cache.
    """

    def __init__(self, model, prompts, pad_id, cache=True):
        self.model, self.pad_id, self.use_cache = model, pad_id, cache
        self.ids = [list(p) for p in prompts]
        self.pos = torch.zeros(len(prompts), dtype=torch.long)   # (B,) tokens of each row in the cache
        self.cache, self.attn = None, None                       # attn (B, S): real (1) or hole (0)

    def extend(self, rows):
        for ids, new in zip(self.ids, rows):
            ids += new

    def keep(self, rows):
        """Drop every row not in `rows`, then squeeze the holes out of the cache: each row's real
        slots move to the right end, in order (keys already carry their rotary positions), so
        attention never spans more slots than the longest dialogue. Once per turn: O(cache)."""
        self.ids = [self.ids[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long)
        self.pos = self.pos[index]
        if self.cache is None or not rows:
            return
        real = self.attn[index]                                                      # (B, S), CPU
        n_slots = int(real.sum(1).max())
        if len(rows) == len(self.attn) and n_slots > 0.75 * real.shape[1]:
            return                                         # no row dropped, few holes: not worth a copy
        slots = torch.sort(real, dim=1, stable=True).indices[:, real.shape[1] - n_slots:]   # (B, S')
        dev = self.model.device
        for layer in self.cache.layers:
            layer.select(index.to(dev), slots.to(dev))
        self.attn = real.gather(1, slots)

    @torch.no_grad()
    def logits(self, appended=None):
        """Next-token logits (B, V) after each row's last token (meaningless for a row with no new
        token). appended: (tokens (B,), live (B,) bool), the one token per live row just extended:
        the decode fast path, which feeds the tensor instead of rebuilding a chunk from lists."""
        if not self.use_cache:
            ids, attn = pad(self.ids, self.pad_id, left=True)
            return forward_logits(self.model, ids, attn, logits_to_keep=1)[:, -1].float().cpu()
        if appended is not None:
            chunk, mask = appended[0][:, None], appended[1].long()[:, None]          # (B, 1)
        else:   # left-padded, so every row's last new token is the last column
            chunk, mask = pad([ids[p:] for ids, p in zip(self.ids, self.pos.tolist())], self.pad_id, left=True)
        pos = (self.pos[:, None] + mask.cumsum(1) - 1).clamp(min=0)                 # (B, C) real tokens only
        attn = mask if self.attn is None else torch.cat([self.attn, mask], 1)        # (B, S + C)
        if self.cache is None:
            self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        dev = self.model.device
        name = cache_argument(self.model)
        out = self.model(input_ids=chunk.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                         **{name: self.cache}, use_cache=True, logits_to_keep=1)
        self.cache, self.attn = getattr(out, name), attn
        self.pos += mask.sum(1)
        return out.logits[:, -1].float().cpu()

    def sample(self, stop_id, max_new_tokens=32, temperature=1.0, generator=None, generators=None):
        """Append one sampled continuation to every row (greedy when temperature == 0), each ending
        at `stop_id` or cut at max_new_tokens. Returns the B lists of new ids.

        Randomness: one `generator` for the batch, or `generators`, one per row, each drawing a fixed
        (max_new_tokens, V) block per call, so a row's sample never depends on which other rows
        share its batch (the same dialogues whether rollouts run in one process or split over ranks).
        """
        start = [len(ids) for ids in self.ids]
        done = torch.zeros(len(self.ids), dtype=torch.bool)
        logits = self.logits()
        if temperature and generators is not None:
            block = torch.stack([torch.rand(max_new_tokens, logits.shape[-1], generator=g) for g in generators])
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                u = block[:, step] if generators is not None else torch.rand(logits.shape, generator=generator)
                nxt = gumbel_argmax(logits / temperature, u)
            live = ~done
            for ids, t, alive in zip(self.ids, nxt.tolist(), live.tolist()):
                if alive:
                    ids.append(t)
            done = done | (nxt == stop_id)
            if done.all() or step == max_new_tokens - 1:
                break          # the last tokens are encoded by the next call, with what follows them
            logits = self.logits((nxt.masked_fill(~live, self.pad_id), live))
        return [ids[s:] for ids, s in zip(self.ids, start)]


def generate(model, prompts, pad_id, stop_id, max_new_tokens=32, temperature=1.0, generator=None):
    """Batched sampling with a KV cache; greedy when temperature == 0.

    prompts: list of B id lists. Returns B lists of new ids, each ending at `stop_id` (or cut at
    max_new_tokens).
    """
    return Context(model, prompts, pad_id).sample(stop_id, max_new_tokens, temperature, generator)
