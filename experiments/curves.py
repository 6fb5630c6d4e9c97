"""Learning curves at equal simulated turns: the share of the SFT -> Expert-ceiling gap each arm of
docs/forks.md closes at each kept checkpoint, pooled over seeds, with its bootstrap interval.

    python -m experiments.curves out/forks --sft out/compare-desk/sft --png docs/img/forks-curves.png

Reads RUNS/<arm>-s<seed>/at-<turns>/ (train.py --keep-at, each evaluated by `eval.py --n-scenarios
400`: eval_gopo.jsonl and eval_sft.jsonl, the same held-out customers) and each seed's ceiling,
SFT/s<seed>/ceilings.json (python -m experiments.ceilings SFT/s<seed> --n 400). For each arm and
checkpoint, over the seeds that have it:
  gap closed = sum(arm - SFT) / sum(ceiling - SFT) over customers (each averaged over seeds first),
  with a paired-bootstrap 95% CI (experiments.compare.ceiling_gap); TSE against SFT and against A0
  at the same turns, paired; accuracy per decision group; sop_ok; kl_to_sft and the GOPO seconds
  at the iteration that crossed the mark (the run's metrics.jsonl); the training-side tuning rule's
  figure, on_policy/tse over the 5 iterations up to the mark (never the held-out customers; the mean
  over the seeds whose runs logged it, named where that is not all of them: compare arms on the same
  seeds, --seeds); with
  several seeds, each seed's own gap closed too. The GOPO seconds are wall time on a shared machine: compare arms only when
  they ran alone.
Prints a markdown table, writes curves.json beside the runs and the figure (gap closed against
agent turns, one line per arm, its CI as a band).
"""
import json
import os
import re

import checkpoint
import cli
import data
import eval as eval_lib
import tse
from experiments.compare import ceiling_gap

p = cli.Parser(__doc__)
p.add_argument("runs", help="the folder of <arm>-s<seed> runs (experiments/forks.sh's OUT)")
p.add_argument("--sft", default="out/compare-desk/sft", help="the folder of the SFT runs s<seed>, each with ceilings.json")
p.add_argument("--png", default=None, help="where the figure goes (default: RUNS/curves.png)")
p.add_argument("--baseline", default="A0", help="the arm the others are paired against at equal turns")
p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="S1,S2,..",
               help="only these training seeds (default: every seed found); a curve pools the same seeds at every point")
p.add_argument("--bootstrap", type=cli.positive(int), default=2000, help="resamples for the intervals")


