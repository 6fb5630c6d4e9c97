"""The KV cache kept across turns (engine.Context) changes speed, not results: the cached path gives
the same logits, the same sampled dialogues and the same recorded log-probs as re-encoding every
history from scratch."""
import copy
import random

import pytest
import torch

import data
import engine
import lm
import rollout as rollout_lib
from worlds import shop


def test_context_logits_match_full_reencoding(models, tok):
    """Random ragged chunks appended over 6 calls, one row dropped midway, a few single-token decode
    steps: after every call the cached logits equal a fresh left-padded forward over the whole text."""
    model, _ = models
    rng = random.Random(0)
    prompts = [[tok.bos_token_id] + [rng.randrange(5, len(tok)) for _ in range(rng.randint(1, 9))]
               for _ in range(5)]
    cached = engine.Context(model, prompts, tok.pad_token_id, cache=True)
    full = engine.Context(model, prompts, tok.pad_token_id, cache=False)
    for call in range(6):
        a, b = cached.logits(), full.logits()                                    # (B, V)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if call == 2:
            cached.keep([0, 2, 3, 4])
            full.keep([0, 2, 3, 4])
        chunks = [[rng.randrange(5, len(tok)) for _ in range(rng.randint(1, 7))] for _ in cached.ids]
        cached.extend(chunks)
        full.extend(chunks)
    assert cached.ids == full.ids
    # decode fast path: one token per live row, one row finished (its slot is a masked hole)
    live = torch.tensor([True, False, True, True])
    tokens = torch.tensor([7, tok.pad_token_id, 9, 11])
    for ctx in (cached, full):
        ctx.extend([[t] if alive else [] for t, alive in zip(tokens.tolist(), live.tolist())])
    cached.logits()                      # encodes the pending chunk, then decode one token
    full.logits()
    tokens2 = torch.tensor([12, tok.pad_token_id, 13, 14])
    for ctx in (cached, full):
        ctx.extend([[t] if alive else [] for t, alive in zip(tokens2.tolist(), live.tolist())])
    a = cached.logits((tokens2, live))
    b = full.logits()
    torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4)
    assert cached.pos.tolist() == [len(ids) for ids in cached.ids]


def test_cached_rollout_equals_uncached(models, tok):
    """Same seed, same models: cached and uncached rollouts play the same dialogues token for token
    (sampled and greedy), and record the same decision log-probs to float tolerance."""
    expert_model, agent_model = models
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(12, offset=9100)]
    for greedy in (False, True):
        runs = [rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), scenarios, seed=5, cache=cache).play(
                    greedy, max_reply_tokens=10) for cache in (True, False)]
        for a, b in zip(*runs):
            assert a["record"]["turns"] == b["record"]["turns"]
            assert (a["ids"], a["agent_ids"], a["decisions"], a["replies"]) == \
                (b["ids"], b["agent_ids"], b["decisions"], b["replies"])
            torch.testing.assert_close(torch.tensor(a["ref_logps"]), torch.tensor(b["ref_logps"]),
                                       rtol=0, atol=1e-5)
        turns = [len(t["decisions"]) for t in runs[0]]
        assert max(turns) >= 3 and min(turns) < max(turns)    # multi-turn, and rows leave the batch


def test_bench_endless_world_runs_every_dialogue_to_the_horizon(models, tok):
    """experiments/bench.py's turn-scaling measurement is only meaningful if no dialogue ends early."""
    from experiments import bench
    expert_model, agent_model = models
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(6, offset=9200)]
    trajs = rollout_lib.rollout((expert_model, tok), (agent_model, tok), scenarios, bench.endless_world(horizon=5),
                                seed=0, max_reply_tokens=6)
    assert [len(t["decisions"]) for t in trajs] == [5] * 6


# ----------------------------------------------------------------------------- the GPU-speed changes (issue 31)
# Each leaves the dialogues and the recorded log-probs as they were: bit for bit where the arithmetic
# is the same, else within the tolerance the cached path already has against re-encoding.

def play(models, tok, scenarios, greedy=False, seed=5, reply=10):
    expert_model, agent_model = models
    return rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), scenarios, seed=seed).play(
        greedy, max_reply_tokens=reply)


