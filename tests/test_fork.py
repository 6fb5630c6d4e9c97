"""--rollouts fork (rollout.play_forks): one on-policy spine per scenario and K - 1 forks of it, each
at another of its decisions, where it takes the runner-up of the spine's own draw.

What must hold: a fork shares the spine up to its fork decision token for token and takes another
strategy there, one the SOP allows, exactly the runner-up of the spine's Gumbel draw; each fork has
its own copy of the customer; in a (spine, fork) pair the loss scores both from the fork decision on
(gopo.fork_views), so the shared prefix is out of the margin and the NLL; and the dialogues do not
depend on the batch split. The desk learning test with fork pairs is in test_desk.py (its SFT start)."""
import os
import random
import subprocess
import sys

import pytest
import torch

import data
import engine
import expert as expert_lib
import gopo
import rollout as rollout_lib
from worlds import shop

K = 4
SCENARIOS = [shop.make_scenario(s) for s in data.train_seeds(6, offset=7100)]


def play(models, tok, scenarios, index, seed=3, world=shop):
    expert_model, agent_model = models
    make = lambda batch, idx, **kw: rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), batch,  # noqa: E731
                                                                 world, seed, index=idx, **kw)
    return rollout_lib.play_groups(make, scenarios, K, index, seed, "fork", "uniform", 1.0, 12)


def test_a_fork_shares_the_spine_up_to_its_decision_and_takes_the_runner_up_there(models, tok, strategy_ids):
    expert_model, _ = models
    groups = play(models, tok, SCENARIOS, list(range(len(SCENARIOS))))
    forks = 0
    for n, group in enumerate(groups):
        spine = group[0]
        assert spine["branch"] == 0 and not spine["fork"] and 1 <= len(group) <= K
        points = [f["branch"] for f in group[1:]]
        assert points == sorted(set(points))                                    # distinct decisions, in turn order
        for fork in group[1:]:
            b = fork["branch"]
            pos = spine["decisions"][b][0]
            assert fork["fork"] and fork["ids"][:pos] == spine["ids"][:pos]     # the Expert's context up to z_b
            assert fork["decisions"][:b] == spine["decisions"][:b] and fork["replies"][:b] == spine["replies"][:b]
            assert fork["record"]["turns"][:1 + 2 * b] == spine["record"]["turns"][:1 + 2 * b]
            z_spine, z_fork = spine["decisions"][b][1], fork["decisions"][b][1]
            assert z_fork != z_spine and bool(spine["allowed"][b][z_fork])       # another strategy, SOP-allowed
            # the runner-up of the spine's own draw: its Gumbel scores at b, the spine's choice first
            with torch.no_grad():
                logits = expert_model(input_ids=torch.tensor([spine["ids"][:pos]])).logits[:, -1]
            logps = expert_lib.masked_logps(logits, strategy_ids, spine["allowed"][b][None])[0]
            u = engine.uniforms(torch.tensor([3 * 1_000_003 + n * K]), (2 * b) << 12, len(shop.STRATEGIES))[0]
            scores = logps - (-u.clamp(min=1e-20).log()).log()
            top2 = scores.topk(2).indices.tolist()
            assert top2 == [z_spine, z_fork], (top2, z_spine, z_fork)
            forks += 1
    assert forks >= 2 * len(groups)


def test_each_fork_gets_its_own_customer_and_dice(models, tok):
    """The forks of one spine play on from copies of its customer (rollout.Dialogues.fork, tested for
    branch) with their own dice: after the fork decision they are free to part."""
    groups = play(models, tok, SCENARIOS[:3], [0, 1, 2])
    later = [f["record"]["turns"][2 + 2 * f["branch"]:] != g[0]["record"]["turns"][2 + 2 * f["branch"]:]
             for g in groups for f in g[1:]]
    assert any(later)


