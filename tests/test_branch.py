"""--rollouts branch (rollout.play_groups): K continuations of one dialogue from a branch decision.

What must hold: the continuations share the dialogue up to the branch token for token; each starts
from its own copy of the customer; the shared decisions' terms cancel in a pair's DPO margin (so the
loss may drop them, and does); a dialogue does not depend on which others share its batch; and the
continuations do differ after the branch (their own dice)."""
import copy
import random

import torch

import data
import expert as expert_lib
import gopo
import rollout as rollout_lib
import serialize
import worlds
from worlds import desk, shop

K = 4
SCENARIOS = [shop.make_scenario(s) for s in data.train_seeds(6, offset=7000)]


def play(models, tok, scenarios, index, rollouts="branch", branch_at="entropy", seed=3, world=shop):
    expert_model, agent_model = models
    make = lambda batch, idx, **kw: rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), batch, world, seed,
                                                                 index=idx, **kw)
    return rollout_lib.play_groups(make, scenarios, K, index, seed, rollouts, branch_at, 1.0, 12)


def test_continuations_share_the_prefix_token_for_token_and_then_part(models, tok):
    groups = play(models, tok, SCENARIOS, list(range(len(SCENARIOS))))
    parted = 0
    for group in groups:
        first, b = group[0], group[0]["branch"]
        assert [m["branch"] for m in group] == [b] * K and [m["fork"] for m in group] == [False] + [True] * (K - 1)
        assert 0 <= b < len(first["decisions"])
        for fork in group[1:]:
            pos = first["decisions"][b][0] if b < len(first["decisions"]) else len(first["ids"])
            assert fork["ids"][:pos] == first["ids"][:pos]                      # the Expert's context up to z_b
            assert fork["decisions"][:b] == first["decisions"][:b]
            assert fork["ref_logps"][:b] == first["ref_logps"][:b]
            assert fork["replies"][:b] == first["replies"][:b]
            said = serialize.customer_ids(tok, first["record"]["turns"][2 * b]["text"])  # the CS Agent's, up to turn b
            n = (first["replies"][b - 1][1] if b else len(serialize.start_ids(tok))) + len(said)
            assert fork["agent_ids"][:n] == first["agent_ids"][:n] and fork["agent_ids"][n - len(said):n] == said
            assert fork["record"]["turns"][:1 + 2 * b] == first["record"]["turns"][:1 + 2 * b]
            assert len(fork["decisions"]) > b                                   # it made decision b itself
            parted += fork["record"]["turns"][1 + 2 * b:] != first["record"]["turns"][1 + 2 * b:]
    assert parted >= len(groups), f"only {parted} continuations differ from their first dialogue after the branch"


def test_each_continuation_gets_its_own_copy_of_the_customer(models, tok):
    expert_model, agent_model = models
    d = rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), SCENARIOS[:2], shop, 5, snapshots=True)
    trajs = d.play(False, 1.0, 12)
    b = len(trajs[0]["decisions"]) // 2
    states = d.fork(0, b, 3)
    customers = [st["customer"] for st in states]
    state = lambda c: {k: v.getstate() if isinstance(v, random.Random) else copy.deepcopy(v) for k, v in vars(c).items()}
    before = [state(c) for c in customers]
    assert len({id(c) for c in customers} | {id(d.customers[0])}) == 4
    assert before[0] == before[1] == before[2]                  # copies of one customer at turn b
    customers[0].reply("Hello! How can I help you today?", b)   # one customer hears a reply...
    customers[0].patience = -99
    assert state(customers[0]) != before[0]
    assert state(customers[1]) == before[1] and state(customers[2]) == before[2]   # ...the others did not
    states[0]["traj"]["turns"].append({"role": "agent", "text": "x"})
    assert len(states[1]["traj"]["turns"]) == 1 + 2 * b and len(trajs[0]["record"]["turns"]) > 1 + 2 * b


def test_shared_decisions_cancel_in_the_dpo_margin(models, tok, strategy_ids):
    """S_theta - S_ref of the winner minus the loser's: the decisions before the branch give the same
    log-probs in both (same tokens), so the margin is the same with or without them, to float
    precision; the loss drops them (gopo.scored_logps scores decisions >= branch only)."""
    expert_model, _ = models
    groups = play(models, tok, SCENARIOS, list(range(len(SCENARIOS))))
    torch.manual_seed(0)
    policy = copy.deepcopy(expert_model)        # a policy that moved away from the reference
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checked, moved = 0, 0.0
    for group in groups:
        b = group[0]["branch"]
        if b == 0:
            continue
        batch = expert_lib.collate(group, tok.pad_token_id, len(shop.STRATEGIES))
        with torch.no_grad():
            lp = expert_lib.decision_logps(policy, batch, strategy_ids)             # (K, T)
            ref = expert_lib.decision_logps(expert_model, batch, strategy_ids)
        for k in range(1, K):
            torch.testing.assert_close(lp[k, :b], lp[0, :b], rtol=0, atol=1e-5)   # the shared terms
        every = batch["step_mask"].float()
        after = every * (torch.arange(every.shape[1]) >= b).float()
        margin = lambda m: (gopo.trajectory_logps(lp, m) - gopo.trajectory_logps(ref, m))   # (K,)
        full, dropped = margin(every), margin(after)
        for k in range(1, K):
            torch.testing.assert_close(full[0] - full[k], dropped[0] - dropped[k], rtol=0, atol=1e-4)
        moved = max(moved, float((full - dropped).abs().max()))
        checked += 1
    assert checked >= 2 and moved > 1e-3      # the prefix terms are not zero: they cancel


