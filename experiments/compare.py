"""The paper's comparison, every method on the same held-out scenarios, pooled over training seeds.

    python -m experiments.compare out/sft out/ppo out/memento out/gopo-noexpert out/gopo

Each folder is one run (train.py, experiments.baselines) or holds runs of one method (out/ppo/s0,
s1, s2); a folder named after a method plus a suffix (out/gopo-alpha1) is a variant of it with its
own row. Every run is rolled out greedily on the same --n-scenarios held-out scenarios; a method's
row pools its seeds (the 95% CI is over all its dialogues, seeds x scenarios; the per-seed TSE
means show the spread between seeds). The behaviour policy is the teacher of the logs; the oracle,
which knows the hidden goal, gives the reference sequences z* (not a TSE ceiling: it spends turns
on upsells). Relative TSE of GOPO over a baseline is the ratio of their mean TSEs, with a 95% CI
from a paired bootstrap over scenarios (each scenario's TSE averaged over seeds first).

Writes compare.md, compare.json ({method: {metric: {"mean", "ci95"}}, "budget", "relative_tse" (of
the gopo row), "relative_tse_by_gopo_row", "per_seed_tse", "train_seconds", "n_scenarios"}) and
compare.png (bars, and each method's training curve of TSE on its own sampled rollouts). Metrics:
TSE, success, ESNDCG, GRE, turns, sop_ok (eval.sop_ok: every reply's recognised act allowed by
the SOP) and order value.

--planner MODEL / --planner-url URL --planner-model NAME (eval.py's flags, planner.py) add a prompted
planner's row: on each seed's gopo run (else the first folder whose method has a CS Agent), the prompted
model decides and that run's CS Agent writes; pooled over those seeds like a method, with its relative
TSE in the table (shots: the first run's logged dialogues).
"""
import json
import os
import random

import cli
import data
import eval as eval_lib
import lm
import planner as planner_lib
import plots
import tse
import worlds
import checkpoint

p = cli.Parser(__doc__)
p.add_argument("compare", nargs="+", metavar="RUNS",
               help="run folders, or folders of runs of one method (training seeds, pooled)")
p.add_argument("--out", default=None, help="where compare.md/json/png go (default: the runs' parent folder)")
p.add_argument("--bootstrap", type=cli.positive(int), default=2000, help="resamples for the CI of relative TSE")
p.add_argument("--n-scenarios", type=cli.positive(int), default=200, help="held-out scenarios")
p.add_argument("--batch", type=cli.positive(int), default=100, help="dialogues rolled out together")
p.add_argument("--seed", type=int, default=0, help="customer template seed")
p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
               help="where the rollouts run: auto = CUDA when there is a GPU")
p.add_argument("--bf16", action="store_true", help="bf16 autocast for the rollouts (weights stay as saved)")
eval_lib.add_planner_flags(p, show_prompt=False)

METRICS = eval_lib.METRICS
SFT_SETTINGS = tuple(k for k in checkpoint.SFT_KEYS if k not in ("seed", "data_path"))   # the same in every run pooled
ROLLOUT_BUDGET = ("iters", "scenarios", "k")


def find_runs(folder):
    """The run folders under one --compare argument: itself, or its subfolders that are runs."""
    checkpoint.check_folder(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return [folder]
    runs = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, d, "config.json")))
    if not runs:
        eval_lib.die(f"{folder} holds no train.py run (no config.json in it or in its subfolders)")
    return runs


def read_method(folder):
    """(method, [(run, config)]) of one --compare argument; its runs must all be of one method."""
    runs = [(r, checkpoint.read_config(r)) for r in find_runs(folder)]
    found = {c.get("method", "gopo") for _, c in runs}
    if len(found) > 1:
        eval_lib.die(f"{folder} mixes runs of --method {', '.join(sorted(found))}; give one folder per method")
    method = found.pop()
    if method not in checkpoint.METHODS or not checkpoint.METHODS[method].rows:
        eval_lib.die(f"{folder}: unknown --method '{method}' in its config.json")
    if any(c.get("data", "sim") != "sim" for _, c in runs):
        eval_lib.die(f"{folder}: --compare runs on the built-in worlds only (their held-out scenarios); "
                     "evaluate a real-data run with python eval.py RUN")
    return method, runs