def test_fork_views_score_each_pair_from_its_fork_decision(models, tok):
    """fork_views: per fork, a view of the spine with the fork's branch, paired with the fork; the
    loss (gopo.scored_logps) scores both from there, so the prefix decisions are out of the margin
    and the NLL, whatever they were."""
    expert_model, _ = models
    groups = play(models, tok, SCENARIOS[:3], [0, 1, 2])
    trajs = [t for g in groups for t in g]
    sizes = [len(g) for g in groups]
    rollout_groups = [list(range(sum(sizes[:n]), sum(sizes[:n + 1]))) for n in range(len(groups))]
    rewards = [0.1 * i for i in range(len(trajs))]
    views, pair_groups, view_rewards = gopo.fork_views(trajs, rollout_groups, rewards)
    assert len(views) == 2 * (len(trajs) - len(groups)) and all(len(g) == 2 for g in pair_groups)
    with torch.no_grad():
        S, n_steps = gopo.scored_logps(expert_model, tok, views, shop.STRATEGIES)
    for g, (a, b) in zip([g for g in rollout_groups for _ in g[1:]], pair_groups):
        spine, fork = views[a], views[b]
        assert spine["record"] is trajs[g[0]]["record"] and spine["branch"] == fork["branch"] > -1
        assert trajs[g[0]]["branch"] == 0                            # the spine itself is not changed
        assert view_rewards[a] == rewards[g[0]]
        assert int(n_steps[a]) == len(spine["decisions"]) - spine["branch"]
        assert int(n_steps[b]) == len(fork["decisions"]) - fork["branch"]
    with torch.no_grad():
        full, _ = gopo.scored_logps(expert_model, tok, [dict(v, branch=0) for v in views], shop.STRATEGIES)
    for a, b in pair_groups:   # the dropped prefix terms are the same in both: they cancel in the margin
        assert float((full[a] - full[b]) - (S[a] - S[b])) == pytest.approx(0.0, abs=1e-4)


def test_forked_dialogues_do_not_depend_on_the_batch_split(models, tok):
    whole = play(models, tok, SCENARIOS, list(range(6)))
    parts = [play(models, tok, SCENARIOS[i::2], list(range(6))[i::2]) for i in (0, 1)]
    for n, group in enumerate(whole):
        other = parts[n % 2][n // 2]
        assert len(group) == len(other)
        for a, b in zip(group, other):
            assert a["record"]["turns"] == b["record"]["turns"] and a["ids"] == b["ids"] and a["branch"] == b["branch"]


def test_fork_points_are_distinct_open_decisions():
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        pts = rollout_lib.fork_points({"allowed": allowed}, 2, rng)
        assert len(pts) == 2 and pts == sorted(set(pts)) and set(pts) <= {1, 3, 4}
        seen.add(tuple(pts))
    assert seen == {(1, 3), (1, 4), (3, 4)}                         # uniform: every pair drawn
    assert rollout_lib.fork_points({"allowed": allowed}, 5, rng) == [1, 3, 4]


def test_mix_plays_the_first_share_independent(models, tok):
    """--mix F: the first round(F * B) scenarios of an iteration get independent groups, the rest fork
    groups; fork_views reads an independent group as it is (its K rollouts, pairs among them); the
    training-side on_policy/ scores read the spines and the independent dialogues, never a fork."""
    groups = play(models, tok, SCENARIOS[:2], [0, 1])
    expert_model, agent_model = models
    make = lambda batch, idx, **kw: rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), batch,  # noqa: E731
                                                                 shop, 3, index=idx, **kw)
    independent = rollout_lib.play_groups(make, SCENARIOS[2:3], K, [2], 3, "independent", "uniform", 1.0, 12)
    trajs = [t for g in groups + independent for t in g]
    sizes = [len(g) for g in groups + independent]
    rollout_groups = [list(range(sum(sizes[:n]), sum(sizes[:n + 1]))) for n in range(len(sizes))]
    views, pair_groups, _ = gopo.fork_views(trajs, rollout_groups, [0.0] * len(trajs))
    assert pair_groups[-1] == list(range(len(views) - K, len(views)))           # the independent group, whole
    assert all(len(g) == 2 for g in pair_groups[:-1])

    scores = [{"R": 10.0 * i, "tse": float(i), "esndcg": 0.0, "success": 0.0} for i in range(len(trajs))]
    on = [i for i, t in enumerate(trajs) if not t["fork"]]   # the spines and the whole independent group
    assert on == [0, sizes[0], *range(sizes[0] + sizes[1], len(trajs))]
    m = gopo.rollout_scores(scores, trajs)
    assert m["on_policy/tse"] == pytest.approx(sum(on) / len(on)) != m["tse"]
    assert m["on_policy/R"] == pytest.approx(10.0 * sum(on) / len(on))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command, needles", [
    (["train.py", "--rollouts", "fork", "--k", "1"], ["--k must be >= 2"]),
    (["train.py", "--rollouts", "fork", "--listwise"], ["--listwise"]),
    (["train.py", "--mix", "0.5"], ["--mix", "independent"]),
    (["train.py", "--rollouts", "fork", "--mix", "1.5"], ["--mix"]),
    (["-m", "experiments.baselines", "--method", "gopo-noexpert", "--rollouts", "fork"], ["fork", "flat agent"]),
])
def test_bad_fork_flags_are_one_line_and_write_nothing(tmp_path, command, needles):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, *command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(n in r.stderr for n in needles), r.stderr
    assert not out.exists()
