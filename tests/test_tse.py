import math
import random
import statistics

import pytest

from tse import (bleu, bootstrap_ci, esndcg, event_values, gre, paired_diff_ci, rate_ci, rouge_l, mean_ci,
                 trajectory_metrics, tse)

VALUES = {"positive": 0.6, "negative": 0.2, "leave": 0.25, "purchase": 1.0}


def rec(events, success, strategies=None, ref=()):
    """A tiny record: opening customer line, then agent/customer pairs with the given events."""
    strategies = strategies or ["s"] * len(events)
    turns = [{"role": "customer", "text": "hi", "strategy": None, "event": None}]
    for z, e in zip(strategies, events):
        turns.append({"role": "agent", "text": "...", "strategy": z, "event": None})
        turns.append({"role": "customer", "text": "...", "strategy": None, "event": e})
    return {"id": "x", "source": "test", "scenario": {}, "turns": turns, "success": success,
            "ref_strategies": list(ref)}


# ----------------------------------------------------------------------------- TSE

def test_tse_hand_success():
    # gamma 0.5, H 4: weights 1, .5, .25, .125 (sum 1.875)
    # v = 0.6 (positive), 1.0 (purchase), then padded with 1, 1 (success)
    # num = 0.6 + 0.5 + 0.25 + 0.125 = 1.475 -> 1.475 / 1.875
    assert tse(["positive", "purchase"], True, VALUES, 4, gamma=0.5) == pytest.approx(1.475 / 1.875)


def test_tse_hand_abandon():
    # v = 0.6, 0.25 (leave), then padded with 0, 0 (failure)
    # num = 0.6 + 0.5 * 0.25 = 0.725 -> 0.725 / 1.875
    assert tse(["positive", "leave"], False, VALUES, 4, gamma=0.5) == pytest.approx(0.725 / 1.875)


def test_tse_none_and_unknown_are_zero():
    # gamma 0.5, H 3: weights 1, .5, .25 (sum 1.75); v = 0 (None), 0 (unknown), 1 (purchase)
    assert tse([None, "weird", "purchase"], True, VALUES, 3, gamma=0.5) == pytest.approx(0.25 / 1.75)


def test_tse_truncates_at_horizon():
    # only the first 3 events count: all positive -> 0.6, whatever comes later
    assert tse(["positive"] * 3 + ["purchase"] * 5, True, VALUES, 3) == pytest.approx(0.6)


def test_tse_early_success_beats_late_and_abandonment_is_lowest():
    early = tse(["purchase"], True, VALUES, 6)
    late = tse(["positive", "positive", "positive", "purchase"], True, VALUES, 6)
    abandon = tse(["positive", "positive", "positive", "leave"], False, VALUES, 6)
    early_abandon = tse(["leave"], False, VALUES, 6)
    assert early == pytest.approx(1.0)
    assert early > late > abandon > early_abandon


def test_tse_bad_horizon():
    with pytest.raises(ValueError):
        tse(["positive"], True, VALUES, 0)


def test_tse_range_random():
    rng = random.Random(0)
    names = ["a", "b", "c", None, "unknown"]
    values = {"a": 0.0, "b": 1.0, "c": 0.37}
    for _ in range(500):
        ev = [rng.choice(names) for _ in range(rng.randint(0, 12))]
        x = tse(ev, rng.random() < 0.5, values, rng.randint(1, 10), gamma=rng.random())
        assert 0.0 <= x <= 1.0 + 1e-12


# ----------------------------------------------------------------------------- ESNDCG

LOG2_3 = math.log2(3)


def test_esndcg_identical():
    assert esndcg(["a", "b", "c", "a"], ["a", "b", "c", "a"]) == pytest.approx(1.0)


