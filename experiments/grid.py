"""The grid's table and figure (experiments/grid.sh): GOPO's relative TSE over each baseline per cell.

    python -m experiments.grid out/grid          # reads out/grid/h*-p*/compare.json, writes grid.md, grid.png

Each cell's compare.json comes from experiments/compare.py (mean TSE ratio, 95% paired-bootstrap CI
over held-out scenarios, each scenario's TSE averaged over the seeds first).
"""
import json
import os

import cli

p = cli.Parser(__doc__)
p.add_argument("grid", help="the folder grid.sh wrote: one subfolder per cell, h<horizon>-p<paraphrases>")
BASELINES = ("ppo", "gopo-noexpert")


def read_cells(folder):
    """{(horizon, paraphrases): compare.json} for every cell with a comparison, sorted."""
    cells = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "compare.json")
        if name.startswith("h") and "-p" in name and os.path.isfile(path):
            h, k = name[1:].split("-p")
            with open(path) as f:
                cells[(int(h), int(k))] = json.load(f)
    if not cells:
        cli.die(f"{folder} holds no cell with a compare.json (run experiments/grid.sh first)")
    return dict(sorted(cells.items()))


def table(cells):
    ci = lambda r: f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
    md = ["| horizon | paraphrases | TSE sft / ppo / gopo-noexpert / gopo | gopo / ppo | gopo / gopo-noexpert | "
          "sop_ok ppo / gopo-noexpert / gopo | seeds |", "|---|---|---|---|---|---|---|"]
    for (h, k), c in cells.items():
        tse = " / ".join(f"{c[m]['tse']['mean']:.3f}" for m in ("sft", "ppo", "gopo-noexpert", "gopo"))
        sop = " / ".join(f"{c[m]['sop_ok']['mean']:.3f}" for m in ("ppo", "gopo-noexpert", "gopo"))
        md.append(f"| {h} | {k} | {tse} | " + " | ".join(ci(c["relative_tse"][b]) for b in BASELINES)
                  + f" | {sop} | {len(c['per_seed_tse']['gopo'])} |")
    return "\n".join(md) + "\n"


def plot(cells, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [f"horizon {h}\n{k} paraphrases\n({len(c['per_seed_tse']['gopo'])} seed(s))" for (h, k), c in cells.items()]
    width = 0.6 / len(BASELINES)
    for j, b in enumerate(BASELINES):     # a ratio: a point and its CI, not a bar from 0
        rel = [c["relative_tse"][b] for c in cells.values()]
        x = [i + (j - (len(BASELINES) - 1) / 2) * width for i in range(len(cells))]
        y = [r["mean"] for r in rel]
        err = [[m - r["ci95"][0] for m, r in zip(y, rel)], [r["ci95"][1] - m for m, r in zip(y, rel)]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=5, label=f"GOPO / {b}", color=f"C{j}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.077, color="grey", ls="--", lw=0.8, label="paper: GOPO / PPO = 1.077")
    ax.set_xticks(range(len(cells)), names)
    lo = min(c["relative_tse"][b]["ci95"][0] for c in cells.values() for b in BASELINES)
    hi = max(c["relative_tse"][b]["ci95"][1] for c in cells.values() for b in BASELINES)
    ax.set_ylim(min(0.9, lo - 0.02), max(1.12, hi + 0.02))
    ax.set(ylabel="relative held-out TSE (95% CI)", title="When does the split matter? The desk, GOPO over each baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = p.parse_args(argv)
    if not os.path.isdir(args.grid):
        cli.die(f"{args.grid} is not a folder (give the folder experiments/grid.sh wrote, e.g. out/grid)")
    cells = read_cells(args.grid)
    text = table(cells)
    print(text)
    with open(os.path.join(args.grid, "grid.md"), "w") as f:
        f.write(text)
    plot(cells, os.path.join(args.grid, "grid.png"))


if __name__ == "__main__":
    main()
