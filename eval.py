"""Evaluate a run on held-out scenarios: a markdown table, eval.json and eval.png.

    python eval.py out/gopo                  # 200 held-out scenarios, greedy decoding
    python eval.py out/gopo --n-scenarios 500

Rows: the run's GOPO agents, its SFT agents, and the world's behaviour, random-valid and oracle
policies (template text). Held-out scenarios come from the test seed range, which no training
stage ever samples (data.py). Each metric is a mean with a 95% CI over scenarios.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU
import sys

import torch
from transformers.utils import logging as hf_logging

import data
import gopo
import lm
import rollout as rollout_lib
import shop
import tse

METRICS = ["tse", "success", "esndcg", "gre", "turns", "order_value"]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def die(message):
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("run", help="run folder written by train.py (holds expert/, agent/, values.json)")
p.add_argument("--n-scenarios", type=int, default=200, help="held-out scenarios")
p.add_argument("--batch", type=int, default=100, help="dialogues rolled out together")
p.add_argument("--seed", type=int, default=0, help="customer template seed")


def dialogue_metrics(rec, values, world):
    """Per-dialogue metrics of one record (DESIGN §3)."""
    m = tse.trajectory_metrics(rec, values, world.HORIZON)
    m["gre"] = gopo.gre(rec, world.recognise)
    m["order_value"] = rec.get("order_value", 0.0)
    return m


CHECKPOINTS = ("expert", "agent", "expert_sft", "agent_sft")


def load_checkpoint(folder):
    """(model, tokenizer) of a checkpoint folder; a folder that does not load is a one-line error."""
    try:
        return lm.load(folder)
    except Exception as e:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, SafetensorError, ...
        why = (str(e).strip().splitlines() or [""])[0][:200]
        die(f"{folder} holds no loadable model ({type(e).__name__}: {why}); "
            "re-run train.py or check the path")


def read_values(path):
    """The run's event values: a JSON object of event name -> number."""
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        die(f"{path}: malformed JSON ({e.msg}, line {e.lineno}); re-run train.py or check the run")
    except (OSError, UnicodeDecodeError) as e:
        die(f"{path}: cannot read it ({type(e).__name__}: {e}); re-run train.py or check the run")
    ok = isinstance(values, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
    if not ok:
        die(f"{path}: expected a JSON object of event name -> number, got {json.dumps(values)[:80]}")
    return values


def evaluate_agents(expert, agent, scenarios, world, batch, seed):
    """Greedy rollouts of a loaded (Expert, CS Agent) pair, each a (model, tokenizer) -> list of records."""
    (expert_model, tok_e), (agent_model, tok_a) = expert, agent
    records = []
    for i in range(0, len(scenarios), batch):
        trajs = rollout_lib.rollout(expert_model, agent_model, tok_e, tok_a, scenarios[i:i + batch], world,
                                    greedy=True, seed=seed)
        records += [t["record"] for t in trajs]
    return records


def summarize(records, values, world):
    per = [dialogue_metrics(r, values, world) for r in records]
    return {k: tse.summarize([m[k] for m in per]) for k in METRICS}


def table(results, methods, metrics=METRICS):
    head = "| method | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    rows = []
    for name in methods:
        cells = [f"{results[name][k]['mean']:.3f} [{results[name][k]['ci95'][0]:.3f}, "
                 f"{results[name][k]['ci95'][1]:.3f}]" if k != "order_value" else
                 f"{results[name][k]['mean']:.0f} [{results[name][k]['ci95'][0]:.0f}, "
                 f"{results[name][k]['ci95'][1]:.0f}]" for k in metrics]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(results, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["tse", "success", "esndcg", "gre"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(methods)
    for j, name in enumerate(methods):
        means = [results[name][k]["mean"] for k in keys]
        err = [[results[name][k]["mean"] - results[name][k]["ci95"][0] for k in keys],
               [results[name][k]["ci95"][1] - results[name][k]["mean"] for k in keys]]
        ax.bar([i + j * width for i in range(len(keys))], means, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set(ylim=(0, 1.05), title=title, ylabel="mean (95% CI)")
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


REAL_METRICS = ["tse", "success", "esndcg", "gre", "turns", "bleu", "rouge_l"]


def read_config(path):
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}          # runs from before --data existed: the built-in shop
    return config if isinstance(config, dict) else {}


def evaluate_logged(run, config, values, ckpt, args):
    """A real-data run: greedy logged-context rollouts on the test split (the world is rebuilt from
    the training split exactly as train.py built it), scored with the fitted event values, ESNDCG
    against the human strategies, GRE, and BLEU / ROUGE-L of the replies against the human ones."""
    import logged
    try:
        splits = logged.load_splits(config["data"], config["data_path"])
    except (data.DataError, KeyError) as e:
        die(f"cannot reload the run's data ({e}); check --data-path in {run}/config.json")
    try:
        with open(os.path.join(run, "split.json")) as f:
            saved = json.load(f)
        if saved != {k: [r["id"] for r in v] for k, v in splits.items()}:
            die(f"{config['data_path']} no longer gives the split saved in {run}/split.json (the file changed)")
    except (OSError, ValueError):
        die(f"{run}/split.json is missing or malformed; re-run train.py")
    world = logged.make_world(splits["train"], [r for v in splits.values() for r in v])
    test = splits["test"]

    def metrics(rec, logged_rec):
        m = dialogue_metrics(rec, values, world)
        m["bleu"], m["rouge_l"] = logged.reply_overlap(rec, logged_rec)
        return m

    results = {}
    for name, e, a in (("gopo", "expert", "agent"), ("sft", "expert_sft", "agent_sft")):
        recs = evaluate_agents(ckpt[e], ckpt[a], test, world, args.batch, args.seed)
        per = [metrics(r, s) for r, s in zip(recs, test)]
        results[name] = {k: tse.summarize([m[k] for m in per]) for k in REAL_METRICS}
        data.write_jsonl(recs, os.path.join(run, f"eval_{name}.jsonl"))
    # the human agents of the test logs, scored the same way (BLEU and ROUGE-L are 1 by definition)
    human = [dict(r, turns=logged.from_opening(r), ref_strategies=logged.human_strategies(r)) for r in test]
    per = [metrics(r, s) for r, s in zip(human, test)]
    results["human"] = {k: tse.summarize([m[k] for m in per]) for k in REAL_METRICS}
    methods = ["gopo", "sft", "human"]
    md = (f"Evaluation of `{run}` on the {len(test)} test dialogues of {config['data']} (logged-context "
          f"rollouts, greedy; mean [95% CI]). With so few dialogues the intervals are wide.\n\n"
          + table(results, methods, REAL_METRICS))
    print(md)
    with open(os.path.join(run, "eval.md"), "w") as f:
        f.write(md)
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({**results, "n_scenarios": len(test), "data": config["data"]}, f, indent=2)
    plot(results, methods, os.path.join(run, "eval.png"), f"{run}: {len(test)} test dialogues")


def main(argv=None):
    args = p.parse_args(argv)
    if args.n_scenarios <= 0 or args.batch <= 0:
        die("--n-scenarios and --batch must be > 0")
    run = args.run
    if not os.path.exists(run):
        die(f"{run} does not exist (give the run folder train.py wrote, e.g. out/gopo)")
    if not os.path.isdir(run):
        die(f"{run} is not a folder (give the run folder train.py wrote, e.g. out/gopo)")
    for need in ("values.json", *CHECKPOINTS):
        if not os.path.exists(os.path.join(run, need)):
            die(f"{run} has no {need}: not a finished train.py run (train first, or check the path)")
    values = read_values(os.path.join(run, "values.json"))
    # every checkpoint loads before any rollout, so a broken one costs no time and overwrites no report
    hf_logging.disable_progress_bar()
    ckpt = {name: load_checkpoint(os.path.join(run, name)) for name in CHECKPOINTS}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = read_config(os.path.join(run, "config.json"))
    if config.get("data", "shop") != "shop":
        return evaluate_logged(run, config, values, ckpt, args)
    world = shop
    scenarios = [world.make_scenario(s) for s in data.test_seeds(args.n_scenarios)]
    results = {}
    for name, e, a in (("gopo", "expert", "agent"), ("sft", "expert_sft", "agent_sft")):
        recs = evaluate_agents(ckpt[e], ckpt[a], scenarios, world, args.batch, args.seed)
        results[name] = summarize(recs, values, world)
        data.write_jsonl(recs, os.path.join(run, f"eval_{name}.jsonl"))
    for name, policy in world.POLICIES.items():
        recs = [world.play(s, policy, seed=args.seed) for s in scenarios]
        results[name] = summarize(recs, values, world)
    methods = ["gopo", "sft", "behaviour", "random", "oracle"]
    gap = (results["gopo"]["tse"]["mean"] - results["sft"]["tse"]["mean"]) / \
        max(1e-9, results["oracle"]["tse"]["mean"] - results["sft"]["tse"]["mean"])
    md = f"Held-out evaluation of `{run}` on {args.n_scenarios} scenarios (greedy; mean [95% CI]).\n\n" + \
        table(results, methods) + f"\nShare of the SFT->oracle TSE gap closed by GOPO: {gap:.2f}\n"
    print(md)
    with open(os.path.join(run, "eval.md"), "w") as f:
        f.write(md)
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({**results, "n_scenarios": args.n_scenarios, "gap_closed_tse": gap}, f, indent=2)
    plot(results, methods, os.path.join(run, "eval.png"), f"{run}: {args.n_scenarios} held-out scenarios")


if __name__ == "__main__":
    main()
