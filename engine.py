"""Generation: the multi-turn KV cache and sampling, on the model's device.

A rollout is hundreds of small forwards over B dialogues that grow turn by turn. Two things make
that fast and reproducible:

  - `Context` keeps each model's KV cache across turns, so a turn encodes only its new tokens,
    never the history again (`GrowingLayer` makes appending O(new tokens));
  - sampling is Gumbel-max with *counter-based* noise (`uniforms`): the uniforms of a row are a
    pure function of (the row's key, a counter, the column). They are made on the device, for the
    whole (B, V) block at once (no host copy of the logits, no per-row generator), and a dialogue's
    dice never depend on which other dialogues share its batch: the same dialogues whether the
    rollouts run in one process, on several ranks, or on CPU or GPU (up to float rounding of
    the logits).
"""
import contextlib
import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

import lm


# ----------------------------------------------------------------------------- counter-based noise
_M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (xor-shift-multiply), on int64 tensors holding values in [0, 2^32);
    no product exceeds 2^59, so int64 never overflows, and CPU and CUDA give the same bits."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def uniforms(keys, counter, n):
    """(B, n) float32 uniforms in (0, 1), where row b is a pure function of (keys[b], counter, column).

    keys: (B,) int64 (any values: a dialogue's seed); counter: a Python int (which draw of that
    dialogue: its turn, its token step). 24 random bits per value, so 1.0 is never reached."""
    return draw(row_keys(keys), counter, n)


def row_keys(keys):
    """The counter-free half of `uniforms`' row hash, (B,) int64: a decode loop mixes it once per
    call, not once per token."""
    return _mix(_mix(keys & _M32) ^ ((keys >> 32) & _M32))


def draw(rows, counter, n):
    """`uniforms` from the row hashes `row_keys(keys)` (B,): the same bits."""
    k = _mix(rows ^ ((counter * 0x9E3779B1) & _M32))                                 # (B,)
    h = _mix(k[:, None] ^ _columns(n, rows.device)[None, :])                          # (B, n)
    return ((h >> 8).float() + 0.5) / float(1 << 24)


@functools.lru_cache(maxsize=16)
def _columns(n, device):
    """The column hashes (n,) int64, the same for every draw over n columns: made once per (n, device)
    (8 bytes a column: 1.2 MB for Qwen's 151,936), not at every token."""
    return _mix(torch.arange(n, device=device, dtype=torch.int64))


def gumbel_argmax(scores, uniforms):
    """An exact sample from softmax(scores) (Gumbel-max), cheaper than torch.multinomial:
    scores (..., K), uniforms (..., K) in (0, 1). -inf scores are never chosen."""
    return (scores - (-uniforms.clamp(min=1e-20).log()).log()).argmax(-1)


# How often the decode loop asks whether every row is done, per device type: the question is a host
# sync, free on CPU (so every step, as before: no wasted forwards), a pipeline stall on a GPU. The
# steps run past the end are undone (Context.sample), so any value gives the same dialogues.
DONE_CHECK = {"cpu": 1, "cuda": 8}
# Where a decode step passes its mask as the 4D boolean mask HF's sdpa path would build from the 2D one:
# HF's builder first asks the device whether the 2D mask has a hole (a host sync in every forward);
# a 4D mask skips the builder. The same SDPA inputs where the cache has a hole (a rollout's does
# from its first left-padded prefill on), so CPU keeps the 2D mask and its numbers in every case.
MASK_4D = {"cuda": True}