def check_budget(methods):
    """Every run has the same SFT settings, every trained method the same rollout budget: or exit."""
    first = {}
    for runs in methods.values():
        for run, c in runs:
            keys = SFT_SETTINGS + (ROLLOUT_BUDGET if c.get("method", "gopo") != "sft" else ())
            for k in keys:
                if k in first and first[k][0] != c.get(k):
                    eval_lib.die(f"{run} has --{k.replace('_', '-')} {c.get(k)} but {first[k][1]} has "
                                 f"{first[k][0]}: compare runs with one SFT setting and one rollout budget")
                first.setdefault(k, (c.get(k), run))
    get = lambda k: first[k][0] if k in first else None
    n_logs = get("n_logs")
    return {"sft_dialogues": n_logs, "sft_batch": get("sft_batch"),
            "expert_sft_steps": get("expert_sft_steps") or get("sft_steps"),   # runs before the flag: --sft-steps
            "agent_sft_steps": get("agent_sft_steps") or get("sft_steps"),   # runs before the flag: the same
            "iters": get("iters"), "dialogues_per_iter": (get("scenarios") or 0) * (get("k") or 0),
            "rollouts_after_sft": (get("iters") or 0) * (get("scenarios") or 0) * (get("k") or 0),
            "seeds": {name: [c["seed"] for _, c in runs] for name, runs in methods.items()}}


