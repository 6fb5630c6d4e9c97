"""The myopic policy: the best policy that sees only (previous strategy, the customer's last line
verbatim), fitted by Monte-Carlo policy iteration on training scenarios; and `last_line_share`, how
much of a set of dialogues' decisions such a table reproduces. They measure how much the desk asks
of the Expert beyond reading the last line.

The search branches a dialogue mid-way (`_finish`): it copies the customer's and the tracker's state,
so it knows their fields (customer.Customer, policies.Tracker).
"""
import copy
import random
from collections import Counter, defaultdict

import data

from .catalogue import HORIZON, allowed, make_scenario
from .customer import Customer
from .dialogues import _step, dialogue, play
from .policies import Tracker, oracle_policy

_MYOPIC = {}


def _table_policy(table, name="myopic_policy"):
    def policy(tracker, scenario, rng=None):
        ok = allowed(tracker.strategies)    # an unseen key falls back to the ranking of its previous strategy
        return next((z for z in table.get((tracker.prev, tracker.last_text), []) + table.get(tracker.prev, []) if z in ok), ok[0])
    policy.__name__ = name
    return policy


def _finish(scenario, policy, cust, tracker, t, z, horizon, rng):
    """Return of `z` at agent turn t, then `policy`: success, plus a little per request resolved (so a
    failing table still learns which steps make progress)."""
    cust, tracker, state = copy.copy(cust), copy.copy(tracker), cust.rng.getstate()
    cust.read, cust.st, cust.gate_breaks = list(cust.read), dict(cust.st), list(cust.gate_breaks)
    cust.rng, tracker.strategies = random.Random(), list(tracker.strategies)
    cust.rng.setstate(state)
    done = False
    while not done and t < horizon:
        done, t = _step(cust, tracker, z, t, rng)[3], t + 1
        z = None if done or t >= horizon else policy(tracker, scenario, rng)
    return cust.success + 0.1 * (cust.i + cust.st.get("done", False)) / len(cust.reqs)


def fit_myopic(n_scenarios=400, seed=0, horizon=HORIZON, rounds=2, n_branch=120):
    """Monte-Carlo policy iteration over (prev, last line) keys on training scenarios. Start from the
    oracle's majority decision per key; each round, on n_branch scenarios, follow the current table,
    try every allowed strategy at every visited key, finish the dialogue (round 0 with the oracle, as
    a failing table gives no signal; later rounds with the table) and rank the key's strategies by
    mean return. Returns the table ({key: ranked strategies}) that succeeds most often."""
    rng = random.Random(f"myopic/{seed}")
    seeds = rng.sample(range(data.TRAIN_SEED_BASE, data.TEST_SEED_BASE), n_scenarios)   # training seeds only
    scenarios = [make_scenario(s, horizon) for s in seeds]
    votes = defaultdict(Counter)
    for sc in scenarios:
        turns, _ = dialogue(sc, oracle_policy, horizon=horizon)
        for i in range(1, len(turns), 2):
            prev = turns[i - 2]["strategy"] if i > 1 else None
            votes[(prev, turns[i - 1]["text"])][turns[i]["strategy"]] += 1
            votes[prev][turns[i]["strategy"]] += 1
    table = {k: [z for z, _ in c.most_common()] for k, c in votes.items()}
    score = lambda tb: sum(play(sc, _table_policy(tb), horizon=horizon)["success"] for sc in scenarios)
    best = (score(table), 0, table)
    for rnd in range(rounds):
        policy, q = (_table_policy(table) if rnd else oracle_policy), defaultdict(lambda: defaultdict(list))
        for sc in scenarios[:n_branch]:
            cust, tracker, t, done = Customer(sc), Tracker(), 0, False
            tracker.update(None, cust.opening(), "disclose")
            while not done and t < horizon:
                for a in allowed(tracker.strategies):
                    ret = _finish(sc, policy, cust, tracker, t, a, horizon, rng)
                    q[(tracker.prev, tracker.last_text)][a].append(ret)
                    q[tracker.prev][a].append(ret)
                done, t = _step(cust, tracker, policy(tracker, sc), t, rng)[3], t + 1
        table = {**table, **{k: sorted(qa, key=lambda a: -sum(qa[a]) / len(qa[a])) for k, qa in q.items()}}
        best = max(best, (score(table), -rnd - 1, table), key=lambda b: b[:2])
    return best[2]


def _myopic(horizon):
    def myopic_policy(tracker, scenario, rng=None):
        """The fitted (prev, last line) table; fitted once per horizon, on first use."""
        if horizon not in _MYOPIC:
            _MYOPIC[horizon] = _table_policy(fit_myopic(horizon=horizon))
        return _MYOPIC[horizon](tracker, scenario, rng)
    return myopic_policy


myopic_policy = _myopic(HORIZON)


def last_line_share(records):
    """Share of the agent decisions in `records` that the best (previous strategy, customer's last line
    verbatim) -> decision table, the majority per key, reproduces. 1.0: the last line decides."""
    votes = defaultdict(Counter)
    for rec in records:
        turns = rec["turns"]
        for i in range(1, len(turns)):
            if turns[i]["role"] == "agent":
                votes[(turns[i - 2]["strategy"] if i > 1 else None, turns[i - 1]["text"])][turns[i]["strategy"]] += 1
    return sum(max(c.values()) for c in votes.values()) / max(1, sum(sum(c.values()) for c in votes.values()))
