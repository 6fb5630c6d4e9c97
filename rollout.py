"""The dialogue loop: Expert + CS Agent against simulated customers, all dialogues in lockstep.

At agent turn t, for every dialogue still running: the Expert picks z_t from the next-token logits
at the end of its context (SOP-masked), the CS Agent writes y_t for (h_t, z_t), the customer reads
y_t and answers with an utterance and an event. Finished dialogues leave the batch.

Each model keeps its own `engine.Context` (the two may use different tokenizers) with its KV cache
kept across turns: the forward that encodes the last turn (reply + customer utterance) is the one
whose final logits give the next decision, and the CS Agent encodes only the customer's utterance
and the strategy prompt before writing. A turn costs its new tokens, not the history again.

The Expert's context is exactly what `expert.decision_logps` later scores, and the log-prob of
each sampled decision is recorded here (`ref_logps`). With `--ref rollout` GOPO's reference S_ref
is that scoring forward itself, taken before the first step (gopo.reference_logps); the recorded
values equal it up to float rounding (tested, in bf16 too).

The loop is `Dialogues.play`; what the CS Agent is asked for each turn (`ask`) and what a turn
records (`record_turn`) is a subclass: the Expert's decision (`ExpertDialogues`, what `rollout`
plays). experiments/ adds its own: the flat agent, no Expert (flat.py), and Memento, where a case
bank decides (memento.py). An agent is passed as its (model, tokenizer) pair.

K rollouts per scenario, the groups GOPO's pairs come from (`play_groups`), are played one of three ways:

  independent  K whole dialogues from the customer's opening line. Two of them part at the first
               decision the dice make differently, mostly an early, easy one, and differ at almost
               every decision after it: a pair's credit is spread over the whole dialogue.
  branch       one dialogue, then K - 1 continuations of it from one of its decisions b (picked by
               `branch_point`): each continuation starts from a copy of the customer and of both
               models' contexts at b (`Dialogues.fork`) and plays on with its own dice. The K
               dialogues share their first b decisions token for token, so in a pair's DPO margin
               those terms cancel exactly (the loss drops them: gopo.scored_logps) and the preference
               falls on decision b and what followed it. As in SDPO (Kong et al. 2025), the
               alternatives are sampled from the point where the dialogues part.
  fork         one on-policy dialogue (the spine), then K - 1 forks of it, each at another of its
               decisions (`fork_points`: uniform over the decisions where the SOP allows more than
               one strategy, so a decision the Expert is sure of, rightly or wrongly, is reached as
               often as an unsure one). At its fork decision a fork takes the runner-up of the
               spine's own Gumbel draw there (Gumbel-top-2: the spine's strategy and the fork's are
               an exact sample without replacement), so it differs from the spine at exactly that
               decision, and every time; after it, it plays on with the policy. Each fork is paired
               with the spine alone: their shared prefix cancels as in branch, and the preference
               falls on the fork decision and what followed it (gopo.fork_views). As in MCTS-DPO and
               Agent Q, the contrast is between sibling actions at one state.
"""
import copy
import random

import torch

import engine
import expert as expert_lib
import parallel
import serialize
from worlds import shop


def rollout(expert, agent, scenarios, world=shop, greedy=False, seed=0, agent_temperature=0.7, max_reply_tokens=32):
    """Play one dialogue per scenario, world.HORIZON agent turns at most; expert, agent: (model,
    tokenizer). Returns a list of trajectories (dicts):

      record: the dialogue in the common schema (plus order_value),
      ids: the Expert's token ids, decisions: [(strategy-token position, strategy index)],
      allowed: (T, Z) SOP masks, ref_logps: [log pi_E(z_t|h_t) at sampling time],
      agent_ids: the CS Agent's token ids, replies: [(start, end)] reply spans in agent_ids,
      entropy: [H(pi_E(. | h_t))], the entropy of each decision's masked distribution.
    greedy: argmax decisions and replies; else sampled (replies at agent_temperature).
    Dialogue i's customer and random stream are seeded by (seed, i) alone (ExpertDialogues' index: a
    share of a batch played on one of several ranks keeps each dialogue's whole-batch number).
    """
    return ExpertDialogues(expert, agent, scenarios, world, seed).play(greedy, agent_temperature, max_reply_tokens)


