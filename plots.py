"""The plots: a run's training curves (curves.png, train.py), the held-out bars (eval.png, and the
comparison's), and which strategy follows which customer event (strategies.png, eval.py).

matplotlib is imported inside each function, with the Agg backend: nothing here needs a display, and
the modules that import this one stay importable where matplotlib is slow to load.
"""
import json
import os


def colour(i, n):
    """The i-th of n rows' colour: matplotlib's 10-colour cycle, or its 20 colours past 10 rows."""
    import matplotlib
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i % 20)


def plot(results, methods, path, title, ax=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("tse", "success", "esndcg", "gre", "sop_ok") if k in results[methods[0]]]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(methods)
    for j, name in enumerate(methods):
        r = {k: results[name][k] if results[name][k]["mean"] is not None else {"mean": 0.0, "ci95": [0.0, 0.0]}
             for k in keys}   # a metric that does not apply (GRE of a flat agent) has no bar
        means = [r[k]["mean"] for k in keys]
        err = [[r[k]["mean"] - r[k]["ci95"][0] for k in keys], [r[k]["ci95"][1] - r[k]["mean"] for k in keys]]
        ax.bar([i + j * width for i in range(len(keys))], means, width, yerr=err, capsize=3, label=name,
               color=colour(j, len(methods)))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set(ylim=(0, 1.05), title=title, ylabel="mean (95% CI)")
    ax.legend(fontsize=8, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def plot_curves(run_dir):
    """curves.png of a run (train.py writes it): SFT losses and the per-iteration metrics of the
    method (none for --method sft): the rollouts' scores, the update, DPO's implicit rewards, and per
    decision group (gopo.decision_stats) the rollouts' accuracy and the groups the pairs first differ at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "sft.json")) as f:
        sft = json.load(f)
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    dpo = bool(rows) and "rewards/margins" in rows[-1]
    by_group = {prefix: [k for k in rows[0] if k.startswith(prefix)] if rows else [] for prefix in ("acc/", "pairs/")}
    if len(by_group["pairs/"]) <= 2:   # one decision group (the shop): every pair first differs in it
        by_group["pairs/"] = []
    n = 1 + bool(rows) * (2 + dpo + sum(bool(keys) for keys in by_group.values()))
    cols = n if n <= 4 else 3
    fig, ax = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 4 * ((n + cols - 1) // cols)), squeeze=False)
    ax = ax.flatten()
    for extra in ax[n:]:
        extra.axis("off")
    labels = {"expert_loss": "Expert (decision NLL)", "agent_loss": "CS Agent (reply-token NLL)",
              "flat_loss": "flat agent (reply-token NLL)"}
    for key, curve in sft.items():
        ax[0].plot(curve, label=labels.get(key, key))
    ax[0].set(title="SFT", xlabel="step", ylabel="loss", yscale="log")
    ax[0].legend()
    if rows:
        its = [r["iter"] for r in rows]
        series = lambda key: [r.get(key) if r.get(key) is not None else float("nan") for r in rows]  # noqa: E731
        for key in ("R", "tse", "esndcg", "gre", "success"):
            if key in rows[0]:
                ax[1].plot(its, series(key), label=key)
        ax[1].set(title="rollouts (training scenarios, sampled)", xlabel="iteration")
        ax[1].legend()
        for key, label in (("loss", "loss"), ("value_loss", "value loss"), ("pairs", "pairs"),
                           ("cases", "cases in the bank")):
            if key in rows[0]:
                ax[2].plot(its, series(key), label=label)
        ax[2].set(title="update", xlabel="iteration", yscale="log")
        ax[2].legend()
        i = 3
        if dpo:   # what the Expert's update did to the pairs, in the terms DPO trainers log
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl_to_sft"):
                ax[i].plot(its, series(key), label=key)
            ax[i].axhline(0, color="grey", lw=0.5)
            ax[i].set(title="Expert update: beta (S - S_ref) after it", xlabel="iteration")
            ax[i].legend(fontsize=8)
            i += 1
        titles = {"acc/": "decisions matching the label, by group (rollouts)",
                  "pairs/": "pairs: group of the first differing decision"}
        for prefix, keys in by_group.items():
            if keys:   # which decisions the Expert is learning, and which ones its pairs reach
                for key in keys:
                    ax[i].plot(its, series(key), label=key[len(prefix):], lw=2.5 if key == "acc/all" else 1.5)
                ax[i].set(title=titles[prefix], xlabel="iteration", ylim=(-0.02, 1.02))
                ax[i].legend(fontsize=8)
                i += 1
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=100)
    plt.close(fig)


def situations(rec):
    """(the customer's last event, the strategy chosen after it) for every agent turn of a record."""
    turns = rec["turns"]
    return [(turns[i - 1]["event"] or "opening", turns[i]["strategy"])
            for i in range(1, len(turns)) if turns[i]["role"] == "agent"]


def plot_strategies(records_by_method, world, path):
    """strategies.png: for each method, the share of each strategy chosen after each customer event
    (a row per event, summing to 1): which habits the training dropped or picked up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    events = ["opening", *world.EVENTS]
    fig, axes = plt.subplots(1, len(records_by_method), figsize=(6 * len(records_by_method), 4.5), squeeze=False)
    for ax, (name, recs) in zip(axes[0], records_by_method.items()):
        counts = [[0] * len(world.STRATEGIES) for _ in events]
        for rec in recs:
            for event, z in situations(rec):
                if event in events and z in world.STRATEGIES:
                    counts[events.index(event)][world.STRATEGIES.index(z)] += 1
        share = [[c / max(1, sum(row)) for c in row] for row in counts]
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(world.STRATEGIES)), world.STRATEGIES, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(events)), [f"{e} ({sum(row)})" for e, row in zip(events, counts)], fontsize=8)
        ax.set_title(f"{name}: strategy chosen after each customer event")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
