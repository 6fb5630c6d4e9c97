"""GOPO: DPO over whole dialogues, counting only the Expert's decisions (docs/design.md).

What it really is: for each scenario, roll out K dialogues with the current Expert, score each
with a sequence-level business reward R, and prefer the better dialogue of each pair with the DPO
sigmoid loss, where a trajectory's "log-prob" is the sum of the Expert's decision log-probs
S(tau) = sum_t log pi_E(z_t | h_t). Customer turns and CS replies are context, never scored.
The CS Agent gets a separate turn-level DPO on strategy adherence.

Equations (our re-interpretation; the paper's are not public):
  (1) R(tau) = alpha * TSE(tau) + (1 - alpha) * ESNDCG(z(tau), z*)
  (2) S_theta(tau) = sum_t log pi_theta(z_t | h_t)                         trajectory_logps
  (3) L_pair = -log sigma(beta [(S_theta(w) - S_ref(w)) - (S_theta(l) - S_ref(l))])  preference_loss
  (4) L = mean over pairs of (3) + lambda * NLL(w), NLL(w) = -S_theta(w) / T_w
  (5) listwise: L_PL = -sum_i [r_(i) - log sum_{j>=i} exp r_(j)], r = beta (S_theta - S_ref),
      rollouts sorted by R (Plackett-Luce)                                  listwise_loss
"""
import math
import random
import time

import torch
import torch.nn.functional as F

import agent as agent_lib
import engine
import expert as expert_lib
import lm
import parallel
import rollout as rollout_lib
import tse
import worlds


# ----------------------------------------------------------------------------- losses (pure functions)
def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta):
    """DPO sigmoid loss on sequence log-probs, all (B,). Returns (losses, chosen_rewards, rejected_rewards).

    With single-turn trajectories this is exactly the DPO loss of Rafailov et al. (2023).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)            # (B,)  eq. (3)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)      # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)                   # (B,)  eq. (3)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def trajectory_logps(step_logps, step_mask):
    """S(tau) = sum of the Expert's decision log-probs: step_logps, step_mask (B, T) -> (B,). eq. (2)"""
    return torch.where(step_mask.bool(), step_logps, torch.zeros_like(step_logps)).sum(-1)


def listwise_loss(policy_logps, ref_logps, rewards, beta):
    """Plackett-Luce loss over K ranked rollouts per scenario: all (N, K) -> (N,). eq. (5)

    Rollouts are ranked by `rewards` (best first); with K = 2 and distinct rewards this equals
    `preference_loss` on the (better, worse) pair.
    """
    order = rewards.argsort(-1, descending=True)                                 # (N, K)
    r = beta * (policy_logps - ref_logps)                                        # (N, K)
    r = torch.gather(r, 1, order)
    tail_lse = torch.logcumsumexp(r.flip(-1), -1).flip(-1)                       # log sum_{j>=i} exp r_j
    return -(r - tail_lse)[:, :-1].sum(-1)                                       # last term is 0


# ----------------------------------------------------------------------------- reward and pairs
def joint_reward(rec, values, horizon, alpha=0.5, gamma=0.9):
    """R(tau) of eq. (1), with the metrics it is built from."""
    m = tse.trajectory_metrics(rec, values, horizon, gamma)
    m["R"] = alpha * m["tse"] + (1 - alpha) * m["esndcg"]
    return m


def build_pairs(rewards, groups, delta=0.05, max_pairs=4, contrast=None):
    """Preference pairs within each scenario group: all (w, l) with R_w - R_l >= delta.

    rewards: list of floats; groups: list of index lists (the K rollouts of one scenario).
    Best-vs-worst comes first in each group, then the widest margins, capped at max_pairs.
    contrast(w, l): if given, only pairs for which it is true (--segment: the two chose differently
    at a scored decision; else their margin is 0 and the pair teaches nothing).
    """
    pairs = []
    for g in groups:
        cand = [(rewards[w] - rewards[l], w, l) for w in g for l in g
                if rewards[w] - rewards[l] >= delta - 1e-9   # tolerance: 0.15 - 0.10 < 0.05 in floats
                and (contrast is None or contrast(w, l))]
        cand.sort(key=lambda c: -c[0])      # the widest margin is best-vs-worst
        pairs += [(w, l) for _, w, l in cand[:max_pairs]]
    return pairs


