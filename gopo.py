"""GOPO: DPO over whole dialogues, counting only the Expert's decisions (docs/design.md).

What it really is: for each scenario, roll out K dialogues with the current Expert, score each
with a sequence-level business reward R, and prefer the better dialogue of each pair with the DPO
sigmoid loss, where a trajectory's "log-prob" is the sum of the Expert's decision log-probs
S(tau) = sum_t log pi_E(z_t | h_t). Customer turns and CS replies are context, never scored.
The CS Agent gets a separate turn-level DPO on strategy adherence.

Equations (our re-interpretation; the paper's are not public), numbered as in the README:
  (1) pi_E(z_t | h_t) = softmax over the strategy tokens, -inf outside the SOP's A(h_t)   expert.py
  (2) S_theta(tau) = sum_t log pi_theta(z_t | h_t)                                     trajectory_logps
  (3) R(tau) = alpha * TSE(tau) + (1 - alpha) * ESNDCG(z(tau), z*)                        joint_reward
  (4) L = -log sigma(beta [(S_theta(w) - S_ref(w)) - (S_theta(l) - S_ref(l))])          preference_loss
          + lambda * NLL(w), NLL(w) = -S_theta(w) / T_w, mean over pairs               expert_loss
  (4') listwise: L_PL = -sum_i [r_i - log(exp r_i + sum_{j: R_j < R_i} exp r_j)],
       r = beta (S_theta - S_ref): Plackett-Luce over the K rollouts ranked by R, tied
       rewards sharing a rank                                                       listwise_loss
  (5) CS alignment: two sampled replies for one (h_t, z_t); where exactly one carries out
      z_t, turn-level DPO toward it                                  cs_alignment_pairs, agent_update
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
    """Plackett-Luce loss over K ranked rollouts per scenario: all (N, K) -> (N,). eq. (4')

    Rollouts are ranked by `rewards` (best first); rollouts with equal rewards share a rank: each
    one's term compares it with itself and the rollouts strictly below it, never with its ties, and a
    rollout with none below adds nothing. So a group whose rewards all tie has loss 0 and no gradient
    (pairwise mode drops it through --delta), and with distinct rewards this is the textbook
    Plackett-Luce loss; with K = 2 it equals `preference_loss` on the (better, worse) pair.
    """
    r = beta * (policy_logps - ref_logps)                                        # (N, K)
    below = rewards[:, None, :] < rewards[:, :, None]                            # (N, K, K): R_j < R_i at [n, i, j]
    others = r[:, None, :].masked_fill(~below, torch.finfo(r.dtype).min)         # (N, K, K) exp -> 0 off the mask
    lse = torch.logaddexp(r, torch.logsumexp(others, -1))                        # log(e^r_i + sum_{j below i} e^r_j)
    return -torch.where(below.any(-1), r - lse, torch.zeros_like(r)).sum(-1)     # (N,)


# ----------------------------------------------------------------------------- reward and pairs
def joint_reward(rec, event_values, horizon, alpha=0.5, gamma=0.9):
    """R(tau) of eq. (3), with the metrics it is built from."""
    m = tse.trajectory_metrics(rec, event_values, horizon, gamma)
    m["R"] = alpha * m["tse"] + (1 - alpha) * m["esndcg"]
    return m


def build_pairs(rewards, rollout_groups, delta=0.05, max_pairs=4, contrast=None):
    """Preference pairs within each scenario's rollouts: all (w, l) with R_w - R_l >= delta.

    rewards: list of floats; rollout_groups: list of index lists (the K rollouts of one scenario).
    Best-vs-worst comes first in each group, then the widest margins, capped at max_pairs.
    contrast(w, l): if given, only pairs for which it is true (--segment: the two chose differently
    at a scored decision; else their margin is 0 and the pair teaches nothing).
    """
    pairs = []
    for g in rollout_groups:
        cand = [(rewards[w] - rewards[l], w, l) for w in g for l in g
                if rewards[w] - rewards[l] >= delta - 1e-9   # tolerance: 0.15 - 0.10 < 0.05 in floats
                and (contrast is None or contrast(w, l))]
        cand.sort(key=lambda c: -c[0])      # the widest margin is best-vs-worst
        pairs += [(w, l) for _, w, l in cand[:max_pairs]]
    return pairs


# ----------------------------------------------------------------------------- updates
def expert_loss(S, S_ref, n_steps, units, rewards, beta, nll_coef, listwise=False):
    """The GOPO loss of each unit, a pure function of the scored trajectories: eq. (4) per pair, or
    eq. (4') per rollout group with listwise, plus lambda * NLL of the winner.

    S (N,) S_theta(tau) with its graph, S_ref (N,), n_steps (N,) the decisions each scores, rewards
    (N,) R(tau); units: pairs (w, l) or groups (K rows each) of indices into them.
    Returns (losses (U,), terms): terms, for pairs, the (P,) quantities DPO trainers log (TRL's
    names: rewards/chosen, rewards/rejected, logps/chosen, logps/rejected), detached; None listwise."""
    idx = torch.tensor(units, device=S.device)                                   # (U, 2) or (U, K)
    if listwise:
        R = rewards.to(S.device)[idx]                                            # (G, K)
        pref = listwise_loss(S[idx], S_ref[idx], R, beta)                        # (G,)  eq. (4')
        winners, terms = idx.gather(1, R.argmax(-1, keepdim=True)).squeeze(1), None
    else:
        w, l = idx[:, 0], idx[:, 1]
        pref, chosen, rejected = preference_loss(S[w], S[l], S_ref[w], S_ref[l], beta)   # (P,) each, eq. (4)
        winners = w
        terms = {"rewards/chosen": chosen, "rewards/rejected": rejected,
                 "logps/chosen": S[w].detach(), "logps/rejected": S[l].detach()}
    nll = -S[winners] / n_steps[winners]                                         # (U,) NLL(w) of eq. (4)
    return pref + nll_coef * nll, terms


def scored_logps(model, tok, trajs, strategies, segment=0):
    """S(tau) of eq. (2) over the decisions the loss scores (`scored_steps`), and their count: (N,), (N,).
    One forward over every trajectory. --rollouts branch: the decisions before a group's branch point
    are the same tokens in both dialogues of a pair, so their terms cancel in every margin; they are
    dropped (from the NLL too). Their tokens stay in the forward: they are the context of what follows."""
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(strategies))
    step_logps = expert_lib.decision_logps(model, batch, expert_lib.strategy_ids(tok, strategies))   # (N, T)
    scored = batch["step_mask"] & scored_steps(trajs, batch["step_mask"].shape[1], segment)     # (N, T)
    S = trajectory_logps(step_logps, scored.to(step_logps.device).float())                      # (N,)
    return S, scored.sum(-1).to(S.device)


def rows_of(units):
    """The trajectories a list of units (pairs or groups) reads, sorted, and the units renumbered as
    rows of that list."""
    used = sorted({i for u in units for i in u})
    row = {i: k for k, i in enumerate(used)}
    return used, [[row[i] for i in u] for u in units]


@torch.no_grad()
def reference_logps(ref_model, tok, trajs, units, strategies, segment=0, size=None):
    """S_ref of eq. (4) for this rank's share of the units, once per iteration before the first step:
    (N,) over all trajectories, nan where not computed. ref_model: the Expert that played the rollouts
    (--ref rollout: iterative DPO, and the margin starts at exactly 0) or the frozen SFT Expert (--ref
    sft). The rollout's recorded ref_logps are the same numbers as the first up to rounding (cached,
    left-padded forwards; tested), but this forward is the one the loss's forward repeats bit for bit.
    size: --device-batch-size, at most this many trajectories per forward; every rank runs as many
    forwards as the rank with the most rows needs (under FSDP a forward holds collectives), a rank
    with fewer repeating its first row."""
    used, _ = rows_of(parallel.share_or_dummy(units)[0])
    S_ref = torch.full((len(trajs),), float("nan"))
    if not size:
        S_ref[used] = scored_logps(ref_model, tok, [trajs[i] for i in used], strategies, segment)[0].cpu()
        return S_ref
    W = parallel.n_ranks()
    most = max(len(rows_of(units[r::W] or units[:1])[0]) for r in range(W))
    for k in range(-(-most // size)):
        part = used[k * size:(k + 1) * size]
        S = scored_logps(ref_model, tok, [trajs[j] for j in part or used[:1]], strategies, segment)[0].cpu()
        if part:
            S_ref[part] = S
    return S_ref


def expert_update(expert, opt, trajs, units, S_ref, rewards, strategies, args):
    """One gradient step of the Expert (model, tokenizer) on eq. (4), or (4') with --listwise, averaged
    over the units (pairs or rollout groups). S_ref, rewards: (N,) over all trajectories.
    Returns (the whole batch's loss, nan if the step was skipped; the stats of this step's forward,
    means over the pairs with TRL's names, {} listwise).

    --device-batch-size N: this rank's units in micro-batches of N // (rows of a unit) units (at least
    one: a pair's two rows, a group's K, share a loss term and are never split), one forward and
    backward each. The loss is a sum over units, so the micro-batches' losses add up to the batch's
    and so do their gradients; a trajectory in pairs of two micro-batches is scored in both."""
    model, tok = expert
    mine, weight = parallel.share_or_dummy(units)          # distributed: this rank's units (weight 0: a dummy)
    size = getattr(args, "device_batch_size", None)
    runs = lm.micro_batches(mine, max(1, size // max(len(u) for u in units)), len(units)) if size else [(mine, 1.0)]
    terms_of = []

    def losses():
        for run, w in runs:
            used, rows = rows_of(run)
            S, n_steps = scored_logps(model, tok, [trajs[i] for i in used], strategies, args.segment)   # (N,) each
            unit_losses, terms = expert_loss(S, S_ref[used].to(S.device), n_steps, rows, rewards[used], args.beta,
                                             args.nll_coef, args.listwise)
            if terms is not None:
                terms_of.append((w, len(run), terms))
            yield weight * w * unit_losses.sum() / parallel.denominator(len(units))   # this rank's share of the mean
    values = []
    ok = lm.guarded_step(model, opt, losses(), values=values)
    stats = {}
    if terms_of:
        n = parallel.total(sum(weight * w * k for w, k, _ in terms_of))
        cat = lambda key: torch.cat([t[key] for _, _, t in terms_of])   # noqa: E731  every pair of this rank
        wts = torch.cat([torch.full((k,), weight * w) for w, k, _ in terms_of]).to(terms_of[0][2]["rewards/chosen"].device)
        mean = lambda x: parallel.total(float((wts * x).sum())) / max(n, 1)   # noqa: E731
        chosen, rejected = cat("rewards/chosen"), cat("rewards/rejected")
        stats = {"rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
                 "rewards/margins": mean(chosen - rejected), "rewards/accuracies": mean((chosen > rejected).float()),
                 "logps/chosen": mean(cat("logps/chosen")), "logps/rejected": mean(cat("logps/rejected"))}
    value = parallel.total(sum(values)) / parallel.n_ranks()                    # the whole batch's loss
    return (value if ok else float("nan")), stats


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


@torch.no_grad()
def kl_to(model, ref_model, tok, trajs, strategies, size=None):
    """Mean over the rollouts of sum_t KL(pi_E(. | h_t) || pi_SFT(. | h_t)): how far the Expert has
    moved from the SFT Expert where it now plays (RLHF trainers log the same sequence-level KL).
    Distributed: each rank scores its share, the mean is over the whole batch. size:
    --device-batch-size, the same number of forwards on every rank (FSDP)."""
    mine, weight = parallel.share_or_dummy(list(range(len(trajs))))
    ids = expert_lib.strategy_ids(tok, strategies)
    total = 0.0
    for run, w in lm.micro_batches(mine, size, len(trajs)) if size else [(mine, 1.0)]:
        batch = expert_lib.collate([trajs[i] for i in run], tok.pad_token_id, len(strategies))
        logps = expert_lib.decision_dists(model, batch, ids)                        # (N, T, Z)
        ref_logps = expert_lib.decision_dists(ref_model, batch, ids)                # (N, T, Z)
        kl = expert_lib.decision_kl(logps, ref_logps, batch["allowed"].to(logps.device),
                                    batch["step_mask"].to(logps.device).float())     # (N,)
        total += w * float(kl.sum())
    return parallel.total(weight * total) / len(trajs)


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


def agent_update(model, opt, pairs, pad_id, beta, size=None):
    """One turn-level DPO step of the CS Agent; the reference is the agent before this step.
    Distributed: this rank's share of the pairs, as in expert_loss. size: --device-batch-size,
    size // 2 pairs per micro-batch (at least one)."""
    mine, weight = parallel.share_or_dummy(pairs)

    def losses():
        for run, w in lm.micro_batches(mine, max(1, size // 2), len(pairs)) if size else [(mine, 1.0)]:
            examples = [(p + y, [0] * len(p) + [1] * len(y)) for p, c, r in run for y in (c, r)]
            ids, attn, mask = agent_lib.collate(examples, pad_id)
            logps = agent_lib.reply_logps(model, ids, attn, mask)               # (2P,) chosen, rejected interleaved
            ref = logps.detach()                                                # the agent before this step
            pair_losses, _, _ = preference_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta)
            yield weight * w * pair_losses.sum() / parallel.denominator(len(pairs))
    values = []
    ok = lm.guarded_step(model, opt, losses(), values=values)
    value = parallel.total(sum(values)) / parallel.n_ranks()
    return value if ok else float("nan")


# ----------------------------------------------------------------------------- one iteration
def iteration(models, opts, scenarios, event_values, world, args, it, seed):
    """Rollout -> score -> pairs -> update. Returns the iteration's metrics (one metrics.jsonl line).
    models: {"expert", "agent": (model, tokenizer)}, and "expert_sft", the frozen SFT Expert: pi_ref
    with --ref sft, and the reference of the kl_to_sft metric; opts: {"expert", "agent": AdamW}."""
    t0 = time.time()
    rng = random.Random(seed)
    (expert_model, tok_e), (agent_model, tok_a) = models["expert"], models["agent"]
    # 1. K rollouts per scenario, sampled from the current Expert (its log-probs recorded):
    #    independent dialogues, or continuations of one dialogue from a branch decision (--rollouts)
    # the models the rollouts play with: a bf16 copy of each with --bf16 on a GPU (lm.rollout_model)
    playing = {name: (lm.rollout_model(models[name][0], args), models[name][1]) for name in ("expert", "agent")}

    def make(batch, index, **kw):
        return rollout_lib.ExpertDialogues(playing["expert"], playing["agent"], batch, world, seed, index=index, **kw)
    mine = parallel.share(list(range(len(scenarios))))      # distributed: each rank plays its scenarios' groups
    n_independent = round(getattr(args, "mix", 0.0) * len(scenarios))   # --mix: the first scenarios independent
    played = {}
    for mode, part in (("independent", [i for i in mine if i < n_independent]),
                       (args.rollouts, [i for i in mine if i >= n_independent])):
        if part:
            played.update(zip(part, rollout_lib.play_groups(make, [scenarios[i] for i in part], args.k, part, seed,
                                                            mode, args.branch_at, args.agent_temperature,
                                                            args.max_reply_tokens)))
    groups = parallel.gather([played[i] for i in mine])     # every rank: the whole batch, in order
    trajs = [tr for group in groups for tr in group]
    sizes = [len(group) for group in groups]                 # K each; fewer for a fork group with few decisions
    rollout_groups = [list(range(sum(sizes[:n]), sum(sizes[:n + 1]))) for n in range(len(groups))]
    # 2. score with R (eq. 3) and build pairs within each scenario (--rollouts fork: each fork with its spine)
    scores = [joint_reward(tr["record"], event_values, world.HORIZON, args.alpha) for tr in trajs]
    rewards = [m["R"] for m in scores]
    scored, scored_groups, scored_rewards = fork_views(trajs, rollout_groups, rewards) if args.rollouts == "fork" \
        else (trajs, rollout_groups, rewards)
    chose = lambda i: segment_strategies(scored[i], args.segment)   # noqa: E731  (--segment: pairs must differ there)
    pairs = build_pairs(scored_rewards, scored_groups, args.delta, args.max_pairs,
                        (lambda w, l: chose(w) != chose(l)) if args.segment else None)
    # 3. Expert update on the trajectory-level preference loss, eq. (4) (or (4'), --listwise)
    units = scored_groups if args.listwise else pairs
    expert_model.train()
    losses, stats = [], {}
    if units:
        ref_model = models["expert_sft"][0] if args.ref == "sft" else expert_model   # before any step
        S_ref = reference_logps(ref_model, tok_e, scored, units, world.STRATEGIES, args.segment,
                                getattr(args, "device_batch_size", None))   # (N,)
        for _ in range(args.gopo_epochs):
            loss, stats = expert_update(models["expert"], opts["expert"], scored, units, S_ref,
                                        torch.tensor(scored_rewards), world.STRATEGIES, args)
            losses.append(loss)           # stats: the last step's forward, as a DPO trainer logs them
    expert_model.eval()
    if "expert_sft" in models:
        stats["kl_to_sft"] = kl_to(expert_model, models["expert_sft"][0], tok_e, trajs, world.STRATEGIES,
                                   getattr(args, "device_batch_size", None))
    # 4. CS alignment, eq. (5): turn-level DPO on adherence
    with parallel.gathered(agent_model):   # the same pairs on every rank (same trajectories, same seed)
        cs_pairs = cs_alignment_pairs(playing["agent"][0], tok_a, trajs, world.recognise, args.cs_samples, rng,
                                      max_new_tokens=args.max_reply_tokens) if args.cs_samples else []
    cs_loss = None
    if cs_pairs:
        agent_model.train()
        cs_loss = agent_update(agent_model, opts["agent"], cs_pairs, tok_a.pad_token_id, args.beta_cs,
                               getattr(args, "device_batch_size", None))
        agent_model.eval()
    recs = [tr["record"] for tr in trajs]
    finite = [x for x in losses if math.isfinite(x)]
    return {"iter": it, **rollout_scores(scores, trajs), "gre": tse.mean(tse.record_gre(r, world.recognise) for r in recs),
            "loss": tse.mean(finite) if finite else None, "nonfinite_steps": len(losses) - len(finite),
            "pairs": len(pairs), "cs_pairs": len(cs_pairs), **stats, **decision_stats(trajs, pairs, world, scored),
            "cs_loss": cs_loss if cs_loss is None or math.isfinite(cs_loss) else None,
            "turns_played": rollout_lib.turns_played(trajs), "seconds": round(time.time() - t0, 2)}


def fork_views(trajs, rollout_groups, rewards):
    """--rollouts fork: what the loss reads. Each fork is paired with its spine alone, and the two
    share every decision before the fork's, so the spine is scored from there on: a view of it (the
    same dialogue, a dict sharing its token lists, its "branch" set to the fork's) per fork.
    Returns (views, groups of [spine view, fork], their rewards); the metrics still read each
    dialogue once."""
    views, groups, view_rewards = [], [], []
    for g in rollout_groups:
        spine = g[0]
        if not any(trajs[i]["fork"] for i in g):   # --mix: an independent group, read as it is
            groups.append(list(range(len(views), len(views) + len(g))))
            views += [trajs[i] for i in g]
            view_rewards += [rewards[i] for i in g]
            continue
        for i in g[1:]:
            groups.append([len(views), len(views) + 1])
            views += [{**trajs[spine], "branch": trajs[i]["branch"]}, trajs[i]]
            view_rewards += [rewards[spine], rewards[i]]
    return views, groups, view_rewards


def rollout_scores(scores, trajs):
    """What every method logs of its rollouts (joint_reward's dicts, one per trajectory): the means of R
    and of what it is built from; on_policy/: over the dialogues the policy played from the start alone
    (each group's first, every independent one), leaving out those that copy another's prefix. A fork's
    decision is the runner-up, off the policy, so the training-side tuning rule reads on_policy/tse."""
    on = [m for m, tr in zip(scores, trajs) if not tr.get("fork")]
    return {**{k: tse.mean(m[k] for m in scores) for k in ("R", "tse", "esndcg", "success")},
            **{f"on_policy/{k}": tse.mean(m[k] for m in on) for k in ("R", "tse")}}


def decision_stats(trajs, pairs, world, paired=None):
    """Which decisions an iteration's rollouts get right, and which its pairs contrast, per decision
    group (worlds.decisions: the kind of decision, the strategy taken, the label policy's choice);
    paired: the trajectories the pairs index (fork_views; default trajs):
      acc/<group>    share of the rollouts' decisions that match the label: each sampled decision
                     once (a fork's copied turns count in the dialogue they were copied from);
      pairs/<group>  share of the preference pairs whose first differing decision is of that group
                     (the winner's); pairs/same: the two dialogues chose the same strategies throughout.
    {} for a world without a tracker to read its dialogues (logged data)."""
    if not hasattr(world, "read"):
        return {}
    seen = [worlds.decisions(world, tr["record"]) for tr in trajs]              # [(group, taken, label)] each
    counts = worlds.tally(world, [d[tr["branch"] if tr.get("fork") else 0:] for tr, d in zip(trajs, seen)])
    if paired is not None and paired is not trajs:
        by_record = {id(tr["record"]): d for tr, d in zip(trajs, seen)}
        seen = [by_record[id(tr["record"])] for tr in paired]
    first = {g: 0 for g in [*worlds.decision_groups(world), "same"]}
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