def checkpoints(runs):
    """{arm: {turns: {seed: at-folder}}} of every evaluated kept checkpoint under runs."""
    found = {}
    for name in sorted(os.listdir(runs)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        if not m or not os.path.isdir(os.path.join(runs, name)):
            continue
        for at in os.listdir(os.path.join(runs, name)):
            t = re.fullmatch(r"at-(\d+)", at)
            folder = os.path.join(runs, name, at)
            if t and os.path.exists(os.path.join(folder, "eval.json")):
                found.setdefault(m[1], {}).setdefault(int(t[1]), {})[int(m[2])] = folder
    return found


def customer_tse(folder, row):
    """(n,) TSE per held-out customer of one eval.py row of a kept checkpoint."""
    world = checkpoint.world_of(checkpoint.read_config(folder), folder)
    values = checkpoint.read_values(os.path.join(folder, "values.json"))
    recs = data.read_jsonl(os.path.join(folder, f"eval_{row}.jsonl"))
    return eval_lib.per_dialogue(recs, values, world)["tse"]


def at_mark(run, turns):
    """The metrics.jsonl line of the iteration that crossed `turns` agent turns, the GOPO seconds up to
    it, and the training-side tuning rule's figure there: on_policy/tse over the last 5 iterations (the
    rollouts the policy played from the start; None where a fork or branch run did not log it yet)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    upto = [m for m in lines if m["agent_turns"] < turns]
    upto += [m for m in lines if m["agent_turns"] >= turns][:1]   # --keep-at saves after this one
    independent = checkpoint.read_config(run).get("rollouts") == "independent"
    last = [m.get("on_policy/tse", m["tse"] if independent else None) for m in upto[-5:]]
    return upto[-1], sum(m["seconds"] for m in upto), None if None in last else sum(last) / len(last)


def mean_over_seeds(rows):
    return [sum(col) / len(col) for col in zip(*rows)]


def main(argv=None):
    args = p.parse_args(argv)
    found = checkpoints(args.runs)
    if not found:
        eval_lib.die(f"{args.runs}: no <arm>-s<seed>/at-<turns>/eval.json (run experiments/forks.sh first)")
    tses, results = {}, []
    for arm in sorted(found):
        for turns in sorted(found[arm]):
            seeds = sorted(s for s in found[arm][turns] if args.seeds is None or s in args.seeds)
            if not seeds:
                continue
            folders = [found[arm][turns][s] for s in seeds]
            ceilings = [os.path.join(args.sft, f"s{s}") for s in seeds]
            if not all(os.path.exists(os.path.join(c, "ceilings.json")) for c in ceilings):
                print(f"skipped {arm} at {turns}: a seed's ceilings.json is missing ({', '.join(ceilings)})")
                continue
            arm_tse = [customer_tse(f, "gopo") for f in folders]
            sft_tse = [customer_tse(f, "sft") for f in folders]
            tses[arm, turns] = dict(zip(seeds, arm_tse))
            gap = ceiling_gap([(c, None) for c in ceilings], arm_tse, sft_tse, len(arm_tse[0]), args.bootstrap)
            evals = [json.load(open(os.path.join(f, "eval.json"))) for f in folders]
            marks = [at_mark(os.path.dirname(f), turns) for f in folders]
            rule = {s: r for s, (_, _, r) in zip(seeds, marks) if r is not None}
            groups = {g: sum(e["decision_groups"]["gopo"][g] for e in evals) / len(evals)
                      for g in evals[0]["decision_groups"]["gopo"]}
            per_seed = [ceiling_gap([(c, None)], [a], [b], len(a), args.bootstrap)["mean"]
                        for c, a, b in zip(ceilings, arm_tse, sft_tse)]
            results.append({"arm": arm, "turns": turns, "seeds": seeds, "n": len(arm_tse[0]), "gap_per_seed": per_seed,
                            "tse": tse.mean(mean_over_seeds(arm_tse)), "sft_tse": tse.mean(mean_over_seeds(sft_tse)),
                            "vs_sft": list(gap["gain"]), "gap_closed": gap["mean"], "gap_ci95": gap["ci95"],
                            "ceiling_minus_sft": list(gap["ceiling_minus_sft"]), "groups": groups,
                            "sop_ok": sum(e["gopo"]["sop_ok"]["mean"] for e in evals) / len(evals),
                            "kl_to_sft": sum(m.get("kl_to_sft") or 0.0 for m, _, _ in marks) / len(marks),
                            "iterations": [m["iter"] + 1 for m, _, _ in marks],
                            "train_tse": sum(rule.values()) / len(rule) if rule else None, "train_tse_seeds": sorted(rule),
                            "gopo_seconds": sum(s for _, s, _ in marks) / len(marks)})
    for r in results:   # paired against the baseline arm at the same turns, on the seeds both have
        base = tses.get((args.baseline, r["turns"]))
        if base is not None and r["arm"] != args.baseline:
            both = [s for s in r["seeds"] if s in base]
            if both:
                r["vs_" + args.baseline] = list(tse.paired_diff_ci(mean_over_seeds([tses[r["arm"], r["turns"]][s] for s in both]),
                                                                   mean_over_seeds([base[s] for s in both]), args.bootstrap))
    print(table(results, args.baseline))
    with open(os.path.join(args.runs, "curves.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.png or os.path.join(args.runs, "curves.png"))


def table(results, baseline):
    fmt = lambda x: f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"   # noqa: E731
    groups = list(results[0]["groups"]) if results else []
    lines = [f"| arm | agent turns | seeds | TSE | vs SFT, paired | vs {baseline}, paired | gap closed | "
             + " / ".join(groups) + " | sop_ok | kl_to_sft | training-side TSE (rule) | GOPO s |", "|---" * 12 + "|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['turns']:,} ({'/'.join(map(str, r['iterations']))} it) | "
                     f"{','.join(map(str, r['seeds']))} | {r['tse']:.3f} | {fmt(r['vs_sft'])} | "
                     f"{fmt(r['vs_' + baseline]) if 'vs_' + baseline in r else ''} | "
                     f"{r['gap_closed']:.2f} [{r['gap_ci95'][0]:.2f}, {r['gap_ci95'][1]:.2f}]"
                     + (f" ({' / '.join(f'{g:.2f}' for g in r['gap_per_seed'])} by seed)" if len(r["seeds"]) > 1 else "")
                     + " | "
                     + " / ".join(f"{r['groups'][g]:.2f}" for g in groups)
                     + f" | {r['sop_ok']:.3f} | {r['kl_to_sft']:.2f} | "
                     + (f"{r['train_tse']:.3f}" if r["train_tse"] is not None else "not logged")
                     + (f" (seeds {','.join(map(str, r['train_tse_seeds']))})"
                        if r["train_tse"] is not None and r["train_tse_seeds"] != r["seeds"] else "")
                     + f" | {r['gopo_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm in sorted({r["arm"] for r in results}):
        rs = [r for r in results if r["arm"] == arm]
        xs = [0] + [r["turns"] / 1000 for r in rs]                  # 0 turns: SFT, nothing closed
        lo, hi = [0] + [r["gap_ci95"][0] for r in rs], [0] + [r["gap_ci95"][1] for r in rs]
        seeds = sorted({s for r in rs for s in r["seeds"]})
        line, = ax.plot(xs, [0] + [r["gap_closed"] for r in rs], marker="o",
                        label=f"{arm} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    for y, what in ((0.30, "target at 2x"), (0.50, "stretch")):
        ax.axhline(y, color="grey", lw=0.8, ls="--")
        ax.text(ax.get_xlim()[1], y + 0.01, what, color="grey", fontsize=8, ha="right")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("simulated agent turns (thousands); 11.5k = today's desk run (20 x 64 dialogues)")
    ax.set_ylabel("share of the SFT -> ceiling gap closed")
    ax.set_title("GOPO on the desk at equal turns: held-out, 400 customers, 95% CI")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
