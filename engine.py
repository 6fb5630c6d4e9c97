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
    k = _mix(_mix(keys & _M32) ^ ((keys >> 32) & _M32))                              # (B,)
    k = _mix(k ^ ((counter * 0x9E3779B1) & _M32))                                    # (B,)
    cols = _mix(torch.arange(n, device=keys.device, dtype=torch.int64))              # (n,)
    h = _mix(k[:, None] ^ cols[None, :])                                             # (B, n)
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def gumbel_argmax(scores, uniforms):
    """An exact sample from softmax(scores) (Gumbel-max), cheaper than torch.multinomial:
    scores (..., K), uniforms (..., K) in (0, 1). -inf scores are never chosen."""
    return (scores - (-uniforms.clamp(min=1e-20).log()).log()).argmax(-1)


# ----------------------------------------------------------------------------- KV cache
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
        self.pos = torch.zeros(len(prompts), dtype=torch.long)   # (B,) tokens of each row in the cache
        self.cache, self.attn = None, None                       # attn (B, S): real (1) or hole (0)

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
        the decode fast path, which feeds the tensors instead of rebuilding a chunk from lists."""
        dev = self.model.device
        if not self.use_cache:
            ids, attn = lm.pad(self.ids, self.pad_id, left=True)
            out = lm.forward_logits(self.model, ids, attn, logits_to_keep=1)[:, -1]
            return out[:, :self.n_vocab].float()
        if appended is not None:
            chunk, mask = appended[0][:, None].cpu(), appended[1].long()[:, None].cpu()   # (B, 1)
        else:   # left-padded, so every row's last new token is the last column
            chunk, mask = lm.pad([ids[p:] for ids, p in zip(self.ids, self.pos.tolist())], self.pad_id, left=True)
        pos = (self.pos[:, None] + mask.cumsum(1) - 1).clamp(min=0)                 # (B, C) real tokens only
        attn = mask if self.attn is None else torch.cat([self.attn, mask], 1)        # (B, S + C)
        if self.cache is None:
            self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        name = cache_argument(self.model)
        out = self.model(input_ids=chunk.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                         **{name: self.cache}, use_cache=True, logits_to_keep=1)
        self.cache, self.attn = getattr(out, name), attn
        self.pos += mask.sum(1)
        return out.logits[:, -1, :self.n_vocab].float()

    def sample(self, stop_id, max_new_tokens=32, temperature=1.0, keys=None, counter=0):
        """Append one sampled continuation to every row (greedy when temperature == 0), each ending
        at `stop_id` or cut at max_new_tokens. Returns the B lists of new ids.

        keys (B,) int64, one per row, and counter: token step s of this call draws
        `uniforms(keys, counter + s, V)`, so a row's sample depends on its key alone."""
        start = [len(ids) for ids in self.ids]
        logits = self.logits()                                                      # (B, V) on the device
        done = torch.zeros(len(self.ids), dtype=torch.bool, device=logits.device)
        keys = keys.to(logits.device) if keys is not None else None
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = gumbel_argmax(logits / temperature, uniforms(keys, counter + step, logits.shape[-1]))
            live = ~done
            done = done | (nxt == stop_id)
            for ids, t, alive in zip(self.ids, nxt.tolist(), live.tolist()):      # one host sync per token
                if alive:
                    ids.append(t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break          # the last tokens are encoded by the next call, with what follows them
            logits = self.logits((nxt.masked_fill(~live, self.pad_id), live))
        return [ids[s:] for ids, s in zip(self.ids, start)]


def generate(model, prompts, pad_id, stop_id, max_new_tokens=32, temperature=1.0, keys=None, counter=0,
             n_vocab=None):
    """Batched sampling with a KV cache; greedy when temperature == 0. prompts: B id lists; keys:
    (B,) int64 noise keys (see `Context.sample`). Returns B lists of new ids, each ending at
    `stop_id` (or cut at max_new_tokens)."""
    return Context(model, prompts, pad_id, n_vocab=n_vocab).sample(stop_id, max_new_tokens, temperature, keys, counter)