# ----------------------------------------------------------------------------- KV cache
class GrowingLayer(DynamicLayer):
    """A KV-cache layer whose buffers grow geometrically, so appending n tokens costs O(n) instead of
    copying the whole cache (DynamicLayer's torch.cat per step makes a dialogue quadratic).
    keys/values are views of the first `n` slots of the (B, H, capacity, D) buffers."""

    def update(self, key_states, value_states, *args, **kwargs):
        # K arrives in fp32 under autocast over fp32 weights (RoPE runs on the fp32 residual) while V is
        # bf16; attention casts K to bf16 anyway, so keeping it in V's dtype gives the same bits with
        # half the cache and no re-cast of the whole cache in every layer at every step
        return self.append(key_states.to(value_states.dtype), value_states)

    def append(self, key_states, value_states):
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

    def truncate(self, n):
        """Forget every slot from n on (the decode loop's steps past the end of a turn)."""
        if self.is_initialized and self.n > n:
            self.n = n
            self.keys, self.values = self.buf_k[:, :, :n], self.buf_v[:, :, :n]

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
    logits (B, V), fp32, on the model's device. With cache=True the KV cache is kept across calls,
    and so across turns: a turn encodes only its new tokens, never the history again. Each call
    appends one left-padded chunk to the cache, so a row's cache may hold masked holes; positions
    count real tokens only, so the model sees exactly the unpadded dialogue. With cache=False every
    call re-encodes the whole history, left-padded: the slow reference path that the cached one is
    tested against. `keep(rows)` drops finished dialogues from the batch and the cache.
    n_vocab: logits past the tokenizer's vocabulary are cut off (a model's embedding matrix is often
    padded beyond it, e.g. Qwen2.5: 151,936 rows, 151,665 tokens), so no unknown id is ever sampled.
    """

    def __init__(self, model, prompts, pad_id, cache=True, n_vocab=None):
        self.model, self.pad_id, self.use_cache, self.n_vocab = model, pad_id, cache, n_vocab
        self.ids = [list(p) for p in prompts]
        dev = model.device      # the cache's bookkeeping lives beside it: no host sync per token
        self.pos = torch.zeros(len(prompts), dtype=torch.long, device=dev)   # (B,) tokens of each row in the cache
        self.cache, self.attn = None, None                                   # attn (B, S): real (1) or hole (0)

    @classmethod
    def shared(cls, model, prefix, n, pad_id, n_vocab=None):
        """n rows that all start with the same `prefix` ids, encoded once (one row's forward) and its
        cache copied to every row: a prompted planner's system prompt, the same in every dialogue."""
        one = cls(model, [prefix], pad_id, n_vocab=n_vocab)
        one.logits()
        ctx = cls(model, [prefix] * n, pad_id, n_vocab=n_vocab)
        rows = torch.zeros(n, dtype=torch.long, device=model.device)
        slots = torch.arange(len(prefix), device=model.device).expand(n, -1)
        for layer in one.cache.layers:
            layer.select(rows, slots)
        ctx.cache, ctx.attn, ctx.pos = one.cache, one.attn.expand(n, -1).clone(), one.pos.expand(n).clone()
        return ctx

    def extend(self, rows):
        for ids, new in zip(self.ids, rows):
            ids += new

    def keep(self, rows):
        """Drop every row not in `rows`, then squeeze the holes out of the cache: each row's real
        slots move to the right end, in order (keys already carry their rotary positions), so
        attention never spans more slots than the longest dialogue. Once per turn: O(cache)."""
        self.ids = [self.ids[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.pos.device)
        self.pos = self.pos[index]
        if self.cache is None or not rows:
            return
        real = self.attn[index]                                                      # (B, S)
        n_slots = int(real.sum(1).max())                                             # one sync per turn
        if len(rows) == len(self.attn) and n_slots > 0.75 * real.shape[1]:
            return                                         # no row dropped, few holes: not worth a copy
        slots = torch.sort(real, dim=1, stable=True).indices[:, real.shape[1] - n_slots:]   # (B, S')
        for layer in self.cache.layers:
            layer.select(index, slots)
        self.attn = real.gather(1, slots)

    @torch.no_grad()
    def logits(self, appended=None, rows=None):
        """Next-token logits (B, V) after each row's last token (meaningless for a row with no new
        token). appended: (tokens (B,), live (B,) bool) on the device, the one token per live row just
        sampled: the decode fast path, which feeds the tensors instead of rebuilding a chunk from
        lists (with the cache only; the caller keeps `ids`). rows: only these output rows (R,) of the
        vocabulary, (B, R), fp32 (lm.head_rows: the Expert reads its Z strategy rows, not 150k)."""
        dev = self.model.device
        head = contextlib.nullcontext() if rows is None else \
            lm.head_only(self.model, lambda hidden, out: lm.head_rows(hidden, out, torch.tensor(rows, device=dev)))
        if not self.use_cache:
            ids, attn = lm.pad(self.ids, self.pad_id, left=True)
            with head:
                out = lm.forward_logits(self.model, ids, attn, logits_to_keep=1)[:, -1]
            return out.float() if rows is not None else out[:, :self.n_vocab].float()
        if appended is not None:
            chunk, mask = appended[0][:, None], appended[1].long()[:, None]                # (B, 1)
        else:   # left-padded, so every row's last new token is the last column
            chunk, mask = lm.pad([ids[p:] for ids, p in zip(self.ids, self.pos.tolist())], self.pad_id, left=True)
            chunk, mask = chunk.to(dev), mask.to(dev)
        pos = (self.pos[:, None] + mask.cumsum(1) - 1).clamp(min=0)                 # (B, C) real tokens only
        attn = mask if self.attn is None else torch.cat([self.attn, mask], 1)        # (B, S + C)
        if self.cache is None:
            self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        name = cache_argument(self.model)
        mask_4d = appended is not None and MASK_4D.get(dev.type, False) and _plain_sdpa(self.model.config)
        with head:   # mask (B, 1, 1, S + 1) for a one-token step: it attends to every real slot
            out = self.model(input_ids=chunk, attention_mask=attn.bool()[:, None, None, :] if mask_4d else attn,
                             position_ids=pos, **{name: self.cache}, use_cache=True, logits_to_keep=1)
        self.cache, self.attn = getattr(out, name), attn
        self.pos = self.pos + mask.sum(1)              # a new tensor: `sample` keeps the old one to roll back
        return out.logits[:, -1].float() if rows is not None else out.logits[:, -1, :self.n_vocab].float()

    def sample(self, stop_id, max_new_tokens=32, temperature=1.0, keys=None, counter=0):
        """Append one sampled continuation to every row (greedy when temperature == 0), each ending
        at `stop_id` or cut at max_new_tokens. Returns the B lists of new ids.

        keys (B,) int64, one per row, and counter: token step s of this call draws
        `uniforms(keys, counter + s, V)`, so a row's sample depends on its key alone.

        The loop stays on the device: tokens, `done` and the mask never come to the host but once at
        the end (one `.tolist()` per call), and whether every row is done is asked only every
        DONE_CHECK[device] steps. The steps run past the last row's stop are undone (their tokens
        dropped, their cache slots truncated, positions restored), so the ids, the cache and the
        numbers are exactly those of stopping at once; the noise is counter-based, so no stream moves."""
        start = [len(ids) for ids in self.ids]
        logits = self.logits()                                                      # (B, V) on the device
        dev = logits.device
        done = torch.zeros(len(self.ids), dtype=torch.bool, device=dev)
        rows = row_keys(keys.to(dev)) if temperature != 0 else None                   # (B,)
        every = DONE_CHECK.get(dev.type, 8) if self.use_cache else 1
        steps, marks = [], []              # the tokens (B,) of each step; (pos, slots) before each forward
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = gumbel_argmax(logits / temperature, draw(rows, counter + step, logits.shape[-1]))
            live = ~done
            done = done | (nxt == stop_id)
            steps.append(nxt)
            if not self.use_cache:         # the reference path re-encodes `ids`: they grow every step
                self.extend([[t] if alive else [] for t, alive in zip(nxt.tolist(), live.tolist())])
            if step == max_new_tokens - 1 or ((step + 1) % every == 0 and bool(done.all())):
                break          # the last tokens are encoded by the next call, with what follows them
            marks.append((self.pos, self.attn.shape[1] if self.attn is not None else 0))
            logits = self.logits((nxt.masked_fill(~live, self.pad_id), live))
        if not self.use_cache:
            return [ids[s:] for ids, s in zip(self.ids, start)]
        tokens = torch.stack(steps, 1).tolist()                          # (B, steps): the one host copy
        ends = [row.index(stop_id) + 1 if stop_id in row else len(row) for row in tokens]
        if all(stop_id in row for row in tokens) and max(ends) < len(steps):
            self._undo(*marks[max(ends) - 1])   # steps past the last stop: as if the loop had stopped there
        self.extend([row[:e] for row, e in zip(tokens, ends)])
        return [ids[s:] for ids, s in zip(self.ids, start)]

    def _undo(self, pos, n_slots):
        """Roll the cache back to `n_slots` slots and the positions to `pos` (a decode step's mark)."""
        self.pos, self.attn = pos, self.attn[:, :n_slots]
        for layer in self.cache.layers:
            layer.truncate(n_slots)               # every layer holds as many slots as `attn` has columns


def _plain_sdpa(config):
    """SDPA attention with full attention in every layer: a 4D boolean mask means there what HF's
    own builder would make (eager wants an additive mask; a sliding window, another mask per layer)."""
    return config._attn_implementation == "sdpa" and all(
        t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))


def generate(model, prompts, pad_id, stop_id, max_new_tokens=32, temperature=1.0, keys=None, counter=0,
             n_vocab=None):
    """Batched sampling with a KV cache; greedy when temperature == 0. prompts: B id lists; keys:
    (B,) int64 noise keys (see `Context.sample`). Returns B lists of new ids, each ending at
    `stop_id` (or cut at max_new_tokens)."""
    return Context(model, prompts, pad_id, n_vocab=n_vocab).sample(stop_id, max_new_tokens, temperature, keys, counter)