def assert_same_dialogues(a_runs, b_runs, atol=0.0):
    for a, b in zip(a_runs, b_runs, strict=True):
        assert a["record"]["turns"] == b["record"]["turns"]
        assert (a["ids"], a["agent_ids"], a["decisions"], a["replies"]) == \
            (b["ids"], b["agent_ids"], b["decisions"], b["replies"])
        torch.testing.assert_close(torch.tensor(a["ref_logps"]), torch.tensor(b["ref_logps"]), rtol=0, atol=atol)
        torch.testing.assert_close(torch.tensor(a["entropy"]), torch.tensor(b["entropy"]), rtol=0, atol=atol)


def test_sampler_with_cached_constants_draws_the_same_bits():
    """engine.draw (row hashes mixed once per call, column hashes cached) against the formula as it
    was: every hash recomputed at every draw."""
    def uniforms_as_was(keys, counter, n):
        k = engine._mix(engine._mix(keys & engine._M32) ^ ((keys >> 32) & engine._M32))
        k = engine._mix(k ^ ((counter * 0x9E3779B1) & engine._M32))
        cols = engine._mix(torch.arange(n, dtype=torch.int64))
        return ((engine._mix(k[:, None] ^ cols[None, :]) >> 8).float() + 0.5) / float(1 << 24)
    keys = torch.tensor([0, 1, 2**40 + 7, -5, 123456789], dtype=torch.int64)
    rows = engine.row_keys(keys)
    for counter in (0, 1, (2 * 3 + 1) << 12, 2**31 + 5):
        want = uniforms_as_was(keys, counter, 781)
        assert torch.equal(engine.draw(rows, counter, 781), want)
        assert torch.equal(engine.uniforms(keys, counter, 781), want)


def sample_as_was(ctx, stop_id, max_new_tokens, temperature, keys, counter):
    """Context.sample before issue 31: the tokens to the host at every step, `done` asked at every step."""
    start = [len(ids) for ids in ctx.ids]
    logits = ctx.logits()
    done = torch.zeros(len(ctx.ids), dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1) if temperature == 0 else \
            engine.gumbel_argmax(logits / temperature, engine.uniforms(keys, counter + step, logits.shape[-1]))
        live = ~done
        done = done | (nxt == stop_id)
        for ids, t, alive in zip(ctx.ids, nxt.tolist(), live.tolist()):
            if alive:
                ids.append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = ctx.logits((nxt.masked_fill(~live, ctx.pad_id), live))
    return [ids[s:] for ids, s in zip(ctx.ids, start)]


