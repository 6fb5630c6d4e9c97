"""Real data: the logged-context world (worlds/logged.py) and the --data pipeline through train.py and eval.py."""
import json
import os
import random
import subprocess
import sys

import pytest

from worlds import logged
from conftest import ROOT, hf_env

MGSHOP = os.path.join(ROOT, "..", "shared", "data", "MGShopDial.json")
MULTIWOZ = os.path.join(ROOT, "tests", "fixtures", "multiwoz")
needs_mgshop = pytest.mark.skipif(not os.path.isfile(MGSHOP), reason=f"MG-ShopDial not found at {MGSHOP} "
                                  "(download MGShopDial.json from its public repository)")


def hand_log():
    """Two tiny dialogues: 'ask' replies are followed by 'answer' events, 'offer' ones by 'accept'."""
    def rec(i, turns, success):
        return {"id": f"d{i}", "source": "test", "scenario": {}, "success": success, "ref_strategies": [],
                "turns": [{"role": r, "text": x, "strategy": z, "event": e} for r, x, z, e in turns]}
    return [rec(0, [("customer", "hi", None, None), ("agent", "what do you need", "ask", None),
                    ("customer", "a lamp", None, "answer"), ("agent", "take this lamp", "offer", None),
                    ("customer", "deal", None, "accept")], True),
            rec(1, [("customer", "hello", None, None), ("agent", "what do you need today", "ask", None),
                    ("customer", "a chair", None, "answer"), ("agent", "what size do you need", "ask", None),
                    ("customer", "big", None, "answer")], False)]


def test_recogniser_learns_the_training_labels():
    log = hand_log()
    turns = [t for r in log for t in r["turns"] if t["role"] == "agent"]
    rec = logged.Recogniser([t["text"] for t in turns], [t["strategy"] for t in turns])
    assert rec("what do you need") == "ask" and rec("take this lamp") == "offer"
    assert rec("take it") == "offer"          # the word "take" was only seen with offer


def test_customer_model_counts_probabilities_and_success():
    """P(e | recognised z, previous e) on a hand-made log: counts + 1 over 2 events."""
    log = hand_log()
    turns = [t for r in log for t in r["turns"] if t["role"] == "agent"]
    model = logged.CustomerModel(log, logged.Recogniser([t["text"] for t in turns], [t["strategy"] for t in turns]))
    assert model.events == ["accept", "answer"]
    assert model.probs("ask", None) == {"accept": 1 / 4, "answer": 3 / 4}     # (0+1)/4, (2+1)/4
    assert model.probs("offer", "answer") == {"accept": 2 / 3, "answer": 1 / 3}
    assert model.p_success == {"accept": 2 / 3, "answer": 1 / 3}           # last events: accept (won), answer


@pytest.mark.parametrize("dataset", [pytest.param("mgshop", marks=needs_mgshop), "multiwoz"])
def test_customer_model_sums_to_one_and_never_speaks_test_lines(dataset):
    splits = logged.load_splits(dataset, MGSHOP if dataset == "mgshop" else MULTIWOZ)
    world = logged.make_world(splits["train"], [r for v in splits.values() for r in v])
    model = world.customer_model
    train_lines = {t["text"] for r in splits["train"] for t in r["turns"] if t["role"] == "customer"}
    test_only = {t["text"] for r in splits["test"] for t in r["turns"] if t["role"] == "customer"} - train_lines
    assert test_only, "the test split should have customer lines of its own"
    rng = random.Random(0)
    for z in world.STRATEGIES:
        for prev in [None, *model.events]:
            assert sum(model.probs(z, prev).values()) == pytest.approx(1.0)
            for _ in range(20):
                line, event = model.respond(z, prev, rng)
                assert line in train_lines and line not in test_only and event in model.events
    # the recogniser saw only training text: a word found only in test agent turns is unknown to it
    train_words = {w for r in splits["train"] for t in r["turns"] if t["role"] == "agent"
                   for w in logged.features(t["text"])}
    test_words = {w for r in splits["test"] for t in r["turns"] if t["role"] == "agent"
                  for w in logged.features(t["text"])} - train_words
    assert test_words and not any(w in world.recognise.log_p[z] for z in world.recognise.labels for w in test_words)


def test_multiwoz_fixture_train_and_eval(tmp_path):
    """load -> train (a few steps) -> eval on the fixture's test split, through the two CLIs."""
    env = hf_env()
    args = ["--data", "multiwoz", "--data-path", MULTIWOZ, "--out", str(tmp_path), "--sft-steps", "3",
            "--sft-window-steps", "1", "--iters", "1", "--scenarios", "2", "--k", "2", "--cs-samples", "2",
            "--d-model", "32"]
    for cmd in (["train.py", *args], ["eval.py", str(tmp_path / "gopo")]):
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "gopo"
    split = json.load(open(run / "split.json"))
    assert split["test"] and not set(split["test"]) & set(split["train"])
    result = json.load(open(run / "eval.json"))
    assert result["n_scenarios"] == len(split["test"]) and result["data"] == "multiwoz"
    for method in ("gopo", "sft", "human"):
        for k in ("tse", "esndcg", "gre", "bleu", "rouge_l"):
            lo, hi = result[method][k]["ci95"]
            assert 0.0 <= lo <= result[method][k]["mean"] <= hi <= 1.0, (method, k, lo, hi)   # scores in [0, 1]
    # the human row's own replies and strategies: 1 in every dialogue, a score, so a zero-width
    # interval (a Wilson interval, applied because the values were all 1, gave BLEU 1.000 [0.676, 1.000])
    for k in ("bleu", "rouge_l", "esndcg"):
        assert result["human"][k] == {"mean": 1.0, "ci95": [1.0, 1.0]}, (k, result["human"][k])
    values = json.load(open(run / "values.json"))
    assert values and all(0 <= v <= 1 for v in values.values())
