"""Whole dialogues: one rule policy against the customer with template text (`dialogue`, `play`),
the record it makes and its reference z* (the oracle's strategy sequence).
"""
import random

from .catalogue import HORIZON, PARAPHRASES, allowed, render
from .customer import Customer
from .policies import Tracker, oracle_policy


def _step(cust, tracker, z, t, rng, paraphrases=PARAPHRASES):
    """One agent turn: the template text of `z`, the customer's reply to it, the tracker reading it."""
    text = render(z, tracker, rng, paraphrases)
    utt, event, done = cust.reply(text, t)
    tracker.update(z, utt, event)
    return text, utt, event, done


def play(scenario, policy, seed=0, horizon=HORIZON, paraphrases=PARAPHRASES):
    """One dialogue of a rule policy with template text, as a record."""
    turns, cust = dialogue(scenario, policy, seed, horizon, paraphrases)
    return record(scenario, turns, cust, source=f"desk/{policy.__name__}", horizon=horizon)


def dialogue(scenario, policy, seed=0, horizon=HORIZON, paraphrases=PARAPHRASES):
    """The turns of one rule-policy dialogue, and the customer at its end."""
    rng = random.Random(f"policy/{scenario['seed']}/{seed}")
    cust, tracker = Customer(scenario, seed), Tracker()
    turns = [{"role": "customer", "text": cust.opening(), "strategy": None, "event": None}]
    tracker.update(None, turns[0]["text"], "disclose")
    for t in range(horizon):
        z = policy(tracker, scenario, rng)
        assert z in allowed(tracker.strategies), (z, tracker.strategies)
        text, utt, event, done = _step(cust, tracker, z, t, rng, paraphrases)
        turns += [{"role": "agent", "text": text, "strategy": z, "event": None},
                  {"role": "customer", "text": utt, "strategy": None, "event": event}]
        if done:
            break
    return turns, cust


def record(scenario, turns, cust, source, horizon=HORIZON):
    return {"id": f"desk-{scenario['seed']}", "source": source, "scenario": scenario, "turns": turns,
            "success": cust.success, "ref_strategies": reference(scenario, horizon),
            "order_value": cust.order_value(), "sop_ok": cust.sop_ok}


_REF_CACHE = {}


def reference(scenario, horizon=HORIZON):
    """z*: the oracle's strategy sequence (its decisions do not depend on the wording)."""
    key = (scenario["seed"], horizon)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = [t["strategy"] for t in dialogue(scenario, oracle_policy, horizon=horizon)[0]
                           if t["role"] == "agent"]
    return list(_REF_CACHE[key])
