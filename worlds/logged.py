"""A world made of logged dialogues: GOPO on real data (MG-ShopDial, MultiWOZ) without a simulator.

The dialogue loop (`rollout.py`) and GOPO (`gopo.py`) only need a "world": strategies, an SOP, a
customer that answers, and a record builder. `make_world` builds one from a training split:

- **Recogniser**: naive Bayes over word unigrams and bigrams, agent text -> strategy, fitted on the
  training split's agent turns only. It judges adherence (GRE) and feeds the customer model.
- **Customer-response model**: P(e_t | z_t, e_{t-1}) with add-one smoothing, fitted on the training
  logs, where z_t is the *recognised* strategy of the agent's reply (the customer reacts to what was
  said, not to what was asked for) and e_{t-1} the customer's previous event. The customer's words
  are a training customer turn with the sampled event, drawn at random: the model never says a
  line from the test split. Whether the dialogue ends in success is drawn from P(success | last
  event), fitted on the same logs.
- **Logged-context rollout** (our choice, not the paper's): a rollout starts from a logged
  dialogue's first customer line and lasts as many agent turns as that dialogue had after it; at
  each turn the Expert picks a strategy given the history so far, the CS Agent writes the reply and
  the customer model answers. The human strategy sequence of the logged dialogue (after its first
  customer line) is the reference z* of ESNDCG. Real logs give no SOP, so every strategy may follow every other.
"""
import math
import os
import random
import re
import types
from collections import Counter, defaultdict

import data
import tse

_WORD = re.compile(r"[a-z0-9']+")


def words(text):
    return _WORD.findall(text.lower())


def features(text):
    """Word unigrams and bigrams of a lowercased text."""
    w = words(text)
    return w + [f"{a} {b}" for a, b in zip(w, w[1:])]


class Recogniser:
    """Multinomial naive Bayes (add-alpha smoothing): text -> the most probable label."""

    def __init__(self, texts, labels, alpha=1.0):
        self.labels = sorted(set(labels))
        counts = {z: Counter() for z in self.labels}
        for x, z in zip(texts, labels):
            counts[z].update(features(x))
        n_vocab = len(set().union(*counts.values())) + 1
        prior = Counter(labels)
        self.log_prior = {z: math.log(prior[z] / len(labels)) for z in self.labels}
        self.log_p, self.log_unseen = {}, {}
        for z in self.labels:
            total = sum(counts[z].values()) + alpha * n_vocab
            self.log_p[z] = {w: math.log((c + alpha) / total) for w, c in counts[z].items()}
            self.log_unseen[z] = math.log(alpha / total)

    def __call__(self, text):
        f = features(text)
        return max(self.labels, key=lambda z: self.log_prior[z] +
                   sum(self.log_p[z].get(w, self.log_unseen[z]) for w in f))


def agent_turn_events(rec):
    """[(agent turn, the customer's next turn or None)] in order."""
    t = rec["turns"]
    return [(a, b if b is not None and b["role"] == "customer" else None)
            for a, b in zip(t, t[1:] + [None]) if a["role"] == "agent"]


class CustomerModel:
    """P(event | recognised strategy, previous event), retrieval of the words, P(success | last event)."""

    def __init__(self, records, recognise):
        self.counts = defaultdict(Counter)
        self.pool = defaultdict(list)                    # event -> training customer lines with it
        last, won = Counter(), Counter()
        for r in records:
            prev = None
            for a, b in agent_turn_events(r):
                if b is None or b["event"] is None:
                    continue
                self.counts[(recognise(a["text"]), prev)][b["event"]] += 1
                self.pool[b["event"]].append(b["text"])
                prev = b["event"]
            last[prev] += 1
            won[prev] += bool(r["success"])
        self.events = sorted(self.pool)
        self.p_success = {e: (won[e] + 1) / (last[e] + 2) for e in set(last) | set(self.events)}

    def probs(self, z, prev):
        """{event: probability}, summing to 1 (add-one smoothing over the events)."""
        c = self.counts[(z, prev)]
        n = sum(c.values()) + len(self.events)
        return {e: (c[e] + 1) / n for e in self.events}

    def respond(self, z, prev, rng):
        p = self.probs(z, prev)
        e = rng.choices(self.events, weights=[p[x] for x in self.events])[0]
        return rng.choice(self.pool[e]), e


def from_opening(rec):
    """The turns of a logged dialogue from its first customer line on (an agent greeting before it
    cannot be replayed: a rollout opens with the customer)."""
    turns = rec["turns"]
    first = next((i for i, t in enumerate(turns) if t["role"] == "customer"), len(turns))
    return turns[first:]


def opening_and_turns(rec):
    """The first customer line of a logged dialogue and the number of agent turns after it."""
    turns = from_opening(rec)
    return (turns[0]["text"] if turns else "Hello."), max(1, sum(t["role"] == "agent" for t in turns))