def test_expert_loss_scores_only_the_decisions_from_the_branch_on(models, tok, strategy_ids):
    """gopo.scored_logps on a branched group leaves the prefix decisions out, and the loss of a pair
    at margin 0 is log 2 plus the winner's NLL over the scored decisions only."""
    expert_model, _ = models
    group = next(g for g in play(models, tok, SCENARIOS, list(range(len(SCENARIOS)))) if g[0]["branch"] > 0)
    b = group[0]["branch"]
    S, n_steps = gopo.scored_logps(expert_model, tok, group[:2], shop.STRATEGIES)
    losses, _ = gopo.expert_loss(S, S.detach(), n_steps, [[0, 1]], torch.tensor([1.0, 0.0]), 0.5, 0.1)
    with torch.no_grad():
        batch = expert_lib.collate(group[:2], tok.pad_token_id, len(shop.STRATEGIES))
        lp = expert_lib.decision_logps(expert_model, batch, strategy_ids)
    after = (batch["step_mask"] & (torch.arange(lp.shape[1]) >= b)).float()
    by_hand = (lp * after).sum(-1)
    torch.testing.assert_close(S.detach(), by_hand, rtol=0, atol=1e-5)
    assert n_steps.tolist() == after.sum(-1).tolist() and n_steps[0] < batch["step_mask"][0].sum()
    expected = torch.log(torch.tensor(2.0)) + 0.1 * -by_hand[0] / after[0].sum()   # margin 0 at the start: log 2
    torch.testing.assert_close(losses.detach()[0], expected, rtol=0, atol=1e-5)


def test_branched_dialogues_do_not_depend_on_the_batch_split(models, tok):
    """Six scenarios' groups played together, and as two shares (as two ranks play them, with their
    whole-batch numbers): the same dialogues token for token, and the same branch points."""
    whole = play(models, tok, SCENARIOS, list(range(6)))
    parts = [play(models, tok, SCENARIOS[i::2], list(range(6))[i::2]) for i in (0, 1)]
    for n, group in enumerate(whole):
        other = parts[n % 2][n // 2]
        for a, b in zip(group, other):
            assert a["record"]["turns"] == b["record"]["turns"] and a["agent_ids"] == b["agent_ids"]
            assert a["ids"] == b["ids"] and a["branch"] == b["branch"]


def test_independent_mode_is_the_plain_batch(models, tok):
    """--rollouts independent plays exactly the K-per-scenario batch GOPO always played."""
    expert_model, agent_model = models
    groups = play(models, tok, SCENARIOS[:3], [0, 1, 2], rollouts="independent")
    plain = rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), [s for s in SCENARIOS[:3] for _ in range(K)],
                                        shop, 3).play(False, 1.0, 12)
    assert [t["record"]["turns"] for g in groups for t in g] == [t["record"]["turns"] for t in plain]
    assert all(t["branch"] == 0 and not t["fork"] for g in groups for t in g)


def test_branch_points_follow_the_experts_entropy():
    """branch_point: entropy-weighted draws never pick a decision with zero entropy (one allowed
    strategy) and pick in proportion; uniform picks any; no entropy (the flat agent) is uniform."""
    tr = {"replies": [None] * 4, "entropy": [0.0, 1.0, 0.0, 3.0]}
    rng = random.Random(0)
    picks = [rollout_lib.branch_point(tr, "entropy", rng) for _ in range(4000)]
    assert picks.count(0) == picks.count(2) == 0 and abs(picks.count(3) / 4000 - 0.75) < 0.03
    assert set(rollout_lib.branch_point(tr, "uniform", rng) for _ in range(400)) == {0, 1, 2, 3}
    flat = {"replies": [None] * 3, "entropy": []}
    assert set(rollout_lib.branch_point(flat, "entropy", rng) for _ in range(300)) == {0, 1, 2}


def test_decision_stats_count_a_forks_copied_turns_once():
    """acc/<group> counts each sampled decision once: a fork's copied turns are its first dialogue's."""
    rec = desk.play(desk.make_scenario(3), desk.oracle_policy)
    n = sum(t["role"] == "agent" for t in rec["turns"])
    trajs = [{"record": rec, "branch": 2, "fork": False}, {"record": rec, "branch": 2, "fork": True}]
    stats = gopo.decision_stats(trajs, [(0, 1)], desk)
    decisions = worlds.decisions(desk, rec)
    right = sum(taken == label for _, taken, label in decisions) + sum(taken == label for _, taken, label in decisions[2:])
    assert stats["acc/all"] == right / (2 * n - 2)
    assert stats["pairs/same"] == 1.0


