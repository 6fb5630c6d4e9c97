"""Shared test setup: offline Hugging Face, 2 CPU threads, the repo root on sys.path, and a small
logged corpus with a tokenizer and tiny (untrained) Expert / CS Agent models built the way
train.py builds them.

The model fixtures are session-scoped and read-only: a test that trains a model builds its own.
"""
import atexit
import math
import os
import shutil
import sys
import tempfile

# before transformers are imported anywhere: never touch the network in tests
_HF_HOME = tempfile.mkdtemp(prefix="gopo-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make tiny-model torch ops ~100x slower (measured: a greedy
# rollout of 8 dialogues took 40 s instead of 0.25 s) whenever another process holds one of the
# two cores. Passive waiting removes that; it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))   # 1: how tests/across_machines.sh runs them too

import data  # noqa: E402
import lm  # noqa: E402
import serialize  # noqa: E402
import tse  # noqa: E402
from worlds import shop  # noqa: E402

N_LOGS = 60
TINY = dict(d_model=32, n_layer=2, n_head=2)


def hf_env():
    """Environment for subprocess runs of the CLIs: offline, a private HF_HOME, 2 threads."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=_HF_HOME,
               TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def logs():
    """60 behaviour-policy dialogues on training scenarios (the "typical human agent" logs)."""
    return [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(N_LOGS)]


@pytest.fixture(scope="session")
def values(logs):
    return tse.event_values(logs, shop.SUCCESS_EVENTS)


@pytest.fixture(scope="session")
def tok(logs):
    texts = [t["text"] for r in logs for t in r["turns"]] + list(shop.INSTRUCTIONS.values())
    return lm.train_tokenizer(texts, shop.STRATEGIES, vocab_size=512)


@pytest.fixture(scope="session")
def strategy_ids(tok):
    return [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in shop.STRATEGIES]


def build_models(tok, seed=0):
    """(expert, agent): tiny untrained models, strategy embeddings initialised as train.py does."""
    expert_model = lm.build_tiny_model(tok, seed=seed, **TINY)
    agent_model = lm.build_tiny_model(tok, seed=seed + 1, **TINY)
    for m in (expert_model, agent_model):
        lm.add_strategy_tokens(m, tok, shop.STRATEGIES)
        m.eval()
    return expert_model, agent_model


@pytest.fixture(scope="session")
def models(tok):
    """Session-wide (expert, agent) random models. Read-only: do not train them in a test."""
    return build_models(tok)


@pytest.fixture(scope="session")
def cli_env():
    return hf_env()


def gopo_against_swapped(expert_model, agent_model, tok, scenarios, values, world, args, iters, lr, monkeypatch,
                         check=lambda m: None):
    """GOPO's learning test, shared by the worlds: greedy mean R on `scenarios` at the start, after
    `iters` GOPO iterations (the CS Agent frozen: args.cs_samples = 0), and after the same iterations
    with every preference pair swapped (the control). check(m) sees each iteration's metrics.
    Returns (start, real, swapped)."""
    import copy
    import gopo
    import rollout as rollout_lib

    def mean_R(model):
        trajs = rollout_lib.rollout((model, tok), (agent_model, tok), scenarios, world, greedy=True,
                                    max_reply_tokens=args.max_reply_tokens)
        return tse.mean(gopo.joint_reward(t["record"], values, world.HORIZON)["R"] for t in trajs)

    def run():
        model = copy.deepcopy(expert_model)
        opt_e = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for it in range(iters):
            m = gopo.iteration({"expert": (model, tok), "agent": (agent_model, tok)}, {"expert": opt_e, "agent": None},
                               scenarios, values, world, args, it, seed=it)
            assert m["pairs"] > 0 and m["loss"] is not None and math.isfinite(m["loss"])
            check(m)
        changed = sum(not torch.equal(a, b) for a, b in zip(expert_model.parameters(), model.parameters()))
        assert changed > 0, "the Expert's parameters did not change"
        return mean_R(model)

    start, real = mean_R(expert_model), run()
    original = gopo.build_pairs
    monkeypatch.setattr(gopo, "build_pairs", lambda *a, **k: [(l, w) for w, l in original(*a, **k)])
    return start, real, run()


def kill_after(proc, metrics, n_lines, timeout=300):
    """SIGKILL a running train.py once its metrics.jsonl holds n_lines finished iterations (the
    --resume tests: a run cut off between iterations, with no chance to clean up)."""
    import signal
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n_lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
