"""What GOPO's preference pairs contrast: one iteration's rollouts and pairs, played each way, no update.

    python -m experiments.pairs out/desk                     # the run's SFT Expert, 32 training scenarios
    python -m experiments.pairs out/desk --expert expert --k 8 --scenarios 64

For each way of playing the K rollouts of a scenario (--rollouts independent; branch with --branch-at
entropy, or uniform; branch, entropy, --segment 1) it plays one GOPO iteration's batch with the run's Expert
and CS Agent (sampled, as gopo.iteration does), scores it with R, builds the pairs as GOPO does, and
reports per mode: the scenarios that give a pair, decisions per dialogue, the decisions at which a
pair's two dialogues differ, where they first differ (its index, and its decision group), the pairs
that contrast a group at all (both dialogues meet decisions of that group and choose differently at
them), the share of R's variance
that lies within a scenario (what the dialogues' own choices, not the customer, explain), and the
share of a pair's Expert tokens in the prefix both dialogues share (the update still encodes it, as
the context of the decisions after it; its decision terms cancel).
Nothing is trained. Writes RUN/pairs.json (or --json FILE).
"""
import json
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import checkpoint
import cli
import data
import gopo
import parallel
import rollout as rollout_lib
import worlds

MODES = (("independent", "entropy", 0), ("branch", "entropy", 0), ("branch", "uniform", 0), ("branch", "entropy", 1))

p = cli.Parser(__doc__)
p.add_argument("run", help="a train.py run folder on a built-in world")
p.add_argument("--expert", default="expert_sft", help="the run's Expert checkpoint to play: expert_sft (GOPO's start) "
               "or expert (after GOPO)")
p.add_argument("--scenarios", type=cli.positive(int), default=32, help="training scenarios (after the run's own)")
p.add_argument("--k", type=cli.checked(int, 2, True, 64), default=None, help="rollouts per scenario (default: the run's)")
p.add_argument("--seed", type=int, default=11, help="the rollouts' dice")
p.add_argument("--json", default=None, help="where to write the table (default RUN/pairs.json)")


def pair_stats(world, groups, rewards, pairs, segment=0):
    """The table's numbers for one mode. groups: lists of trajectories; rewards: R of each (flat order)."""
    trajs = [tr for g in groups for tr in g]
    seen = [worlds.decisions(world, tr["record"]) for tr in trajs]              # [(group, taken, label)]
    names = list(worlds.decision_groups(world))
    k = len(groups[0])
    scenario_of = [n for n, g in enumerate(groups) for _ in g]
    differ, first, contrast, common, scored = [], [], {g: 0 for g in names}, [], []
    first_group = {g: 0 for g in names + ["same"]}
    for w, l in pairs:
        a, b = seen[w], seen[l]
        n = max(len(a), len(b))
        scored += [len(gopo.segment_strategies(trajs[i], segment)) for i in (w, l)]   # what the loss sees
        ids_w, ids_l = trajs[w]["ids"], trajs[l]["ids"]   # the Expert's tokens the update encodes for the pair
        common.append(2 * len(os.path.commonprefix([ids_w, ids_l])) / (len(ids_w) + len(ids_l)))
        diff = [t for t in range(n) if t >= len(a) or t >= len(b) or a[t][1] != b[t][1]]
        differ.append(len(diff))
        first_group[gopo.first_difference_group(a, b)] += 1
        if not diff:
            continue
        first.append(diff[0])
        for g in names:   # the pair contrasts group g: both meet decisions of g, and choose differently there
            at_a, at_b = [z for grp, z, _ in a if grp == g], [z for grp, z, _ in b if grp == g]
            contrast[g] += bool(at_a and at_b and at_a != at_b)
    mean_R = sum(rewards) / len(rewards)
    total = sum((r - mean_R) ** 2 for r in rewards)
    within = sum((rewards[i] - sum(rewards[j] for j in range(n * k, (n + 1) * k)) / k) ** 2
                 for n in range(len(groups)) for i in range(n * k, (n + 1) * k))
    share = lambda c: c / len(pairs) if pairs else None   # noqa: E731
    return {"scenarios_with_a_pair": len({scenario_of[w] for w, _ in pairs}) / len(groups),
            "pairs": len(pairs), "decisions_per_dialogue": sum(len(s) for s in seen) / len(seen),
            "differing_decisions_per_pair": float(statistics.mean(differ)) if differ else None,
            "scored_decisions_per_dialogue": float(statistics.mean(scored)) if scored else None,
            "first_difference_median": float(statistics.median(first)) if first else None,
            "first_difference_group": {g: share(c) for g, c in first_group.items()},
            "pairs_contrasting": {g: share(c) for g, c in contrast.items()},
            "reward_variance_within_scenarios": within / total if total > 0 else None,
            "common_prefix_token_share": statistics.mean(common) if common else None,
            "turns_played_per_scenario": sum(len(tr["replies"]) - (tr["branch"] if tr["fork"] else 0)
                                             for tr in trajs) / len(groups),   # a fork plays from its branch on
            "mean_R": mean_R}