# ----------------------------------------------------------------------------- updates
def expert_loss(model, trajs, pairs, groups, rewards, strategy_ids, pad_id, n_strategies, args, stats=None,
                ref_model=None):
    """The GOPO loss of the Expert on one batch: one forward over every trajectory in a pair (or a
    group, with --listwise), the preference loss on their summed decision log-probs plus the NLL
    of the winners, averaged over pairs (groups). Distributed: this rank's share of the pairs,
    normalised so that the ranks' gradients average to the whole batch's. Returns a scalar tensor.
    stats: a dict to fill with the quantities DPO trainers log (TRL's names), means over the pairs.
    ref_model: pi_ref for S_ref (--ref sft: the frozen SFT Expert); None: the policy that sampled
    the rollouts (--ref rollout)."""
    units = groups if args.listwise else pairs
    mine, weight = parallel.share_or_dummy(units)
    used = sorted({i for u in mine for i in u})
    row = {i: k for k, i in enumerate(used)}
    batch = expert_lib.collate([trajs[i] for i in used], pad_id, n_strategies)
    step_logps = expert_lib.decision_logps(model, batch, strategy_ids)            # (N, T)
    # --rollouts branch: the decisions before the group's branch point are the same tokens in both
    # dialogues of a pair, so their terms cancel in every margin; they are dropped (from the NLL too).
    # Their tokens stay in the forward: they are the context of the decisions that follow.
    scored = batch["step_mask"] & scored_steps([trajs[i] for i in used], batch["step_mask"].shape[1],
                                               args.segment)                     # (N, T)
    S = trajectory_logps(step_logps, scored.to(step_logps.device).float())        # (N,)
    # S_ref, --ref rollout: this same scoring forward, the first time a trajectory is scored in its
    # iteration (no step taken yet: the policy is the one that sampled it), so the margin starts at
    # exactly 0 in bf16 too; the rollout's recorded ref_logps are the same numbers up to rounding
    # (cached, left-padded forwards; tested). --ref sft: one forward of the frozen SFT Expert.
    first = S
    if ref_model is not None and any("S_ref" not in trajs[i] for i in used):
        with torch.no_grad():
            first = trajectory_logps(expert_lib.decision_logps(ref_model, batch, strategy_ids),
                                     scored.to(S.device).float())                             # (N,)
    for i in used:
        trajs[i].setdefault("S_ref", first[row[i]].detach())
    S_ref = torch.stack([trajs[i]["S_ref"] for i in used])                       # (N,)
    n_steps = scored.sum(-1).to(S.device)                                        # (N,) decisions scored
    if args.listwise:
        idx = torch.tensor([[row[i] for i in g] for g in mine], device=S.device)  # (G, K)
        R = torch.tensor([[rewards[i] for i in g] for g in mine], device=S.device)
        pref = listwise_loss(S[idx], S_ref[idx], R, args.beta)                    # (G,)
        winners = idx.gather(1, R.argmax(-1, keepdim=True)).squeeze(1)
    else:
        w = torch.tensor([row[a] for a, _ in mine], device=S.device)
        l = torch.tensor([row[b] for _, b in mine], device=S.device)
        pref, chosen, rejected = preference_loss(S[w], S[l], S_ref[w], S_ref[l], args.beta)   # (P,) each
        winners = w
        if stats is not None:
            n = parallel.total(float(weight * len(mine)))
            mean = lambda x: parallel.total(weight * float(x.sum())) / max(n, 1)
            stats.update({"rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
                          "rewards/margins": mean(chosen - rejected), "rewards/accuracies": mean((chosen > rejected).float()),
                          "logps/chosen": mean(S[w].detach()), "logps/rejected": mean(S[l].detach())})
    nll = -S[winners] / n_steps[winners]                                         # (P,) eq. (4)
    return weight * (pref + args.nll_coef * nll).sum() / parallel.denominator(len(units))