def play_groups(make, scenarios, k, index, seed, rollouts="independent", branch_at="entropy", temperature=0.7,
                max_reply_tokens=32):
    """K sampled dialogues for each scenario: a list of groups, one per scenario, of K trajectories.

    make(scenarios, index, starts=None, snapshots=False) -> a Dialogues of this method (ExpertDialogues,
    FlatDialogues), seeded with `seed`; index: each scenario's number in the whole batch (a rank's
    share keeps the numbers, and so the dialogues, it would have in one process).
    rollouts: "independent" (K dialogues from the opening line), "branch" (one dialogue, then K - 1
    continuations of it from its decision `branch_point`) or "fork" (one dialogue, then up to K - 1
    forks of it, each at another decision, `fork_points`, taking the runner-up strategy there): see
    the module docstring. A fork group holds fewer than K where the spine has fewer decisions to fork.
    Each trajectory gets "branch", the decisions it shares with the group's first dialogue (0: none),
    and "fork", True where its first `branch` turns are a copy of the group's first dialogue."""
    if rollouts == "fork":
        return play_forks(make, scenarios, k, index, seed, temperature, max_reply_tokens)
    if rollouts == "independent":
        trajs = make([s for s in scenarios for _ in range(k)], [g * k + j for g in index for j in range(k)]).play(
            False, temperature, max_reply_tokens)
        for tr in trajs:
            tr["branch"], tr["fork"] = 0, False
        return [trajs[n * k:(n + 1) * k] for n in range(len(scenarios))]
    first = make(scenarios, [g * k for g in index], snapshots=True)
    firsts = first.play(False, temperature, max_reply_tokens)
    points = [branch_point(tr, branch_at, random.Random(f"branch/{seed}/{g}")) for tr, g in zip(firsts, index)]
    forks = make([s for s in scenarios for _ in range(k - 1)], [g * k + j for g in index for j in range(1, k)],
                 starts=[st for n, b in enumerate(points) for st in first.fork(n, b, k - 1)]).play(
        False, temperature, max_reply_tokens)
    groups = []
    for n, (tr, b) in enumerate(zip(firsts, points)):
        group = [tr] + forks[n * (k - 1):(n + 1) * (k - 1)]
        for m, member in enumerate(group):
            member["branch"], member["fork"] = b, m > 0
        groups.append(group)
    return groups


def play_forks(make, scenarios, k, index, seed, temperature=0.7, max_reply_tokens=32):
    """play_groups' "fork" mode: [spine, fork, ...] per scenario, each fork at its own decision."""
    first = make(scenarios, [g * k for g in index], snapshots=True)
    spines = first.play(False, temperature, max_reply_tokens)
    points = [fork_points(tr, k - 1, random.Random(f"fork/{seed}/{g}")) for tr, g in zip(spines, index)]
    starts, runner_up, batch, numbers = [], [], [], []
    for n, pts in enumerate(points):
        for j, b in enumerate(pts):
            starts += first.fork(n, b, 1)
            runner_up.append((spines[n]["decisions"][b][1], int(first.keys[n]), b))   # (spine's z, its dice, turn)
            batch.append(scenarios[n])
            numbers.append(index[n] * k + 1 + j)
    forks = make(batch, numbers, starts=starts, runner_up=runner_up).play(False, temperature, max_reply_tokens) \
        if batch else []
    groups, at = [], 0
    for tr, pts in zip(spines, points):
        tr["branch"], tr["fork"] = 0, False
        group = [tr] + forks[at:at + len(pts)]
        for member, b in zip(group[1:], pts):
            member["branch"], member["fork"] = b, True
        at += len(pts)
        groups.append(group)
    return groups


def turns_played(trajs):
    """The agent turns these dialogues simulated: a continuation's or a fork's copied turns were
    played once, by the dialogue they were copied from (the budget is counted in these turns)."""
    return sum(len(tr["replies"]) - (tr.get("branch", 0) if tr.get("fork") else 0) for tr in trajs)


