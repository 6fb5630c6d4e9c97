"""The world contract: what GOPO trains against. To take GOPO to your own domain, write a module
that provides these names (worlds/shop.py is the small example, worlds/desk/ the long-horizon one,
worlds/logged.py builds one from real logs, read by worlds/corpora.py), and pass it where `shop` or
`desk` is passed.

  STRATEGIES             strategy names: the Expert's action space (one new token each)
  INSTRUCTIONS           strategy -> one short line the CS Agent follows (it is in every turn)
  allowed(strategies)    the SOP as an automaton: the strategies allowed now, given those chosen so far
                         in this dialogue ([] at the first agent turn). [] ends the dialogue. The Expert's
                         mask in sampling, greedy decoding, SFT and scoring is exactly this set.
  SOP                    the hard rules, for people (shop: the previous-strategy table allowed() reads)
  EVENTS, SUCCESS_EVENTS engagement events a customer turn carries ("leave" among them); the successes
  HORIZON                maximum agent turns
  make_scenario(seed)    a deterministic hidden goal, a JSON-able dict with a "seed" key
  Customer(scenario, seed)  .opening() -> first utterance; .reply(text, turn) -> (utterance, event, done);
                         .success; .order_value() (business value, 0 on failure)
  recognise(text)        the strategy a reply carries out, read off its surface (or None): the
                         simulator's reading, GRE and sop_ok
  Tracker                what an agent can read off the dialogue; rule policies see it, and it exposes
                         at least .prev (previous strategy), .strategies (all so far), .last_text
  read(turns)            the Tracker before each agent turn of a dialogue's turns (a generator), as the
                         rule policies saw it: what relabels a logged or played dialogue with a policy
  POLICIES               rule policies policy(tracker, scenario, rng) -> strategy: "oracle" (sees the hidden
                         goal; defines z*), "behaviour" (writes the training logs), "random", and where
                         it makes sense "myopic" (the best policy that reads only the last line) and
                         "disclosed" (the oracle's plan from disclosed facts only: the labels a reader
                         of the dialogue can learn, and what decision accuracy is measured against)
  decision_group(tracker)  optional: the kind of decision at this point (DECISION_GROUPS names them); a
                         world without it has one group, "all"
  play(scenario, policy, seed=0) -> record; dialogue(...) -> (turns, customer);
  record(scenario, turns, customer, source) -> {"id", "source", "scenario", "turns", "success",
                         "ref_strategies", "order_value"}; reference(scenario) -> z*

Held-out scenarios come from seeds training never samples (data.test_seeds).

Imports run one way: a world imports the record schema (data.py), never the reverse, and this
module is the one place that loads worlds by name (`load`, and `load_world` for train.py's --data).
"""
import os
import random

import data

WORLDS = ("shop", "desk")
CONTRACT = ("STRATEGIES", "INSTRUCTIONS", "allowed", "SOP", "EVENTS", "SUCCESS_EVENTS", "HORIZON", "make_scenario",
            "Customer", "recognise", "Tracker", "read", "POLICIES", "play", "dialogue", "record", "reference")
# the names above, which every world provides; decision_group and DECISION_GROUPS are optional


def load(name, horizon=None, paraphrases=None):
    """A built-in world by name, with its knobs (desk only: maximum agent turns, paraphrases per
    strategy; None keeps the world's defaults)."""
    if name == "shop":
        if horizon is not None or paraphrases is not None:
            raise ValueError("--horizon and --paraphrases are knobs of the desk world (--world desk)")
        from worlds import shop
        return shop
    if name == "desk":
        from worlds import desk
        knobs = (horizon or desk.HORIZON, paraphrases or desk.PARAPHRASES)
        return desk if knobs == (desk.HORIZON, desk.PARAPHRASES) else desk.make_world(*knobs)
    raise ValueError(f"unknown world {name!r} (built-in: {', '.join(WORLDS)})")


def read_logs(path, strategies=None, events=None):
    """train.py --logs PATH: a JSONL file (data.read_jsonl), or a Hugging Face dataset in the record
    schema, a save_to_disk folder or a hub id (worlds/hf.py, the only place that imports `datasets`)."""
    if path.endswith(".jsonl") or os.path.isfile(path):
        return data.read_jsonl(path, strategies, events)
    from worlds import hf
    return hf.logs(path, strategies, events)


def load_world(source, path=None, world="shop", horizon=None, paraphrases=None, logs=None):
    """(world, training logs or None, splits or None) of train.py's --data SOURCE. The built-in shop
    (--world, its knobs) simulates its logs later, or reads them from `logs` (`read_logs`: JSONL or a
    Hugging Face dataset); a real dataset's training split is the logs, and its world is a
    logged-context one (worlds/logged.py)."""
    if source == "sim":
        w = load(world, horizon, paraphrases)
        return w, read_logs(logs, w.STRATEGIES, w.EVENTS) if logs else None, None
    from worlds import logged
    splits = logged.load_splits(source, path)
    if not splits["train"] or not splits["test"]:
        raise data.DataError(f"--data-path {path}: the {source} data has an empty train or test split")
    return logged.make_world(splits["train"], [r for v in splits.values() for r in v]), splits["train"], splits


def label_policy(w):
    """What decisions are scored against: the world's "disclosed" policy where it has one (it never
    reads an undisclosed fact, so a reader of the dialogue can match it), else its oracle."""
    return w.POLICIES.get("disclosed", w.POLICIES["oracle"])


def decision_groups(w):
    """The kinds of decision a world names (its DECISION_GROUPS), or ("all",)."""
    return tuple(getattr(w, "DECISION_GROUPS", ("all",)))


def decisions(w, rec, policy=None):
    """[(group, strategy taken, label)] for each agent turn of a record: the label is what `policy`
    (default label_policy) chooses at that point of the record's own history, read by w.read."""
    policy, group = policy or label_policy(w), getattr(w, "decision_group", lambda tracker: "all")
    agent = [t for t in rec["turns"] if t["role"] == "agent"]
    return [(group(tracker), turn["strategy"], policy(tracker, rec["scenario"], random.Random(0)))
            for turn, tracker in zip(agent, w.read(rec["turns"]))]


def relabel(w, records, policy=None):
    """Copies of logged records whose agent turns carry a "label": the policy's choice at that point
    of the logged history (DAgger-style). The logged text and strategies stay; SFT trains on the label
    (expert.trajectory_from_record), every SOP mask stays the logged history's."""
    out = []
    for rec in records:
        labels = iter([z for _, _, z in decisions(w, rec, policy)])
        out.append({**rec, "turns": [{**t, "label": next(labels)} if t["role"] == "agent" else t
                                     for t in rec["turns"]]})
    return out


def decision_accuracy(w, records, policy=None):
    """{group: [decisions matching the label, decisions]} over records, the world's decision groups in
    order, then "all" (their sum)."""
    return tally(w, [decisions(w, rec, policy) for rec in records])


def tally(w, decision_lists):
    """{group: [decisions matching the label, decisions]} over lists of `decisions` (or parts of
    them), the world's decision groups in order, then "all"."""
    counts = {g: [0, 0] for g in (*decision_groups(w), "all")}
    for seen in decision_lists:
        for g, taken, label in seen:
            for key in {g, "all"}:          # a world without groups has one, "all": count it once
                counts[key][0] += taken == label
                counts[key][1] += 1
    return counts