def scored_steps(trajs, T, segment=0):
    """(N, T) bool: the decisions the loss scores, t >= the trajectory's branch (0: all), and with
    --segment N > 0 only N of them, t < branch + N (as SDPO scores a segment from where the two
    dialogues part: the reward difference is credited to the decisions that made it, not to every
    decision after them)."""
    t = torch.arange(T)[None, :]
    branch = torch.tensor([tr.get("branch", 0) for tr in trajs])[:, None]      # (N, 1)
    return (t >= branch) & ((t < branch + segment) if segment else True)


def segment_strategies(tr, segment=0):
    """The strategy indices of a trajectory's scored decisions (scored_steps)."""
    b = tr.get("branch", 0)
    return [z for _, z in tr["decisions"][b:b + segment if segment else None]]


def expert_update(model, opt, trajs, pairs, groups, rewards, strategy_ids, pad_id, n_strategies, args,
                  ref_model=None):
    """One gradient step of the Expert on the GOPO loss. Returns the loss (nan: step skipped)."""
    loss = expert_loss(model, trajs, pairs, groups, rewards, strategy_ids, pad_id, n_strategies, args,
                       ref_model=ref_model)
    value = parallel.total(loss.item()) / parallel.world()                      # the whole batch's loss
    return value if lm.guarded_step(model, opt, loss) else float("nan")


@torch.no_grad()
def kl_to(model, ref_model, trajs, strategy_ids, pad_id, n_strategies):
    """Mean over the rollouts of sum_t KL(pi_E(. | h_t) || pi_SFT(. | h_t)): how far the Expert has
    moved from the SFT Expert where it now plays (RLHF trainers log the same sequence-level KL).
    Distributed: each rank scores its share, the mean is over the whole batch."""
    mine, weight = parallel.share_or_dummy(list(range(len(trajs))))
    batch = expert_lib.collate([trajs[i] for i in mine], pad_id, n_strategies)
    logps = expert_lib.decision_dists(model, batch, strategy_ids)                 # (N, T, Z)
    ref_logps = expert_lib.decision_dists(ref_model, batch, strategy_ids)         # (N, T, Z)
    kl = expert_lib.decision_kl(logps, ref_logps, batch["allowed"].to(logps.device),
                                batch["step_mask"].to(logps.device).float())     # (N,)
    return parallel.total(weight * float(kl.sum())) / len(trajs)


def cs_alignment_pairs(agent_model, tok, trajs, recognise, n, rng, temperature=1.0, max_new_tokens=32):
    """Turn-level CS pairs: for n sampled (h_t, z_t), two sampled replies; where exactly one adheres
    to z_t (by the strategy recogniser) the adherent one is chosen. Returns a list of
    (prompt ids, chosen reply ids, rejected reply ids)."""
    turns = [(tr, k) for tr in trajs for k in range(len(tr["replies"]))]
    picked = rng.sample(turns, min(n, len(turns)))
    if not picked:
        return []
    prompts = [tr["agent_ids"][:tr["replies"][k][0]] for tr, k in picked]       # ends after "A:"
    zs = [tr["record"]["turns"][2 * k + 1]["strategy"] for tr, k in picked]
    keys = torch.tensor([rng.getrandbits(62) for _ in picked], dtype=torch.int64)  # the dice of each prompt
    pairs = []
    with torch.no_grad():
        ys = [engine.generate(agent_model, prompts, tok.pad_token_id, tok.eos_token_id, max_new_tokens,
                              temperature, keys, counter=draw << 12, n_vocab=len(tok)) for draw in range(2)]
    for p, z, a, b in zip(prompts, zs, ys[0], ys[1]):
        ok = [recognise(tok.decode(y, skip_special_tokens=True)) == z for y in (a, b)]
        if ok[0] != ok[1]:
            pairs.append((p, a, b) if ok[0] else (p, b, a))
    return pairs