def fork_points(tr, m, rng):
    """Up to m distinct decisions of a played dialogue to fork at, drawn uniformly among those where
    the SOP allowed more than one strategy (a fork must take another), in turn order. Uniform, not by
    entropy: the decisions the SFT Expert gets wrong with confidence are the ones entropy never picks."""
    open_ = [t for t, row in enumerate(tr["allowed"]) if int(row.sum()) > 1]
    return sorted(rng.sample(open_, min(m, len(open_))))


def branch_point(tr, branch_at, rng):
    """The turn b in [0, T) of a played dialogue to branch at. "uniform": any of its T turns.
    "entropy": turn t with probability proportional to the entropy of the Expert's SOP-masked
    distribution there, H(pi_E(. | h_t)): a turn with one allowed strategy, or where the Expert is
    sure, gives K continuations that make the same choice, and so no contrast at b. A dialogue with
    no decision entropies (the flat agent: its reply's entropy is mostly wording), or none above 0,
    is branched uniformly."""
    T = len(tr["replies"])
    weights = tr.get("entropy") or []
    if branch_at == "uniform" or sum(weights) <= 0:
        return rng.randrange(T)
    return rng.choices(range(T), weights=weights)[0]


class Dialogues:
    """A batch of dialogues in lockstep: each one's customer and random stream, the CS Agent's context
    and the trajectories. A subclass says what the agent is asked to write each turn (`ask`) and
    what a turn adds to a trajectory (`record_turn`). agent: (model, tokenizer). cache=False re-encodes
    every history each turn (the reference path; same dialogues)."""

    def __init__(self, agent, scenarios, world=shop, seed=0, index=None, cache=True, starts=None, snapshots=False):
        """starts: one state per dialogue from `fork` (it goes on from there), or None (from the
        customer's opening line); snapshots: keep a copy of each customer at every turn, to fork later."""
        index = list(range(len(scenarios))) if index is None else index
        self.agent_model, self.tok_a = agent_model, tok_a = agent
        self.scenarios, self.world = scenarios, world
        self.keys = torch.tensor([seed * 1_000_003 + i for i in index], dtype=torch.int64)   # each dialogue's dice
        if starts is None:
            self.customers = [world.Customer(s, seed=seed * 1_000_003 + i) for i, s in zip(index, scenarios)]
            self.trajs = [{"turns": [{"role": "customer", "text": o, "strategy": None, "event": None}], "ids": [],
                           "agent_ids": serialize.start_ids(tok_a) + serialize.customer_ids(tok_a, o), "decisions": [],
                           "ref_logps": [], "entropy": [], "replies": []} for o in (c.opening() for c in self.customers)]
        else:
            self.customers, self.trajs = [st["customer"] for st in starts], [st["traj"] for st in starts]
        self.first_turn = [len(tr["replies"]) for tr in self.trajs]   # 0, or the turn a fork goes on from
        self.snapshots = [[] for _ in self.trajs] if snapshots else None   # [(agent ids, Expert ids, customer)]
        self.agent_ctx = engine.Context(agent_model, [tr["agent_ids"] for tr in self.trajs], tok_a.pad_token_id,
                                        cache, n_vocab=len(tok_a))
        for tr, ids in zip(self.trajs, self.agent_ctx.ids):   # the contexts' id lists grow in place, so each
            tr["agent_ids"] = ids                              # trajectory holds its own rows

    def play(self, greedy=False, temperature=0.7, max_reply_tokens=32):
        """Every turn: the prompts, the agent's replies, the customers' answers. Returns the trajectories."""
        assert max_reply_tokens < 1 << 12
        eot, tok_a = self.tok_a.eos_token_id, self.tok_a
        live = list(range(len(self.trajs)))         # dialogue index of each batch row
        for t in range(self.world.HORIZON):         # step t of this play: dialogue i is at its turn first_turn[i] + t
            if not live and parallel.n_ranks() == 1:
                break      # distributed: a rank with no dialogue left still joins each turn's gathers
            if self.snapshots is not None:
                for i in live:
                    tr = self.trajs[i]
                    self.snapshots[i].append((len(tr["agent_ids"]), len(tr["ids"]), copy.deepcopy(self.customers[i])))
            asks = self.ask(t, live, greedy)   # per live dialogue: what its agent is asked for this turn
            starts = [len(ids) for ids in self.agent_ctx.ids]
            with parallel.gathered(self.agent_model):   # counter (2t + 1) << 12 + s: token s of turn t's reply
                replies = self.agent_ctx.sample(eot, max_reply_tokens, 0.0 if greedy else temperature,
                                                self.keys[live], (2 * t + 1) << 12) if live else []
            keep = []
            for j, i in enumerate(live):
                tr = self.trajs[i]
                if not replies[j] or replies[j][-1] != eot:   # cut at max_reply_tokens: close the turn
                    tr["agent_ids"].append(eot)
                text = tok_a.decode(tr["agent_ids"][starts[j]:-1], skip_special_tokens=True).strip()
                tr["replies"].append((starts[j], len(tr["agent_ids"])))
                turn = self.first_turn[i] + t
                utterance, event, done = self.customers[i].reply(text, turn)
                name = asks[j]["strategy"] if asks[j] else self.world.recognise(text)   # asked for none: what the world reads
                tr["turns"].append({"role": "agent", "text": text, "strategy": name, "event": None})
                tr["turns"].append({"role": "customer", "text": utterance, "strategy": None, "event": event})
                tr["agent_ids"] += serialize.customer_ids(tok_a, utterance)
                if self.record_turn(tr, asks[j], text, utterance, done) and turn + 1 < self.world.HORIZON:
                    keep.append(j)
            live = [live[j] for j in keep]
            self.keep(keep)
        return [self.finish(s, c, tr) for s, c, tr in zip(self.scenarios, self.customers, self.trajs)]

    def ask(self, t, live, greedy):
        """Extend the agent's context of each live dialogue with its turn prompt; return, per live
        dialogue, what it is asked for: a dict with at least "strategy", or None (asked for none).
        t: the step of this play (its dice counter), not the turn."""
        raise NotImplementedError

    def record_turn(self, tr, ask, text, utterance, done):
        """After a turn (its reply and the customer's answer already in tr["turns"]): add what the
        subclass keeps of it to tr; return whether the dialogue goes on."""
        return not done

    def keep(self, rows):
        self.agent_ctx.keep(rows)

    def finish(self, scenario, customer, tr):
        tr["allowed"] = None
        tr["record"] = self.world.record(scenario, tr.pop("turns"), customer, source="rollout")
        return tr

    def fork(self, i, b, n):
        """n start states for `starts`: copies of finished dialogue i as it stood before its turn b
        (its customer then, both contexts' ids and the trajectory up to there). Needs snapshots=True."""
        n_agent, n_ids, customer = self.snapshots[i][b]
        tr = self.trajs[i]
        return [{"customer": copy.deepcopy(customer),
                 "traj": {"turns": copy.deepcopy(tr["record"]["turns"][:1 + 2 * b]), "ids": tr["ids"][:n_ids],
                          "agent_ids": tr["agent_ids"][:n_agent], "decisions": tr["decisions"][:b],
                          "ref_logps": tr["ref_logps"][:b], "entropy": tr["entropy"][:b], "replies": tr["replies"][:b]}}
                for _ in range(n)]