def test_the_flat_agent_branches_too_and_its_loss_skips_the_shared_replies(models, tok):
    """gopo-noexpert --rollouts branch: the flat agent's K continuations share their first `branch`
    replies token for token, and the ablation's loss mask (flat_batch(after_branch=True)) leaves
    exactly those replies out."""
    from types import SimpleNamespace
    from experiments import flat
    _, agent_model = models
    args = SimpleNamespace(k=K, agent_temperature=1.0, max_reply_tokens=12)
    trajs = flat.flat_rollout((agent_model, tok), SCENARIOS[:4], shop, args, 2, "branch")
    assert len(trajs) == 4 * K
    for n in range(4):
        group = trajs[n * K:(n + 1) * K]
        b = group[0]["branch"]
        assert all(t["branch"] == b for t in group) and [t["fork"] for t in group] == [False] + [True] * (K - 1)
        end = group[0]["replies"][b - 1][1] if b else 0
        for fork in group[1:]:
            assert fork["agent_ids"][:end] == group[0]["agent_ids"][:end] and fork["replies"][:b] == group[0]["replies"][:b]
        _, _, mask = flat.flat_batch(group, tok.pad_token_id, after_branch=True)
        _, _, every = flat.flat_batch(group, tok.pad_token_id)
        for t, m, e in zip(group, mask, every):
            cut = t["replies"][b][0]                        # the first reply the loss scores
            assert m[:cut].sum() == 0 and torch.equal(m[cut:], e[cut:])


def test_segment_scores_the_branch_decisions_only_and_pairs_must_contrast_there(models, tok, strategy_ids):
    """--segment N: the loss scores decisions b .. b + N - 1 of each trajectory (gopo.scored_steps), and
    build_pairs keeps only pairs that chose differently at one of them (else their margin is 0)."""
    trajs = [{"branch": 2, "decisions": [(0, 1), (5, 2), (9, 3), (12, 4), (15, 0)]},
             {"branch": 0, "decisions": [(0, 1), (5, 2)]}]
    every = gopo.scored_steps(trajs, 5)
    assert every.tolist() == [[False, False, True, True, True], [True] * 5]   # (the step mask cuts the second)
    one = gopo.scored_steps(trajs, 5, segment=1)
    assert one.tolist() == [[False, False, True, False, False], [True, False, False, False, False]]
    assert gopo.segment_strategies(trajs[0], 2) == [3, 4] and gopo.segment_strategies(trajs[0]) == [3, 4, 0]
    rewards = [0.9, 0.1, 0.5, 0.2]
    same_at_b = lambda w, l: (w, l) not in ((0, 1), (2, 1))
    assert gopo.build_pairs(rewards, [[0, 1, 2, 3]], 0.05, 3) == [(0, 1), (0, 3), (0, 2)]
    assert gopo.build_pairs(rewards, [[0, 1, 2, 3]], 0.05, 3, same_at_b) == [(0, 3), (0, 2), (2, 3)]


def test_pair_stats_by_hand():
    """experiments.pairs on one hand-made pair: the oracle's and the behaviour policy's dialogue with one
    customer, where the first differing decision, the differing count and the contrasted groups can be
    read off directly."""
    from experiments import pairs as pairs_lib
    for seed in range(50):
        sc = desk.make_scenario(seed)
        a, b = desk.play(sc, desk.oracle_policy), desk.play(sc, desk.behaviour_policy, seed=1)
        za, zb = ([t["strategy"] for t in r["turns"] if t["role"] == "agent"] for r in (a, b))
        if za != zb:
            break
    da, db = worlds.decisions(desk, a), worlds.decisions(desk, b)
    trajs = [{"record": r, "ids": [1, 2, 3] + [k] * 5, "decisions": [(0, desk.STRATEGIES.index(z)) for z in zs],
              "branch": 0, "fork": False, "replies": [None] * len(zs)} for r, zs, k in ((a, za, 4), (b, zb, 5))]
    stats = pairs_lib.pair_stats(desk, [trajs], [1.0, 0.0], [(0, 1)])
    diff = [t for t in range(max(len(za), len(zb))) if t >= min(len(za), len(zb)) or za[t] != zb[t]]
    assert stats["differing_decisions_per_pair"] == len(diff) and stats["first_difference_median"] == diff[0]
    assert stats["first_difference_group"][da[diff[0]][0]] == 1.0
    for g in desk.DECISION_GROUPS:
        ga, gb = [z for grp, z, _ in da if grp == g], [z for grp, z, _ in db if grp == g]
        assert stats["pairs_contrasting"][g] == float(bool(ga and gb and ga != gb))
    assert stats["common_prefix_token_share"] == 3 / 8 and stats["scored_decisions_per_dialogue"] == (len(za) + len(zb)) / 2
    assert stats["turns_played_per_scenario"] == len(za) + len(zb)