def agent_update(model, opt, pairs, pad_id, beta):
    """One turn-level DPO step of the CS Agent; the reference is the agent before this step.
    Distributed: this rank's share of the pairs, as in expert_loss."""
    mine, weight = parallel.share_or_dummy(pairs)
    examples = [(p + y, [0] * len(p) + [1] * len(y)) for p, c, r in mine for y in (c, r)]
    ids, attn, mask = agent_lib.collate(examples, pad_id)
    logps = agent_lib.reply_logps(model, ids, attn, mask)                       # (2P,) chosen, rejected interleaved
    ref = logps.detach()                                                        # the agent before this step
    losses, _, _ = preference_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta)
    loss = weight * losses.sum() / parallel.denominator(len(pairs))
    value = parallel.total(loss.item()) / parallel.world()
    return value if lm.guarded_step(model, opt, loss) else float("nan")


# ----------------------------------------------------------------------------- one iteration
def iteration(expert_model, agent_model, tok_e, tok_a, opt_e, opt_a, scenarios, values, world, args,
              it, seed, sft_expert=None):
    """Rollout -> score -> pairs -> update. Returns the iteration's metrics (one metrics.jsonl line).
    sft_expert: the frozen SFT Expert: pi_ref when args.ref == "sft", and the KL metric's reference."""
    t0 = time.time()
    rng = random.Random(seed)
    # 1. K rollouts per scenario, sampled from the current Expert (its log-probs recorded):
    #    independent dialogues, or continuations of one dialogue from a branch decision (--rollouts)
    def make(batch, index, **kw):
        return rollout_lib.ExpertDialogues(expert_model, agent_model, tok_e, tok_a, batch, world, seed, index=index, **kw)
    mine = parallel.share(list(range(len(scenarios))))      # distributed: each rank plays its scenarios' groups
    trajs = [tr for group in parallel.gather(rollout_lib.play_groups(
        make, [scenarios[i] for i in mine], args.k, mine, seed, args.rollouts, args.branch_at,
        args.agent_temperature, args.max_reply_tokens)) for tr in group]   # every rank: the whole batch, in order
    groups = [list(range(i * args.k, (i + 1) * args.k)) for i in range(len(scenarios))]
    # 2. score with R and build pairs within each scenario
    scores = [joint_reward(tr["record"], values, world.HORIZON, args.alpha) for tr in trajs]
    rewards = [m["R"] for m in scores]
    chose = lambda i: segment_strategies(trajs[i], args.segment)   # noqa: E731  (--segment: pairs must differ there)
    pairs = build_pairs(rewards, groups, args.delta, args.max_pairs,
                        (lambda w, l: chose(w) != chose(l)) if args.segment else None)
    # 3. Expert update on the trajectory-level preference loss
    strategy_ids = [tok_e.convert_tokens_to_ids(lm.strategy_token(z)) for z in world.STRATEGIES]
    expert_model.train()
    ref_model = sft_expert if args.ref == "sft" else None
    losses = [expert_update(expert_model, opt_e, trajs, pairs, groups, rewards, strategy_ids,
                            tok_e.pad_token_id, len(world.STRATEGIES), args, ref_model)
              for _ in range(args.gopo_epochs)] if (pairs or args.listwise) else []
    stats = {}
    if pairs and not args.listwise:   # what the update did: implicit rewards of the pairs after the last step
        with torch.no_grad():
            expert_loss(expert_model, trajs, pairs, groups, rewards, strategy_ids, tok_e.pad_token_id,
                        len(world.STRATEGIES), args, stats, ref_model)
    expert_model.eval()
    if sft_expert is not None:
        stats["kl_to_sft"] = kl_to(expert_model, sft_expert, trajs, strategy_ids, tok_e.pad_token_id,
                                   len(world.STRATEGIES))
    # 4. CS alignment: turn-level DPO on adherence
    with parallel.gathered(agent_model):   # the same pairs on every rank (same trajectories, same seed)
        cs_pairs = cs_alignment_pairs(agent_model, tok_a, trajs, world.recognise, args.cs_samples, rng,
                                      max_new_tokens=args.max_reply_tokens) if args.cs_samples else []
    cs_loss = None
    if cs_pairs:
        agent_model.train()
        cs_loss = agent_update(agent_model, opt_a, cs_pairs, tok_a.pad_token_id, args.beta_cs)
        agent_model.eval()
    recs = [tr["record"] for tr in trajs]
    finite = [x for x in losses if math.isfinite(x)]
    return {"iter": it, "R": mean(rewards), "tse": mean(m["tse"] for m in scores),
            "esndcg": mean(m["esndcg"] for m in scores), "success": mean(m["success"] for m in scores),
            "gre": mean(gre(r, world.recognise) for r in recs),
            "loss": mean(finite) if finite else None, "nonfinite_steps": len(losses) - len(finite),
            "pairs": len(pairs), "cs_pairs": len(cs_pairs), **stats, **decision_stats(trajs, pairs, world),
            "cs_loss": cs_loss if cs_loss is None or math.isfinite(cs_loss) else None, "seconds": round(time.time() - t0, 2)}


