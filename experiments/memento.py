"""Memento, the paper's memory baseline: case-based reasoning with no gradient step on any LM (after Memento, Zhou et al. 2025).
  A case bank of (state embedding, strategy, observed return); the frozen SFT Expert proposes, the
  bank decides, the frozen SFT CS Agent writes. Our choices:
    * state embedding: a TF-IDF bag of words of the history, each turn weighted decay^age (age 0 =
      the customer's last utterance), the strategy labels of past agent turns as words "z:<name>";
      vocabulary and IDF from the logged training dialogues; cosine similarity;
    * observed return: the TSE of the rest of the dialogue from that turn (`returns_to_go`);
    * decision: among the cases whose strategy the SOP allows now, the k most similar; the strategy
      with the highest similarity-weighted mean return among them; where none is retrieved, the SFT
      Expert's argmax. While training, with probability --memento-eps the SFT Expert samples instead
      (exploration);
    * the bank starts with the cases of the logged training dialogues (the SFT data; --no-memento-logs
      starts it empty) and grows with every training rollout. Evaluation reads it, never writes it.
"""
import math
import re
import time

import torch
import torch.nn.functional as F

import checkpoint
import engine
import expert as expert_lib
import gopo
import rollout as rollout_lib
import tse
from experiments import flat


def returns_to_go(rec, event_values, horizon, gamma=0.9):
    """Memento's observed return of each agent turn t = 1..T: the TSE of the rest of the dialogue,
    G_t = sum_{s=t..H} gamma^(s-t) v_s / sum_{s=t..H} gamma^(s-t) (so G_1 = TSE(tau), and every
    G_t is in [0, 1] whatever t)."""
    v, T = tse.turn_values(rec, event_values, horizon)
    return [sum(gamma ** (s - t) * v[s] for s in range(t, horizon)) /
            sum(gamma ** (s - t) for s in range(t, horizon)) for t in range(T)]


def words(text):
    return re.findall(r"[a-z0-9%]+", text.lower())


class CaseBank:
    """Memento's case memory: keys (N, D) unit state embeddings, z (N,) strategy index, g (N,) return."""

    def __init__(self, vocab, idf, strategies, k=16, decay=0.5):
        self.vocab, self.strategies, self.k, self.decay = vocab, strategies, k, decay
        self.index = {w: i for i, w in enumerate(vocab)}
        self.idf = torch.tensor(idf)
        self.keys = torch.zeros(0, len(vocab))
        self.z = torch.zeros(0, dtype=torch.long)
        self.g = torch.zeros(0)

    @classmethod
    def from_logs(cls, records, strategies, k=16, decay=0.5):
        """Vocabulary and IDF (per turn, smoothed) from the logged training dialogues; an empty bank."""
        docs = [set(turn_words(t)) for r in records for t in r["turns"]]
        vocab = sorted(set().union(*docs) | {f"z:{z}" for z in strategies})
        df = {w: 0 for w in vocab}
        for d in docs:
            for w in d:
                df[w] += 1
        idf = [math.log((len(docs) + 1) / (df[w] + 1)) + 1 for w in vocab]
        return cls(vocab, idf, strategies, k, decay)

    def embed(self, turns):
        """The state before the next agent turn: (D,) unit vector, TF-IDF with recency weights."""
        x = torch.zeros(len(self.vocab))
        for age, t in enumerate(reversed(turns)):
            w = self.decay ** age
            for word in turn_words(t):
                if word in self.index:
                    x[self.index[word]] += w
        x = x * self.idf
        return x / x.norm().clamp(min=1e-8)

    def add(self, records, event_values, horizon, gamma=0.9):
        """One case per agent turn of each record: (state before it, its strategy, its return-to-go)."""
        keys, zs, gs = [], [], []
        zi = {z: i for i, z in enumerate(self.strategies)}
        for rec in records:
            turns = rec["turns"]
            agent_at = [i for i, t in enumerate(turns) if t["role"] == "agent"][:horizon]
            for i, g in zip(agent_at, returns_to_go(rec, event_values, horizon, gamma)):
                keys.append(self.embed(turns[:i]))
                zs.append(zi[turns[i]["strategy"]])
                gs.append(g)
        if keys:
            self.keys = torch.cat([self.keys, torch.stack(keys)])
            self.z = torch.cat([self.z, torch.tensor(zs)])
            self.g = torch.cat([self.g, torch.tensor(gs)])

    def q_values(self, turns_list, allowed):
        """(B, Z) similarity-weighted mean return of each strategy among the k nearest allowed cases
        of each state; nan where no such case was retrieved."""
        B, Z = allowed.shape
        q = torch.full((B, Z), float("nan"))
        if not len(self.z):
            return q
        sims = torch.stack([self.embed(t) for t in turns_list]) @ self.keys.T        # (B, N)
        sims = sims.masked_fill(~allowed[:, self.z], float("-inf"))                   # SOP before retrieval
        top, idx = sims.topk(min(self.k, sims.shape[1]), dim=1)                       # (B, k)
        ok = torch.isfinite(top)
        wt = torch.where(ok, top.clamp(min=1e-6), torch.zeros_like(top))            # (B, k)
        onehot = F.one_hot(self.z[idx], Z).float() * wt[..., None]                    # (B, k, Z)
        num = (onehot * self.g[idx][..., None]).sum(1)                                # (B, Z)
        den = onehot.sum(1)
        return torch.where(den > 0, num / den.clamp(min=1e-12), q)

    def choose(self, turns_list, allowed, logps, explore=0.0, gen=None):
        """(B,) strategy indices: the bank's best retrieved strategy, the Expert's argmax where the
        bank retrieved nothing; with probability `explore`, a sample of the Expert's distribution."""
        q = self.q_values(turns_list, allowed)
        known = torch.isfinite(q)
        z = torch.where(known.any(1), q.masked_fill(~known, float("-inf")).argmax(1), logps.argmax(1))
        if explore > 0:
            sample = engine.gumbel_argmax(logps, torch.rand(logps.shape, generator=gen))
            z = torch.where(torch.rand(len(z), generator=gen) < explore, sample, z)
        return z

    def state_dict(self):
        return {"vocab": self.vocab, "idf": self.idf, "strategies": self.strategies, "k": self.k,
                "decay": self.decay, "keys": self.keys, "z": self.z, "g": self.g}

    @classmethod
    def load(cls, path):
        s = torch.load(path)
        bank = cls(s["vocab"], s["idf"].tolist(), s["strategies"], s["k"], s["decay"])
        bank.keys, bank.z, bank.g = s["keys"], s["z"], s["g"]
        return bank