class ExpertDialogues(Dialogues):
    """GOPO's two agents: each turn the Expert decides (`decide`) from its own context, SOP-masked, and
    the CS Agent writes the reply that carries out the decision."""

    def __init__(self, expert, agent, scenarios, world=shop, seed=0, index=None, cache=True, starts=None,
                 snapshots=False, runner_up=None):
        """runner_up: per dialogue (a fork), (the spine's strategy index, the spine's dice key, the
        turn): its first decision takes the runner-up of the spine's Gumbel draw at that turn."""
        super().__init__(agent, scenarios, world, seed, index, cache, starts, snapshots)
        self.runner_up = runner_up
        self.expert_model, self.tok_e = expert_model, tok_e = expert
        self.strategy_ids = expert_lib.strategy_ids(tok_e, world.STRATEGIES)
        self.expert_ctx = engine.Context(expert_model, [tr["ids"] if starts is not None else serialize.start_ids(tok_e) +
                                                        serialize.customer_ids(tok_e, tr["turns"][0]["text"])
                                                        for tr in self.trajs], tok_e.pad_token_id, cache)
        for tr, ids in zip(self.trajs, self.expert_ctx.ids):
            tr["ids"] = ids

    def ask(self, t, live, greedy):
        """Each live dialogue's decision: {"strategy", "z" (its index), "logp", "entropy", "history"
        (the strategies before it)}."""
        strategies = self.world.STRATEGIES
        histories = [[strategies[k] for _, k in self.trajs[i]["decisions"]] for i in live]
        with parallel.gathered(self.expert_model):      # FSDP: one model's full weights at a time
            logits = self.expert_ctx.logits(rows=self.strategy_ids) if live else None   # (B, Z): its rows only
        if not live:
            return []
        # counter (2t) << 12: turn t's decision
        uniforms = None if greedy else engine.uniforms(self.keys[live].to(logits.device), (2 * t) << 12,
                                                       len(strategies))                 # (B, Z)
        allowed = expert_lib.sop_mask(histories, strategies, self.world.allowed)        # (B, Z)
        logps = expert_lib.mask_and_normalise(logits, allowed.to(logits.device))         # (B, Z)
        entropy = expert_lib.entropy(logps).tolist()
        if self.runner_up is not None and t == 0:   # a fork's fork decision: the spine's draw, its choice out
            spine_z, spine_keys, turns = zip(*(self.runner_up[i] for i in live))
            uniforms = torch.stack([engine.uniforms(torch.tensor([key]), (2 * b) << 12, len(strategies))[0]
                                    for key, b in zip(spine_keys, turns)]).to(logits.device)   # (B, Z)
            chosen = allowed.clone()
            chosen[torch.arange(len(live)), torch.tensor(spine_z)] = False
            z, _ = self.decide(logits, chosen, uniforms, live)
            logp = logps.gather(1, z[:, None]).squeeze(1)
        else:
            z, logp = self.decide(logits, allowed, uniforms, live)                      # (B,) each
        asks = [{"strategy": strategies[k], "z": k, "logp": lp, "entropy": h, "history": hist}
                for k, lp, h, hist in zip(z.tolist(), logp.tolist(), entropy, histories)]
        self.agent_ctx.extend([serialize.agent_prompt_ids(self.tok_a, a["strategy"], self.world.INSTRUCTIONS[a["strategy"]])
                               for a in asks])
        return asks

    def decide(self, logits, allowed, uniforms, live):
        """(B,) strategy indices and their log-probs under the masked Expert: a sample, or the argmax
        when uniforms is None (greedy). logits (B, Z): the strategy rows only; allowed (B, Z),
        uniforms (B, Z) or None."""
        return expert_lib.decide(logits, allowed, uniforms)

    def record_turn(self, tr, ask, text, utterance, done):
        name = ask["strategy"]
        tr["decisions"].append((len(tr["ids"]), ask["z"]))
        tr["ref_logps"].append(ask["logp"])
        tr["entropy"].append(ask["entropy"])
        tr["ids"] += serialize.agent_prompt_ids(self.tok_e, name, self.world.INSTRUCTIONS[name]) + \
            serialize.reply_ids(self.tok_e, text) + serialize.customer_ids(self.tok_e, utterance)
        return not done and bool(self.world.allowed(ask["history"] + [name]))   # nothing may follow: it ends

    def keep(self, rows):
        self.expert_ctx.keep(rows)
        super().keep(rows)

    def finish(self, scenario, customer, tr):
        zs = [self.world.STRATEGIES[k] for _, k in tr["decisions"]]
        allowed = expert_lib.sop_mask(expert_lib.prefixes(zs), self.world.STRATEGIES, self.world.allowed)
        tr = super().finish(scenario, customer, tr)
        tr["allowed"] = allowed
        return tr