def decision_stats(trajs, pairs, world):
    """Which decisions an iteration's rollouts get right, and which its pairs contrast, per decision
    group (worlds.decisions: the kind of decision, the strategy taken, the label policy's choice):
      acc/<group>    share of the rollouts' decisions that match the label: each sampled decision
                     once (a fork's copied turns count in the dialogue they were copied from);
      pairs/<group>  share of the preference pairs whose first differing decision is of that group
                     (the winner's); pairs/same: the two dialogues chose the same strategies throughout.
    {} for a world without a tracker to read its dialogues (logged data)."""
    if not hasattr(world, "read"):
        return {}
    seen = [worlds.decisions(world, tr["record"]) for tr in trajs]              # [(group, taken, label)] each
    names = list(worlds.groups(world))
    counts = {g: [0, 0] for g in names + ["all"]}
    for tr, decisions in zip(trajs, seen):
        for g, taken, label in decisions[tr["branch"] if tr.get("fork") else 0:]:
            for key in (g, "all"):
                counts[key][0] += taken == label
                counts[key][1] += 1
    first = {g: 0 for g in names + ["same"]}
    for w, l in pairs:
        first[first_difference_group(seen[w], seen[l])] += 1
    return {**{f"acc/{g}": c / n if n else None for g, (c, n) in counts.items()},
            **{f"pairs/{g}": n / len(pairs) for g, n in first.items() if pairs}}


def first_difference_group(a, b):
    """The decision group where two dialogues' strategies first differ ("same" if they never do),
    a and b their worlds.decisions; where one ended first, its length is the place, the other's group."""
    za, zb = [z for _, z, _ in a], [z for _, z, _ in b]
    t = next((t for t, (x, y) in enumerate(zip(za, zb)) if x != y), None)
    if t is None and len(za) == len(zb):
        return "same"
    t = min(len(za), len(zb)) if t is None else t
    return (a[t] if t < len(a) else b[t])[0]


def gre(rec, recognise):
    agent_turns = [t for t in rec["turns"] if t["role"] == "agent"]
    return tse.gre([t["strategy"] for t in agent_turns], [recognise(t["text"]) for t in agent_turns])


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