def turn_words(turn):
    return words(turn["text"]) + ([f"z:{turn['strategy']}"] if turn["role"] == "agent" and turn["strategy"] else [])


class MementoDialogues(rollout_lib.ExpertDialogues):
    """Memento's dialogues (rollout.py's loop): the case bank decides among the strategies the SOP
    allows, from the frozen SFT Expert's masked distribution (its argmax where the bank retrieves
    nothing; a sample of it with probability `explore`, drawn from `gen`); the frozen SFT CS Agent
    writes. ref_logps records the Expert's log-prob of each choice. MementoDialogues(bank, explore,
    gen, then ExpertDialogues' arguments)."""

    def __init__(self, bank, explore, gen, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bank, self.explore, self.gen = bank, explore, gen

    def decide(self, logits, allowed, uniforms, live):
        logps = expert_lib.mask_and_normalise(logits, allowed.to(logits.device))   # (B, Z): one distribution
        z = self.bank.choose([self.trajs[i]["turns"] for i in live], allowed, logps.cpu(), self.explore,
                             self.gen).to(logps.device)
        return z, logps.gather(1, z[:, None]).squeeze(1)


def memento_iteration(expert_model, agent_model, tok_e, tok_a, bank, scenarios, event_values, world, args, it, seed):
    """Rollouts whose decisions the bank makes (with exploration), then every turn into the bank."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    batch = [s for s in scenarios for _ in range(args.k)]
    trajs = MementoDialogues(bank, args.memento_eps, gen, (expert_model, tok_e), (agent_model, tok_a), batch, world,
                             seed).play(False, args.agent_temperature, args.max_reply_tokens)
    records = [tr["record"] for tr in trajs]
    bank.add(records, event_values, world.HORIZON)
    scores = [gopo.joint_reward(tr["record"], event_values, world.HORIZON, args.alpha) for tr in trajs]
    return {"iter": it, **flat.rollout_metrics(trajs, scores, world, t0,
                                               gre=tse.mean(tse.record_gre(r, world.recognise) for r in records),
                                               cases=len(bank.z))}


def play_memento(ckpt, method, scenarios, world, seed, max_reply_tokens=32):
    """eval.py: greedy dialogues of Memento, its bank read, never written (no exploration)."""
    m = checkpoint.METHODS[method]
    return [t["record"] for t in MementoDialogues(ckpt["bank.pt"], 0.0, None, ckpt[m.expert], ckpt[m.agent],
                                                  scenarios, world, seed).play(True, 0.7, max_reply_tokens)]
