"""The joint reward R(tau) = alpha * TSE + (1 - alpha) * ESNDCG (gopo.joint_reward, README eq. 3) away
from alpha = 0.5, where a reward that swapped its two weights would still give the right number.

The expected values are written out by hand from the formulas in tse.tse and tse.esndcg's
docstrings, never by calling the functions joint_reward is built from."""
import math

import pytest

import gopo

VALUES = {"disclose": 0.55, "positive": 0.6, "objection": 0.3, "add_to_cart": 0.8, "purchase": 1.0}


def turn(role, text, strategy=None, event=None):
    return {"role": role, "text": text, "strategy": strategy, "event": event}


def record(agent, events, success, ref):
    """A dialogue: the customer's opening, then each agent turn followed by the customer's reaction
    (event None: the dialogue ended on the agent's turn)."""
    turns = [turn("customer", "Hi.", event="disclose")]
    for z, e in zip(agent, events):
        turns.append(turn("agent", f"<{z}>", strategy=z))
        if e != "<end>":
            turns.append(turn("customer", "...", event=e))
    return {"id": "hand", "turns": turns, "success": success, "ref_strategies": ref, "scenario": {}}


# 4 agent turns, a purchase at turn 4, horizon 6: two padded turns worth 1 (success persists)
SUCCESS = record(["greet", "recommend", "offer_discount", "close"],
                 ["positive", "objection", "add_to_cart", "purchase"], True,
                 ["greet", "elicit_need", "recommend", "close"])
# 3 agent turns, an unknown event (worth 0), then the agent's last turn has no reply; a failure
FAILURE = record(["greet", "recommend", "upsell"], ["surprise", "objection", "<end>"], False,
                 ["greet", "recommend", "answer", "close"])


def by_hand_success(gamma):
    w = [gamma ** t for t in range(6)]
    v = [0.6, 0.3, 0.8, 1.0, 1.0, 1.0]
    tse = sum(a * b for a, b in zip(w, v)) / sum(w)
    # greet at t=1 matches s=1 (gain 1); recommend at t=2 matches s=3 (gain 0.5^1); offer_discount is
    # not in z*; close at t=4 matches s=4 (gain 1). Discounts 1/log2(t+1); ideal: 4 reference turns.
    dcg = 1 / math.log2(2) + 0.5 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    return tse, dcg / idcg


def by_hand_failure(gamma):
    w = [gamma ** t for t in range(6)]
    v = [0.0, 0.3, 0.0, 0.0, 0.0, 0.0]          # unknown event 0, objection 0.3, no reply 0, failure pads 0
    tse = sum(a * b for a, b in zip(w, v)) / sum(w)
    dcg = 1 / math.log2(2) + 1 / math.log2(3)   # greet, recommend in place; upsell not in z*
    idcg = sum(1 / math.log2(s + 1) for s in range(1, 5))
    return tse, dcg / idcg


@pytest.mark.parametrize("alpha", [0.2, 0.85, 0.0, 1.0])
def test_joint_reward_weights_tse_by_alpha_and_esndcg_by_one_minus_alpha(alpha):
    for rec, hand in ((SUCCESS, by_hand_success), (FAILURE, by_hand_failure)):
        tse, esndcg = hand(0.9)
        m = gopo.joint_reward(rec, VALUES, 6, alpha)
        assert m["tse"] == pytest.approx(tse, abs=1e-12) and m["esndcg"] == pytest.approx(esndcg, abs=1e-12)
        assert m["R"] == pytest.approx(alpha * tse + (1 - alpha) * esndcg, abs=1e-12), (rec["success"], alpha, m)


def test_joint_reward_at_alpha_0_2_by_the_numbers():
    """alpha = 0.2, gamma = 0.9, horizon 6: the numbers, for a reader checking the formula by hand.
    Success: TSE = (0.6 + 0.27 + 0.648 + 0.729 + 0.6561 + 0.59049) / 4.68559 = 0.745603...,
    ESNDCG = (1 + 0.5 / log2 3 + 1 / log2 5) / (1 + 1 / log2 3 + 1/2 + 1 / log2 5) = 0.681659...,
    R = 0.2 * TSE + 0.8 * ESNDCG = 0.694448..."""
    tse = (0.6 + 0.9 * 0.3 + 0.81 * 0.8 + 0.729 + 0.6561 + 0.59049) / (1 + 0.9 + 0.81 + 0.729 + 0.6561 + 0.59049)
    esndcg = (1 + 0.5 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5))
    assert tse == pytest.approx(0.745603, abs=1e-6) and esndcg == pytest.approx(0.681659, abs=1e-6)
    m = gopo.joint_reward(SUCCESS, VALUES, 6, alpha=0.2)
    assert m["R"] == pytest.approx(0.2 * tse + 0.8 * esndcg, abs=1e-12)
    assert m["R"] == pytest.approx(0.694448, abs=1e-6)
    assert m["R"] != pytest.approx(gopo.joint_reward(SUCCESS, VALUES, 6, alpha=0.8)["R"], abs=1e-3)


def test_joint_reward_passes_gamma_on():
    tse, esndcg = by_hand_success(0.5)
    m = gopo.joint_reward(SUCCESS, VALUES, 6, alpha=0.2, gamma=0.5)
    assert m["R"] == pytest.approx(0.2 * tse + 0.8 * esndcg, abs=1e-12)