def relative_tse(per_scenario, a, b, n_boot, seed=0):
    """mean TSE of a / mean TSE of b, and a paired-bootstrap 95% CI over scenarios.
    per_scenario[m]: (S,) TSE of each held-out scenario, averaged over m's seeds."""
    xa, xb = per_scenario[a], per_scenario[b]
    ratio = sum(xa) / max(1e-12, sum(xb))   # as in the bootstrap: a row with TSE 0 everywhere (a random planner)
    rng = random.Random(seed)
    n = len(xa)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(sum(xa[i] for i in idx) / max(1e-12, sum(xb[i] for i in idx)))
    boots.sort()
    return {"mean": ratio, "ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]]}


def label(folder, method):
    """A row's name: the folder's name where it starts with the method's (gopo-alpha1: a variant of
    gopo, its own row), else the method (a folder named s0 is a single run of its config's method)."""
    name = os.path.basename(os.path.normpath(folder))
    return name if name.startswith(method) and method != "sft" else method


def main(argv=None):
    args = p.parse_args(argv)
    methods, method_of = {}, {}
    for folder in args.compare:
        method, runs = read_method(folder)
        name = label(folder, method)
        if name in methods:
            eval_lib.die(f"two folders hold {name} runs; put a method's seeds in one folder (a variant in a "
                         f"folder named after it, e.g. {method}-variant)")
        methods[name], method_of[name] = runs, method
    budget = check_budget(methods)
    out = args.out or os.path.commonpath([os.path.dirname(os.path.abspath(f.rstrip("/"))) for f in args.compare])
    os.makedirs(out, exist_ok=True)
    rows_of = lambda name: checkpoint.METHODS["sft"].rows if method_of[name] == "sft" else [name]
    device = eval_lib.device_of(args)
    loaded = {run: checkpoint.load_run(run, checkpoint.METHODS[method_of[name]].rows[:1] if method_of[name] != "sft"
                                     else checkpoint.METHODS["sft"].rows, device)
              for name, runs in methods.items() for run, _ in runs}   # every checkpoint loads first
    first_run, first_config = next(iter(methods.values()))[0]
    world = checkpoint.world_of(first_config, first_run)       # check_budget: every run has the same world
    planners, host = {}, None
    if args.planner or args.planner_url or args.planner_shots or args.planner_model:
        hosts = [n for n in methods if method_of[n] == "gopo"] + \
            [n for n in methods if checkpoint.METHODS[method_of[n]].expert is not None]
        if not hosts:
            eval_lib.die("--planner: no folder holds runs with a CS Agent that takes a strategy (gopo, sft, memento)")
        host = hosts[0]
        run, config = methods[host][0]
        planners = eval_lib.planners_of(args, run, config, method_of[host], device)
    scenarios = [world.make_scenario(s) for s in data.test_seeds(args.n_scenarios)]
    from tqdm import tqdm
    pooled, per_seed, per_scenario, curves, seconds, groups = {}, {}, {}, {}, {}, {}
    jobs = [(name, row, run) for name, runs in methods.items() for run, _ in runs for row in rows_of(name)]
    for name, row, run in tqdm(jobs, desc="compare", unit="run"):
        played = row if method_of[name] == "sft" else method_of[name]
        values = checkpoint.read_values(os.path.join(run, "values.json"))
        with lm.autocast(device, args.bf16):
            recs = eval_lib.method_records(loaded[run], played, scenarios, world, args.batch, args.seed)
        per = eval_lib.per_dialogue(recs, values, world, flat=eval_lib.is_flat(played))
        for k in METRICS:
            pooled.setdefault(row, {}).setdefault(k, []).extend(per[k])
        per_seed.setdefault(row, []).append(sum(per["tse"]) / len(per["tse"]))
        per_scenario.setdefault(row, []).append(per["tse"])
        add_groups(groups.setdefault(row, {}), worlds.decision_accuracy(world, recs))
    for name, pl in planners.items():   # each seed's host run: its CS Agent writes, the prompted model decides
        for run, _ in methods[host]:
            agent = loaded[run][checkpoint.METHODS[method_of[host]].agent]
            with lm.autocast(device, args.bf16):
                recs = planner_lib.play(pl, agent, scenarios, world, args.seed, batch=args.batch)
            values = checkpoint.read_values(os.path.join(run, "values.json"))
            per = eval_lib.per_dialogue(recs, values, world)
            for k in METRICS:
                pooled.setdefault(name, {}).setdefault(k, []).extend(per[k])
            per_seed.setdefault(name, []).append(sum(per["tse"]) / len(per["tse"]))
            per_scenario.setdefault(name, []).append(per["tse"])
            add_groups(groups.setdefault(name, {}), worlds.decision_accuracy(world, recs))
    for name, runs in methods.items():
        curves[name] = [read_curve(run) for run, _ in runs]
        seconds[name] = [read_seconds(run) for run, _ in runs]
    values = checkpoint.read_values(os.path.join(methods[next(iter(methods))][0][0], "values.json"))
    for name in ("behaviour", "oracle"):    # rule policies with template text: no training seed
        recs = [world.play(s, world.POLICIES[name], seed=args.seed) for s in scenarios]
        per = eval_lib.per_dialogue(recs, values, world)
        pooled[name] = {k: per[k] for k in METRICS}
        per_scenario[name] = [per["tse"]]
        groups[name] = worlds.decision_accuracy(world, recs)
    results = {m: eval_lib.summarize(pooled[m]) for m in pooled}
    mean_over_seeds = {m: [sum(col) / len(col) for col in zip(*rows)] for m, rows in per_scenario.items()}
    gopo_rows = [r for r in pooled if method_of.get(r) == "gopo"]       # gopo, and variants like gopo-alpha1
    rel_all = {g: {b: relative_tse(mean_over_seeds, g, b, args.bootstrap) for b in pooled if b not in gopo_rows}
               for g in gopo_rows}
    rel = rel_all.get("gopo", {})
    rows = [r for r in pooled if r not in ("behaviour", "oracle")] + ["behaviour", "oracle"]
    gaps = {g: ceiling_gap(methods[g], per_scenario[g], per_scenario.get("sft"), args.n_scenarios, args.bootstrap)
            for g in gopo_rows if "sft" in per_scenario}
    gaps = {g: x for g, x in gaps.items() if x is not None}

    md = [f"Comparison on {args.n_scenarios} held-out scenarios (greedy; mean [95% CI] over seeds x scenarios).",
          "",
          f"Budget: SFT on {budget['sft_dialogues']} logged dialogues ({budget['expert_sft_steps']} steps of "
          f"{budget['sft_batch']} for the Expert, {budget['agent_sft_steps']} for the models that write replies); then {budget['rollouts_after_sft']} simulated dialogues per method "
          f"and seed ({budget['iters']} iterations x {budget['dialogues_per_iter']}). Seeds: "
          + "; ".join(f"{a} {s}" for a, s in budget["seeds"].items()) + ".",
          "", eval_lib.table(results, rows, METRICS).rstrip(), "",
          "| method | TSE of each seed | train wall time per seed (s) |", "|---|---|---|"]
    for r in rows:
        name = "sft" if r in ("sft", "sft-flat") else r
        secs = ", ".join(f"{s:.0f}" if s is not None else "?" for s in seconds.get(name, [])) or "—"
        md.append(f"| {r} | " + ", ".join(f"{x:.3f}" for x in per_seed.get(r, [])) + f" | {secs} |")
    if rel_all:
        cell = lambda r: f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        md += ["", "Relative TSE of GOPO (its mean TSE / the row's; paired bootstrap over scenarios, 95% CI):", "",
               "| baseline | " + " | ".join(f"{g} / baseline" for g in gopo_rows) + " |",
               "|---|" + "---|" * len(gopo_rows)]
        md += [f"| {b} | " + " | ".join(cell(rel_all[g][b]) for g in gopo_rows) + " |" for b in rel_all[gopo_rows[0]]]
    for g, x in gaps.items():
        md += ["", f"Share of the SFT -> Expert-ceiling TSE gap closed by {g} (experiments.ceilings of each seed's {g} "
               f"run: the ceiling Expert with that run's CS Agent; pooled over seeds, paired bootstrap over scenarios): "
               f"{x['mean']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]; {g} - sft {x['gain'][0]:+.3f} "
               f"[{x['gain'][1]:+.3f}, {x['gain'][2]:+.3f}], ceiling - sft {x['ceiling_minus_sft'][0]:+.3f} TSE."]
    md += ["", f"Decision accuracy against the {worlds.label_policy(world).__name__} by kind of decision, seeds pooled "
           "(share of decisions, count; a flat agent's decision is the act recognised in its reply):", "",
           eval_lib.group_table({r: groups[r] for r in rows}).rstrip()]
    text = "\n".join(md) + "\n"
    print(text)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({**results, "budget": budget, "relative_tse": rel, "relative_tse_by_gopo_row": rel_all,
                   "per_seed_tse": per_seed, "ceiling_gap_closed": gaps,
                   "decision_groups": {r: {g: c / max(n, 1) for g, (c, n) in acc.items()} for r, acc in groups.items()},
                   "train_seconds": seconds, "n_scenarios": args.n_scenarios}, f, indent=2)
    plot(results, rows, curves, os.path.join(out, "compare.png"), args.n_scenarios)


def add_groups(total, counts):
    """Pool worlds.decision_accuracy counts ({group: [right, n]}) into total."""
    for g, (c, n) in counts.items():
        total.setdefault(g, [0, 0])
        total[g][0] += c
        total[g][1] += n


def ceiling_gap(runs, method_tse, sft_tse, n, n_boot, seed=0):
    """Share of the SFT -> Expert-ceiling TSE gap a method's runs close, where every run has a
    ceilings.json (python -m experiments.ceilings RUN) on the same n held-out scenarios: sum(method -
    sft) / sum(ceiling - sft) over scenarios (each averaged over seeds), a paired-bootstrap 95% CI, and
    the paired method - sft and ceiling - sft TSE. None if a run lacks it. method_tse, sft_tse: one
    (n,) list per seed, in the runs' order (sft: its own seeds' runs, pooled the same way)."""
    ceilings = []
    for run, _ in runs:
        path = os.path.join(run, "ceilings.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            per = json.load(f).get("per_scenario_tse", {})
        if len(per.get("ceiling", [])) != n:
            return None
        ceilings.append(per["ceiling"])
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]   # noqa: E731  each scenario, over seeds
    m, s, c = mean(method_tse), mean(sft_tse), mean(ceilings)
    ratio = lambda idx: sum(m[i] - s[i] for i in idx) / max(1e-12, sum(c[i] - s[i] for i in idx))   # noqa: E731
    rng = random.Random(seed)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return {"mean": ratio(range(n)), "ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
            "gain": tse.paired_diff_ci(m, s), "ceiling_minus_sft": tse.paired_diff_ci(c, s)}


def read_curve(run):
    """TSE of the sampled training rollouts that the policy played from the start, per iteration
    (on_policy/tse; tse in runs from before it, the same with independent rollouts); [] for --method sft."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(m := json.loads(line)).get("on_policy/tse", m["tse"]) for line in f if line.strip()]


def read_seconds(run):
    try:
        with open(os.path.join(run, "time.json")) as f:
            return json.load(f)["seconds"]
    except (OSError, ValueError, KeyError):
        return None


def plot(results, rows, curves, path, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    plots.plot(results, rows, None, f"{n} held-out scenarios, seeds pooled", ax=ax[0])
    for method, runs in curves.items():
        runs = [c for c in runs if c]
        if runs:
            L = min(len(c) for c in runs)
            color = plots.colour(rows.index(method), len(rows)) if method in rows else None   # its bar's colour
            ax[1].plot(range(L), [sum(c[i] for c in runs) / len(runs) for i in range(L)], label=method, color=color)
    ax[1].set(title="TSE of the training rollouts (sampled; mean over seeds)", xlabel="iteration")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