def human_strategies(rec):
    """z* of a logged dialogue: the human agent's strategies after the opening line."""
    return [t["strategy"] for t in from_opening(rec) if t["role"] == "agent"]


def make_world(train, all_records, max_turns=None):
    """A world (the contract of worlds/__init__.py that rollout/gopo/train use) from a training split.

    all_records (every split) only names the labels: strategies and events of the annotation scheme.
    """
    strategies = sorted({t["strategy"] for r in all_records for t in r["turns"] if t["role"] == "agent"})
    agent_turns = [t for r in train for t in r["turns"] if t["role"] == "agent"]
    recognise = Recogniser([t["text"] for t in agent_turns], [t["strategy"] for t in agent_turns])
    model = CustomerModel(train, recognise)
    horizon = max(opening_and_turns(r)[1] for r in train)
    horizon = min(horizon, max_turns) if max_turns else horizon

    class Customer:
        def __init__(self, scenario, seed=0):
            self.rng = random.Random(f"{scenario['id']}/{seed}")
            self.first, self.n_turns = opening_and_turns(scenario)
            self.prev, self.success = None, False

        def opening(self):
            return self.first

        def reply(self, text, turn):
            utterance, event = model.respond(recognise(text), self.prev, self.rng)
            self.prev = event
            done = turn + 1 >= self.n_turns
            if done:
                self.success = self.rng.random() < model.p_success.get(event, 0.5)
            return utterance, event, done

    def record(scenario, turns, cust, source):
        return {"id": scenario["id"], "source": source, "scenario": scenario["scenario"], "turns": turns,
                "success": cust.success, "ref_strategies": human_strategies(scenario)}

    return types.SimpleNamespace(
        STRATEGIES=strategies, EVENTS=model.events, SUCCESS_EVENTS=(), HORIZON=horizon,
        SOP={z: strategies for z in ["<start>", *strategies]},
        allowed=lambda history: strategies,
        INSTRUCTIONS={z: z.replace("_", " ") for z in strategies},
        Customer=Customer, record=record, recognise=recognise, customer_model=model,
        make_scenario=lambda seed: train[seed % len(train)])


def load_splits(name, path, split_seed=0):
    """{"train", "dev", "test"} record lists of a dataset (see worlds/corpora.py for the rules).

    mgshop: the MGShopDial.json file. multiwoz: the official folder (it holds dialog_acts.json), or
    the Hugging Face copy (a save_to_disk folder or a hub id; worlds/hf.py). records: the common
    record schema, a JSONL file or a Hugging Face dataset; its own train / test splits if it has
    them, else split by MG-ShopDial's seeded rule (corpora.mgshop_split: 1/8 test, 1/8 dev)."""
    from worlds import corpora
    from worlds import hf   # imports `datasets` only when it reads a dataset
    if name == "mgshop":
        return corpora.mgshop_split(corpora.load_mgshop(path), seed=split_seed)
    if name == "multiwoz":
        if os.path.isfile(os.path.join(path, "dialog_acts.json")):
            return corpora.load_multiwoz(path)
        if os.path.isdir(path) and not hf.is_dataset_folder(path):
            raise data.DataError(f"{path}: neither the MultiWOZ 2.2 folder (no dialog_acts.json) nor a Hugging "
                                 "Face dataset folder (no state.json or dataset_dict.json, which save_to_disk writes)")
        return hf.multiwoz_splits(path)
    if name == "records":
        jsonl = path.endswith(".jsonl") or os.path.isfile(path)
        splits = {"all": data.read_jsonl(path)} if jsonl else hf.record_splits(path)
        if "all" in splits:
            splits = corpora.mgshop_split(splits["all"], seed=split_seed)
        for split, recs in splits.items():   # the logged-context world learns from the agents' strategies
            for rec in recs:
                for i, t in enumerate(rec["turns"]):
                    if t["role"] == "agent" and t["strategy"] is None:
                        raise data.DataError(f"{path}: record '{rec['id']}' ({split} split): turns[{i}] is an agent "
                                             "turn without a strategy; --data records needs one on every agent turn")
        return splits
    raise data.DataError(f"unknown dataset {name!r} (mgshop, multiwoz or records)")


def reply_overlap(generated, logged):
    """BLEU and ROUGE-L of the generated agent replies against the human replies of the logged
    dialogue, turn by turn (the first min(len) agent turns)."""
    hyp = [words(t["text"]) for t in generated["turns"] if t["role"] == "agent"]
    ref = [words(t["text"]) for t in from_opening(logged) if t["role"] == "agent"]
    n = min(len(hyp), len(ref))
    if n == 0:
        return 0.0, 0.0
    return tse.bleu(hyp[:n], ref[:n]), sum(tse.rouge_l(h, r) for h, r in zip(hyp[:n], ref[:n])) / n