def test_decode_loop_on_the_device_equals_the_per_token_loop(models, tok, monkeypatch):
    """Context.sample keeps tokens and `done` on the device and asks whether all rows are done every
    DONE_CHECK steps, undoing the steps it ran past the end. Against the per-token loop it replaced,
    over three calls (ragged prompts, some rows stopping early, one cut at max_new_tokens): the same
    tokens, then bit for bit the same next logits, positions and cache mask, whether it checks every
    step (CPU's default) or every 8 (a GPU's)."""
    stop = tok.eos_token_id
    agent_model = copy.deepcopy(models[1])      # an untrained model rarely says eos: 4 nats more for it
    agent_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out + 4.0 * (torch.arange(out.shape[-1]) == stop))
    rng = random.Random(1)
    prompts = [[tok.bos_token_id] + [rng.randrange(5, len(tok)) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    undone, undo = [], engine.Context._undo
    monkeypatch.setattr(engine.Context, "_undo", lambda self, *mark: undone.append(1) or undo(self, *mark))
    for temperature, max_new in ((0.0, 9), (1.0, 12), (0.7, 30)):
        ref = engine.Context(agent_model, prompts, tok.pad_token_id)
        keys = torch.arange(6) * 7 + 1
        want = [sample_as_was(ref, stop, max_new, temperature, keys, 3 << 12 | c) for c in range(3)]
        pos, attn, ids = ref.pos, ref.attn, ref.ids
        after = ref.logits()                              # the next call's forward: reads the whole cache
        for every in (1, 3, 8):
            monkeypatch.setitem(engine.DONE_CHECK, "cpu", every)
            ctx = engine.Context(agent_model, prompts, tok.pad_token_id)
            got = [ctx.sample(stop, max_new, temperature, keys, 3 << 12 | c) for c in range(3)]
            assert got == want and ctx.ids == ids
            assert torch.equal(ctx.pos, pos) and torch.equal(ctx.attn, attn)
            assert torch.equal(ctx.logits(), after)
        assert all(any(r[-1] == stop for r in w) for w in want)                      # rows stop early
    assert len(undone) >= 4                 # calls whose rows all stopped between two checks: steps undone


def test_rollouts_do_not_depend_on_how_often_done_is_asked(models, tok, monkeypatch):
    """Whole rollouts with `done` asked every step and every 8: the same dialogues, and the recorded
    decision log-probs and entropies bit for bit (sampled and greedy)."""
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(8, offset=9300)]
    for greedy in (False, True):
        runs = []
        for every in (1, 8):
            monkeypatch.setitem(engine.DONE_CHECK, "cpu", every)
            runs.append(play(models, tok, scenarios, greedy))
        assert_same_dialogues(*runs)


def test_keys_kept_in_the_compute_dtype_change_no_bit(models, tok):
    """GrowingLayer stores K in V's dtype. Under bf16 autocast over fp32 weights K comes out of RoPE
    in fp32 and attention cast it to bf16 at every step; storing it in bf16 gives the same rollouts
    bit for bit (dialogues, log-probs, entropies) as the layer that kept it in fp32, with half the bytes."""
    class KeysAsTheyCome(engine.GrowingLayer):          # the layer before issue 31
        def update(self, key_states, value_states, *args, **kwargs):
            return self.append(key_states, value_states)
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(6, offset=9400)]
    runs, dtypes = [], []
    for layer in (KeysAsTheyCome, engine.GrowingLayer):
        with pytest.MonkeyPatch.context() as mp, lm.autocast(torch.device("cpu"), True):
            mp.setattr(engine, "GrowingLayer", layer)
            runs.append(play(models, tok, scenarios))
            ctx = engine.Context(models[1], [[tok.bos_token_id, 7, 9]] * 2, tok.pad_token_id)
            ctx.logits()
            dtypes.append((ctx.cache.layers[0].keys.dtype, ctx.cache.layers[0].values.dtype))
    assert dtypes == [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
    assert_same_dialogues(*runs)


def test_expert_head_on_its_strategy_rows_plays_the_same_dialogues(models, tok, monkeypatch):
    """The Expert's decision forward runs the output layer on its Z strategy rows only (lm.head_rows),
    not on the whole vocabulary. A matmul over fewer rows may round the last bit differently, so:
    the same dialogues, and log-probs and entropies within 1e-5 of the full head's."""
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(8, offset=9500)]
    rows_only = play(models, tok, scenarios)
    logits = engine.Context.logits

    def full_head(self, appended=None, rows=None):      # the path before: every row, then the Z columns
        out = logits(self, appended)
        return out if rows is None else out[:, rows]
    monkeypatch.setattr(engine.Context, "logits", full_head)
    assert_same_dialogues(rows_only, play(models, tok, scenarios), atol=1e-5)


def test_decode_step_with_a_4d_mask_reads_what_the_2d_mask_says(models, tok, monkeypatch):
    """On a GPU a decode step passes its mask as the 4D boolean mask HF's sdpa path would build
    (engine.MASK_4D: HF's builder asks the device whether the mask has a hole, a host sync per
    forward). Forced on CPU: with holes in the cache (ragged prompts, a rollout's case) the next
    logits equal the 2D mask's bit for bit, at every step; without a hole HF drops its mask and
    SDPA runs unmasked, which may round differently: within 1e-5."""
    _, agent_model = models
    rng = random.Random(2)
    for ragged in (True, False):
        prompts = [[tok.bos_token_id] + [rng.randrange(5, len(tok)) for _ in range(rng.randint(1, 12) if ragged else 7)]
                   for _ in range(5)]
        out = []
        for on in (False, True):
            monkeypatch.setitem(engine.MASK_4D, "cpu", on)
            ctx = engine.Context(agent_model, prompts, tok.pad_token_id)
            logits, steps = ctx.logits(), []
            live = torch.tensor([True, True, not ragged, True, True])       # ragged: one row finished too
            for _ in range(4):
                logits = ctx.logits((logits.argmax(-1), live))
                steps.append(logits)
            out.append(torch.stack(steps))
        if ragged:
            assert torch.equal(*out)
        else:
            torch.testing.assert_close(*out, rtol=0, atol=1e-5)