def main(argv=None):
    args = p.parse_args(argv)
    checkpoint.check_folder(args.run)
    config = checkpoint.read_config(args.run)
    if config.get("data", "sim") != "sim":
        cli.die(f"{args.run}: a run on --data {config['data']}: the pairs' decision groups need a built-in world")
    if config.get("method", "gopo") not in ("gopo", "sft"):
        cli.die(f"{args.run}: an --method {config['method']} run; give a gopo or sft run of train.py")
    if args.expert == "expert" and config.get("method", "gopo") == "sft":
        cli.die(f"{args.run} is an --method sft run: it has no trained Expert (use --expert expert_sft)")
    world = checkpoint.world_of(config, args.run)
    agent = "agent" if args.expert == "expert" else "agent_sft"
    (expert_model, tok_e), (agent_model, tok_a) = (checkpoint.load_checkpoint(os.path.join(args.run, c))
                                                   for c in (args.expert, agent))
    values = checkpoint.read_values(os.path.join(args.run, "values.json"))
    torch.set_num_threads(parallel.cpu_threads())
    k = args.k or config.get("k", 4)
    seeds = data.train_seeds(args.scenarios, offset=config.get("n_logs", 1200) + config.get("iters", 20) *
                             config.get("scenarios", 16))   # training scenarios no iteration of the run used
    scenarios = [world.make_scenario(s) for s in seeds]
    report = {"run": args.run, "expert": args.expert, "k": k, "scenarios": args.scenarios, "modes": {}}
    for rollouts, branch_at, segment in MODES:
        make = lambda batch, index, **kw: rollout_lib.ExpertDialogues((expert_model, tok_e), (agent_model, tok_a), batch,  # noqa: E731
                                                                      world, args.seed, index=index, **kw)
        with torch.no_grad():
            groups = rollout_lib.play_groups(make, scenarios, k, list(range(len(scenarios))), args.seed, rollouts,
                                             branch_at, config.get("agent_temperature", 0.7),
                                             config.get("max_reply_tokens", 32))
        scores = [gopo.joint_reward(tr["record"], values, world.HORIZON, config.get("alpha", 0.5))
                  for g in groups for tr in g]
        rewards = [m["R"] for m in scores]
        trajs = [tr for g in groups for tr in g]
        contrast = (lambda w, l: gopo.segment_strategies(trajs[w], segment) != gopo.segment_strategies(trajs[l], segment)) \
            if segment else None   # as gopo.iteration builds them
        pairs = gopo.build_pairs(rewards, [list(range(n * k, (n + 1) * k)) for n in range(len(groups))],
                                 config.get("delta", 0.05), config.get("max_pairs", 4), contrast)
        stats = {**pair_stats(world, groups, rewards, pairs, segment),
                 "mean_tse": sum(m["tse"] for m in scores) / len(scores)}
        report["modes"][rollouts if rollouts == "independent" else
                        f"branch, {branch_at}" + (f", segment {segment}" if segment else "")] = stats
    print(table(report))
    path = args.json or os.path.join(args.run, "pairs.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"-> {path}")


def table(report):
    modes = report["modes"]
    fmt = lambda x: "—" if x is None else str(x) if isinstance(x, int) and not isinstance(x, bool) else f"{x:.2f}"  # noqa: E731
    lines = [f"Pairs of one iteration: {report['scenarios']} training scenarios x K = {report['k']}, "
             f"{report['run']}/{report['expert']} (sampled, as GOPO plays them; nothing trained)", "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    rows = [("scenarios that give a pair", "scenarios_with_a_pair"), ("pairs", "pairs"),
            ("decisions per dialogue", "decisions_per_dialogue"),
            ("decisions at which a pair's dialogues differ", "differing_decisions_per_pair"),
            ("decisions the loss scores, per dialogue of a pair", "scored_decisions_per_dialogue"),
            ("first differing decision, median", "first_difference_median"),
            ("share of R's variance within scenarios", "reward_variance_within_scenarios"),
            ("share of a pair's Expert tokens in their common prefix", "common_prefix_token_share"),
            ("agent turns played per scenario (K dialogues)", "turns_played_per_scenario"),
            ("mean R / TSE of the rollouts", None)]
    for label, key in rows:
        cells = [fmt(m[key]) if key else f"{m['mean_R']:.3f} / {m['mean_tse']:.3f}" for m in modes.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(modes.values()))
    for g in first["first_difference_group"]:
        lines.append(f"| pairs that first differ at: {g} | " +
                     " | ".join(fmt(m["first_difference_group"][g]) for m in modes.values()) + " |")
    for g in first["pairs_contrasting"]:
        lines.append(f"| pairs that choose differently at: {g} | " +
                     " | ".join(fmt(m["pairs_contrasting"][g]) for m in modes.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