def test_esndcg_shifted_hand():
    # pred a,b,c vs ref b,a,c: a@1 -> s=2 (g .5), b@2 -> s=1 (g .5), c@3 -> s=3 (g 1)
    # DCG = .5/log2(2) + .5/log2(3) + 1/log2(4) = .5 + .5/log2 3 + .5
    # IDCG = 1 + 1/log2 3 + 1/2
    dcg = 0.5 + 0.5 / LOG2_3 + 0.5
    idcg = 1 + 1 / LOG2_3 + 0.5
    assert esndcg(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(dcg / idcg)
    assert esndcg(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1.315465 / 2.130930, abs=1e-6)  # = 0.61732


def test_esndcg_lam():
    # with lam 0.25: DCG = .25 + .25/log2 3 + .5
    dcg = 0.25 + 0.25 / LOG2_3 + 0.5
    assert esndcg(["a", "b", "c"], ["b", "a", "c"], lam=0.25) == pytest.approx(dcg / (1.5 + 1 / LOG2_3))


def test_esndcg_tie_prefers_earlier():
    # pred b@2 (0-idx 1) is distance 1 from both ref b@1 and b@3; the earlier one (s=1) is taken,
    # leaving s=3 for pred b@3 at distance 0.
    # pred x,b,b vs ref b,x,b: x@1 -> s=2 (.5), b@2 -> s=1 (.5), b@3 -> s=3 (1) -> same as shifted case
    assert esndcg(["x", "b", "b"], ["b", "x", "b"]) == pytest.approx(esndcg(["a", "b", "c"], ["b", "a", "c"]))
    # taking s=3 for b@2 would leave b@3 matched to s=1 at distance 2; check that score is NOT returned
    wrong = (0.5 + 0.5 / LOG2_3 + 0.25 / 2) / (1.5 + 1 / LOG2_3)
    assert esndcg(["x", "b", "b"], ["b", "x", "b"]) != pytest.approx(wrong)


def test_esndcg_repeats():
    # pred a,a,a vs ref a: only the first a matches (s=1, g 1); ref position used once -> 1/1
    assert esndcg(["a", "a", "a"], ["a"]) == pytest.approx(1.0)
    # pred b,a vs ref a: a@2 -> s=1, g .5, discount log2 3; IDCG 1
    assert esndcg(["b", "a"], ["a"]) == pytest.approx(0.5 / LOG2_3)
    # pred a,a vs ref b,a: a@1 -> s=2 (.5/1); a@2 has no unused a -> 0; IDCG = 1 + 1/log2 3
    assert esndcg(["a", "a"], ["b", "a"]) == pytest.approx(0.5 / (1 + 1 / LOG2_3))


def test_esndcg_pred_longer_than_ref():
    # extra turns after a matched prefix are not penalised
    assert esndcg(["a", "b", "c", "d"], ["a", "b"]) == pytest.approx(1.0)
    # pred c,a,b vs ref a,b: a@2 -> s=1 (.5/log2 3), b@3 -> s=2 (.5/log2 4); IDCG = 1 + 1/log2 3
    assert esndcg(["c", "a", "b"], ["a", "b"]) == pytest.approx((0.5 / LOG2_3 + 0.25) / (1 + 1 / LOG2_3))


def test_esndcg_empty():
    assert esndcg([], []) == 1.0
    assert esndcg(["a"], []) == 0.0
    assert esndcg([], ["a"]) == 0.0
    assert esndcg(["x", "y"], ["a", "b"]) == 0.0


def test_esndcg_range_random():
    rng = random.Random(1)
    for _ in range(2000):
        k = rng.randint(1, 4)  # small alphabets force many repeats and collisions
        pred = [rng.randrange(k) for _ in range(rng.randint(0, 10))]
        ref = [rng.randrange(k) for _ in range(rng.randint(0, 10))]
        x = esndcg(pred, ref, lam=rng.random())
        assert 0.0 <= x <= 1.0 + 1e-12
        if ref and pred[:len(ref)] != ref:
            assert x < 1.0 - 1e-12  # 1 only when pred starts with ref


# ----------------------------------------------------------------------------- event values

def test_event_values_hand():
    log = [
        rec(["positive", "add_to_cart", "purchase"], True),
        rec(["negative", "leave"], False),
        rec(["positive", "objection", "positive", "leave"], False),  # positive counted once here
        rec(["ask", "positive", "purchase"], True),
    ]
    v = event_values(log)
    assert v["positive"] == pytest.approx((2 + 1) / (3 + 2))   # in r1, r3, r4; 2 successes
    assert v["negative"] == pytest.approx((0 + 1) / (1 + 2))   # r2 only
    assert v["leave"] == pytest.approx((0 + 1) / (2 + 2))      # r2, r3
    assert v["add_to_cart"] == pytest.approx((1 + 1) / (1 + 2))
    assert v["objection"] == pytest.approx(1 / 3)
    assert v["ask"] == pytest.approx(2 / 3)
    assert v["purchase"] == 1.0                                # forced, smoothed would be 3/4
    assert None not in v
    assert set(v) == {"positive", "negative", "leave", "add_to_cart", "objection", "ask", "purchase"}


def test_event_values_custom_success_events():
    log = [rec(["yes", "signup"], True), rec(["no"], False)]
    v = event_values(log, success_events=("signup", "never_seen"))
    assert v == pytest.approx({"yes": 2 / 3, "no": 1 / 3, "signup": 1.0, "never_seen": 1.0})


# ----------------------------------------------------------------------------- generation quality

def test_gre():
    assert gre(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == pytest.approx(0.5)
    assert gre([], []) == 0.0


def test_bleu():
    hyps = [["the", "cat", "sat", "on", "the", "mat"], ["hello", "there"]]
    assert bleu(hyps, hyps) == pytest.approx(1.0)
    assert bleu([["a", "b"]], [["c", "d"]]) == 0.0
    # hyp a b c vs ref a b d: p1 = 2/3, p2 = (1+1)/(2+1), p3 = (0+1)/(1+1), p4 = (0+1)/(0+1); BP = 1 (c = r)
    expected = math.exp((math.log(2 / 3) + math.log(2 / 3) + math.log(1 / 2) + 0) / 4)
    assert bleu([["a", "b", "c"]], [["a", "b", "d"]]) == pytest.approx(expected)
    # brevity: hyp "a b" vs ref "a b c d": p1 = 1, p2 = 1, p3 = p4 = 1/1; BP = exp(1 - 4/2)
    assert bleu([["a", "b"]], [["a", "b", "c", "d"]]) == pytest.approx(math.exp(-1))


def test_rouge_l_hand():
    # hyp: the cat sat on mat (5), ref: the cat is on the mat (6); LCS = the cat on mat = 4
    # P = 4/5, R = 4/6, F = 2PR/(P+R) = (2 * .8 * .6667) / 1.4667 = 8/11
    hyp = "the cat sat on mat".split()
    ref = "the cat is on the mat".split()
    assert rouge_l(hyp, ref) == pytest.approx(8 / 11)
    assert rouge_l(hyp, hyp) == pytest.approx(1.0)
    assert rouge_l([], ref) == 0.0
    assert rouge_l(["x"], ref) == 0.0


# ----------------------------------------------------------------------------- statistics

def test_bootstrap_ci_is_near_the_normal_interval_where_that_one_is_right():
    # 400 evenly spread values: the mean is close to normal, so the percentile bootstrap should agree
    # with mean +- 1.96 s / sqrt(n) to within its own resampling noise (a few % of the half-width)
    xs = [(i * 0.618034) % 1.0 for i in range(400)]
    m, lo, hi = bootstrap_ci(xs)
    half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    assert m == pytest.approx(statistics.mean(xs))
    assert lo == pytest.approx(m - half, abs=0.1 * half) and hi == pytest.approx(m + half, abs=0.1 * half)
    assert bootstrap_ci(xs) == (m, lo, hi)                          # seeded: the same interval every call
    assert mean_ci(xs) == {"mean": m, "ci95": [lo, hi]}          # a score's default rule


def test_bootstrap_ci_stays_in_the_observed_range():
    # order value of a policy that rarely sells: mostly 0, two large orders. The normal interval
    # goes below 0 (eval.py printed `7 [-4, 18]` for the random policy); the bootstrap cannot
    xs = [0.0] * 198 + [700.0, 720.0]
    m, lo, hi = bootstrap_ci(xs)
    s = statistics.stdev(xs)
    assert m - 1.96 * s / math.sqrt(len(xs)) < 0, "the case must be one where the normal interval leaves the range"
    assert min(xs) <= lo <= m <= hi <= max(xs)
    for few in ([0.2, 0.9], [1.0, 0.0, 0.0], [5.0]):              # tiny samples, where the normal one is widest
        m, lo, hi = bootstrap_ci(few)
        assert min(few) <= lo <= m <= hi <= max(few), few
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_a_constant_score_gets_a_zero_width_interval():
    # whatever the constant: 0.1 does not survive a float sum exactly, 1.0 is where Wilson was used before
    for c in (0.1, 0.257, 1.0, 0.0, 6.0):
        for n in (1, 3, 200):
            assert bootstrap_ci([c] * n) == (c, c, c), (c, n)
            assert mean_ci([c] * n) == {"mean": c, "ci95": [c, c]}, (c, n)


def test_rate_ci_is_wilson_and_stays_in_range():
    # 2 successes in 200: Wilson 95% is [0.00275, 0.0357] (by hand: centre (0.01 + 1.96^2/400) / (1 + 1.96^2/200));
    # the normal interval would go below 0
    xs = [1] * 2 + [0] * 198
    p, lo, hi = rate_ci(xs)
    assert p == 0.01 and lo == pytest.approx(0.002747, abs=1e-5) and hi == pytest.approx(0.035722, abs=1e-5)
    assert mean_ci(xs, rate=True) == {"mean": p, "ci95": [lo, hi]}
    assert rate_ci([1] * 50)[1:] == pytest.approx((0.9287, 1.0), abs=1e-4) and rate_ci([0] * 50)[0] == 0.0
    assert all(math.isnan(x) for x in rate_ci([]))


def test_the_rule_follows_the_kind_of_metric_not_its_values():
    # the same 0/1 values: as a rate (success) Wilson, which is not zero-width at 50 of 50; as a score
    # (an oracle's ESNDCG of 1 everywhere) the bootstrap, which is
    ones = [1.0] * 50
    assert mean_ci(ones, rate=True)["ci95"] == list(rate_ci(ones)[1:]) and rate_ci(ones)[1] < 1.0
    assert mean_ci(ones)["ci95"] == [1.0, 1.0]
    mixed = [1.0] * 30 + [0.0] * 20
    assert mean_ci(mixed, rate=True)["ci95"] == list(rate_ci(mixed)[1:])
    assert mean_ci(mixed)["ci95"] == list(bootstrap_ci(mixed)[1:]) != list(rate_ci(mixed)[1:])
    with pytest.raises(ValueError, match="0 or 1"):
        rate_ci([1.0, 0.5])


# ----------------------------------------------------------------------------- one trajectory

def test_trajectory_metrics():
    r = rec(["positive", "purchase"], True, strategies=["greet", "offer"], ref=["greet", "offer"])
    out = trajectory_metrics(r, VALUES, horizon=4, gamma=0.5)
    assert out == pytest.approx({"tse": 1.475 / 1.875, "esndcg": 1.0, "success": 1.0, "turns": 2})


def test_trajectory_metrics_agent_ends():
    # the last agent turn gets no reaction (None -> value 0) and the dialogue failed
    r = rec(["positive"], False, strategies=["greet"], ref=["offer", "greet"])
    r["turns"].append({"role": "agent", "text": "bye", "strategy": "close", "event": None})
    out = trajectory_metrics(r, VALUES, horizon=3, gamma=0.5)
    # v = 0.6, 0 (None), 0 (failure pad); weights 1, .5, .25 -> 0.6 / 1.75
    # esndcg: greet@1 -> s=2 (.5/1), close unmatched; IDCG = 1 + 1/log2 3
    assert out["tse"] == pytest.approx(0.6 / 1.75)
    assert out["esndcg"] == pytest.approx(0.5 / (1 + 1 / LOG2_3))
    assert out["success"] == 0.0 and out["turns"] == 2


def test_paired_diff_ci_is_the_mean_difference_with_a_bootstrap_interval():
    xa = [0.5, 0.7, 0.2, 0.9, 0.4, 0.6, 0.3, 0.8]
    m, lo, hi = paired_diff_ci(xa, [x - 0.1 for x in xa])
    assert m == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)   # constant gain
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(xa)]
    m, lo, hi = paired_diff_ci(noisy, xa)
    assert m == pytest.approx(0.0) and lo < 0 < hi
    assert paired_diff_ci(xa, xa) == (0.0, 0.0, 0.0)
