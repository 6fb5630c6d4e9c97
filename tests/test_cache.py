"""The KV cache kept across turns (engine.Context) changes speed, not results: the cached path gives
the same logits, the same sampled dialogues and the same recorded log-probs as re-encoding every
history from scratch."""
import random

import torch

import data
import engine
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
