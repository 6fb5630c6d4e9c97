"""Evaluate runs on held-out scenarios: markdown tables, JSON and plots.

    python eval.py out/gopo                  # one run: 200 held-out scenarios, greedy decoding
    python eval.py out/gopo --n-scenarios 500
    python eval.py out/ppo                   # a baseline's run, the same way
    python -m experiments.compare out/sft out/ppo ...   # the comparison (experiments/compare.py)
    python eval.py out/gopo --planner models/smollm2 --planner-shots 3   # + a prompted planner's row (planner.py)

One run: the run's method (any of checkpoint.METHODS: gopo, sft, ppo, memento, gopo-noexpert), the
SFT model(s) it started from (checkpoint.METHODS[method].rows), and the
world's behaviour, random-valid and oracle policies (template text) -> eval.md, eval.json, eval.png,
eval_<method>.jsonl in the run folder.
Held-out scenarios come from the test seed range, which no training stage ever samples (data.py).
Each metric is a mean with a 95% CI over dialogues: Wilson for the binary outcomes (RATES: success,
sop_ok), a seeded percentile bootstrap for every continuous score (tse.mean_ci), so no interval
leaves the range of the values it summarises.
"""
import json
import os
import re
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU

import torch
from transformers.utils import logging as hf_logging

import checkpoint
import cli
import data
import lm
import parallel
import planner as planner_lib
import plots
import rollout as rollout_lib
import tse
import worlds

METRICS = ["tse", "success", "esndcg", "gre", "turns", "sop_ok", "order_value"]
RATES = {"success", "sop_ok"}   # binary outcomes per dialogue (Wilson); every other metric is a score (bootstrap)


die = cli.die

p = cli.Parser(__doc__)
p.add_argument("run", help="run folder written by train.py (holds values.json and its checkpoints)")
p.add_argument("--n-scenarios", type=int, default=200, help="held-out scenarios")
p.add_argument("--batch", type=int, default=100, help="dialogues rolled out together")
p.add_argument("--seed", type=int, default=0, help="customer template seed")
p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
               help="where the rollouts run: auto = CUDA when there is a GPU")
p.add_argument("--bf16", action="store_true", help="bf16 autocast for the rollouts (weights stay as saved)")
p.add_argument("--show", type=cli.nonneg(int), default=0, metavar="N",
               help="print the first N held-out customers' dialogues, the starting model's and the trained one's, "
               "turn by turn")


def add_planner_flags(parser, show_prompt=True):
    """The prompted planners' flags (planner.py), on eval.py and experiments.compare (no --show-prompt)."""
    g = parser.add_argument_group("prompted planners (planner.py): an instruct LM replaces the run's Expert, the "
                                  "run's CS Agent writes; built-in worlds only")
    g.add_argument("--planner", action="append", default=[], metavar="MODEL",
                   help="a local instruct model folder (or a hub id with HF_HUB_OFFLINE=0): adds the row "
                   "prompted:<folder name>, its choice the allowed strategy it scores highest; repeatable")
    g.add_argument("--planner-url", metavar="URL",
                   help="an OpenAI-compatible chat-completions server, e.g. http://127.0.0.1:8000/v1 (key: "
                   "OPENAI_API_KEY when set): adds the row served:<--planner-model>")
    g.add_argument("--planner-model", metavar="NAME", help="the model name the --planner-url server is asked for")
    g.add_argument("--planner-shots", type=cli.nonneg(int), default=0, metavar="N",
                   help="N logged training dialogues of the run (its first N) as examples in the prompt")
    g.add_argument("--planner-timeout", type=cli.positive(float), default=60.0, metavar="S",
                   help="--planner-url: seconds per request before it is retried (twice at most)")
    if show_prompt:
        g.add_argument("--show-prompt", action="store_true",
                       help="print the planners' prompt at the first held-out customer's first decision and exit")


add_planner_flags(p)


def dialogue_metrics(rec, values, world):
    """Per-dialogue metrics of one record (docs/design.md), plus sop_ok."""
    m = tse.trajectory_metrics(rec, values, world.HORIZON)
    m["gre"] = tse.record_gre(rec, world.recognise)
    m["order_value"] = rec.get("order_value", 0.0)
    m["sop_ok"] = sop_ok(rec, world)
    return m


def sop_ok(rec, world):
    """1.0 if the act the world recognises in every reply is one the SOP allows after the previous
    reply's act (an unrecognised reply is not an SOP act), else 0.0. It reads what the customer
    heard, the same way for every method: a flat agent has no Expert to keep it inside the SOP, and
    a two-agent reply can fail to carry out its strategy."""
    acts = []
    for turn in rec["turns"]:
        if turn["role"] == "agent":
            act = world.recognise(turn["text"])
            if act is None or act not in world.allowed(acts):
                return 0.0
            acts.append(act)
    return 1.0


METHODS = checkpoint.METHODS   # the registry (checkpoint.py): a method's checkpoints, rows and player


def is_flat(method):
    """A flat agent is asked for no strategy: GRE does not apply."""
    return METHODS[method].expert is None


def two_agents(ckpt, method, scenarios, world, seed, max_reply_tokens=32):
    """Greedy rollouts of a method's loaded (Expert, CS Agent), each a (model, tokenizer) -> records."""
    (expert_model, tok_e), (agent_model, tok_a) = ckpt[METHODS[method].expert], ckpt[METHODS[method].agent]
    return [t["record"] for t in rollout_lib.rollout((expert_model, tok_e), (agent_model, tok_a), scenarios, world,
                                                     greedy=True, seed=seed, max_reply_tokens=max_reply_tokens)]


def method_records(ckpt, method, scenarios, world, batch, seed, max_reply_tokens=32):
    """Greedy held-out dialogues of one method of a loaded run, `batch` dialogues at a time."""
    play = checkpoint.resolve(METHODS[method].play) if METHODS[method].play else two_agents
    return [rec for i in range(0, len(scenarios), batch)
            for rec in play(ckpt, method, scenarios[i:i + batch], world, seed, max_reply_tokens)]


def device_of(args):
    """--device: auto = CUDA when there is one; cuda without a GPU is a one-line error."""
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: this machine has no CUDA GPU that torch can see (use --device cpu)")
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def per_dialogue(records, values, world, flat=False):
    """{metric: [value per dialogue]}; GRE is None for a flat agent (it is asked for no strategy)."""
    per = [dialogue_metrics(r, values, world) for r in records]
    return {k: [None if (flat and k == "gre") else m[k] for m in per] for k in METRICS}


def summarize(per):
    """{metric: {"mean", "ci95"}} from per-dialogue lists {metric: [value per dialogue]} (per_dialogue);
    mean None where the metric does not apply."""
    return {k: tse.mean_ci(xs, rate=k in RATES) if None not in xs else {"mean": None, "ci95": [None, None]}
            for k, xs in per.items()}


def table(results, methods, metrics=METRICS):
    head = "| method | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    rows = []
    for name in methods:
        cells = ["—" if results[name][k]["mean"] is None else
                 f"{results[name][k]['mean']:.3f} [{results[name][k]['ci95'][0]:.3f}, "
                 f"{results[name][k]['ci95'][1]:.3f}]" if k != "order_value" else
                 f"{results[name][k]['mean']:.0f} [{results[name][k]['ci95'][0]:.0f}, "
                 f"{results[name][k]['ci95'][1]:.0f}]" for k in metrics]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def group_table(accuracy):
    """{row: worlds.decision_accuracy(...)} -> markdown: a column per decision group, "share (count)"."""
    groups = list(next(iter(accuracy.values())))
    head = "| row | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups) + "\n"
    return head + "".join(f"| {row} | " + " | ".join(f"{c / max(n, 1):.3f} ({n})" for c, n in acc.values()) + " |\n"
                          for row, acc in accuracy.items())


REAL_METRICS = ["tse", "success", "esndcg", "gre", "turns", "bleu", "rouge_l"]


def evaluate_logged(run, config, values, ckpt, rows, args):
    """A real-data run: greedy logged-context rollouts on the test split (the world is rebuilt from
    the training split exactly as train.py built it), scored with the fitted event values, ESNDCG
    against the human strategies, GRE, and BLEU / ROUGE-L of the replies against the human ones."""
    from worlds import logged
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
    for name in rows:
        recs = method_records(ckpt, name, test, world, args.batch, args.seed)
        per = [metrics(r, s) for r, s in zip(recs, test)]
        results[name] = summarize({k: [None if (is_flat(name) and k == "gre") else m[k] for m in per]
                                 for k in REAL_METRICS})
        data.write_jsonl(recs, os.path.join(run, f"eval_{name}.jsonl"))
    # the human agents of the test logs, scored the same way (BLEU and ROUGE-L are 1 by definition)
    human = [dict(r, turns=logged.from_opening(r), ref_strategies=logged.human_strategies(r)) for r in test]
    per = [metrics(r, s) for r, s in zip(human, test)]
    results["human"] = summarize({k: [m[k] for m in per] for k in REAL_METRICS})
    methods = [*rows, "human"]
    md = (f"Evaluation of `{run}` on the {len(test)} test dialogues of {config['data']} (logged-context "
          f"rollouts, greedy; mean [95% CI]). With so few dialogues the intervals are wide.\n\n"
          + table(results, methods, REAL_METRICS))
    print(md)
    with open(os.path.join(run, "eval.md"), "w") as f:
        f.write(md)
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({**results, "n_scenarios": len(test), "data": config["data"]}, f, indent=2)
    plots.plot(results, methods, os.path.join(run, "eval.png"), f"{run}: {len(test)} test dialogues")


def main(argv=None):
    args = p.parse_args(argv)
    if args.n_scenarios <= 0 or args.batch <= 0:
        die("--n-scenarios and --batch must be > 0")
    run = checkpoint.check_folder(args.run)
    config = checkpoint.read_config(run)
    method = config.get("method", "gopo")
    if method not in METHODS or not METHODS[method].sft:
        known = ", ".join(m for m in METHODS if METHODS[m].sft)
        die(f"{run}/config.json names a --method '{method}' that eval.py does not know (known: {known})")
    rows = METHODS[method].rows
    if (warning := checkpoint.stack_warning(run)):   # its numbers were measured on another stack
        print(warning, file=sys.stderr)
    device = device_of(args)
    planners = planners_of(args, run, config, method, device)
    ckpt = checkpoint.load_run(run, rows, device)
    values = checkpoint.read_values(os.path.join(run, "values.json"))
    torch.set_num_threads(parallel.cpu_threads())
    with lm.autocast(device, args.bf16):
        if config.get("data", "sim") != "sim":
            return evaluate_logged(run, config, values, ckpt, rows, args)
        return evaluate_builtin(run, config, values, ckpt, rows, method, args, planners)


def planners_of(args, run, config, method, device):
    """{row name: planner} of --planner / --planner-url (planner.py), each checked (its model loaded,
    the server asked once) before anything is written; {} without them. A real-data run is refused: its
    world has no SOP (every strategy may follow every other, so "the strategies allowed now" says nothing)
    and its rows are logged-context rollouts scored against the human replies, not a planner's dialogues."""
    if bool(args.planner_url) != bool(args.planner_model):
        die("--planner-url and --planner-model go together (the server's address, and the model it serves)")
    if not args.planner and not args.planner_url:
        if getattr(args, "show_prompt", False) or args.planner_shots:
            die("--show-prompt and --planner-shots need --planner or --planner-url")
        return {}
    if config.get("data", "sim") != "sim":
        die(f"--planner: {run} is a real-data run (--data {config['data']}); prompted planners run on the built-in "
            "worlds only (a real-data world has no SOP, and its rows replay logged contexts)")
    if METHODS[method].expert is None:
        die(f"--planner: {run} is a --method {method} run, a flat agent with no CS Agent that takes a strategy; "
            "use a gopo, sft or memento run")
    world = checkpoint.world_of(config, run)
    shots = []
    if args.planner_shots:
        shots = checkpoint.read_logs(run, world, f"--planner-shots {args.planner_shots}")[:args.planner_shots]
        if len(shots) < args.planner_shots:
            die(f"--planner-shots {args.planner_shots}: {run}/logs.jsonl holds only {len(shots)} dialogues")
    suffix = f"-{args.planner_shots}shot" if args.planner_shots else ""
    out = {}
    for folder in args.planner:
        model, tok = planner_lib.load(folder)
        out[f"prompted:{os.path.basename(os.path.normpath(folder))}{suffix}"] = \
            planner_lib.Planner(model.to(device), tok, world, shots)
    if args.planner_url:
        served = planner_lib.ServedPlanner(args.planner_url, args.planner_model, world, shots, args.planner_timeout)
        if not getattr(args, "show_prompt", False):
            served.check()
        out[f"served:{args.planner_model}{suffix}"] = served
    if getattr(args, "show_prompt", False):
        first = world.make_scenario(data.test_seeds(1)[0])
        opening = world.Customer(first, seed=args.seed * 1_000_003).opening()
        msgs = planner_lib.messages(world, [{"role": "customer", "text": opening}], shots)
        for name, pl in out.items():
            text = planner_lib.render(pl.tok, msgs) if isinstance(pl, planner_lib.Planner) else \
                json.dumps(msgs, indent=1)
            print(f"==== {name}: the prompt of held-out customer 0's first decision\n{text}")
        raise SystemExit(0)
    return out


def evaluate_builtin(run, config, values, ckpt, rows, method, args, planners=None):
    """A built-in world: every row's greedy dialogues on the held-out scenarios, the prompted planners'
    (with the run's CS Agent) and the rule policies."""
    world = checkpoint.world_of(config, run)
    scenarios = [world.make_scenario(s) for s in data.test_seeds(args.n_scenarios)]
    results, records, cost = {}, {}, {}
    max_reply = config.get("max_reply_tokens", 32)
    for name in rows:
        t0 = time.time()
        recs = method_records(ckpt, name, scenarios, world, args.batch, args.seed, max_reply)
        cost[name] = time.time() - t0
        results[name], records[name] = summarize(per_dialogue(recs, values, world, flat=is_flat(name))), recs
        data.write_jsonl(recs, os.path.join(run, f"eval_{name}.jsonl"))
    for name, pl in (planners or {}).items():   # the run's CS Agent: the one its first row plays
        t0 = time.time()
        recs = planner_lib.play(pl, ckpt[METHODS[method].agent], scenarios, world, args.seed, max_reply, args.batch)
        cost[name] = time.time() - t0
        results[name], records[name] = summarize(per_dialogue(recs, values, world)), recs
        data.write_jsonl(recs, os.path.join(run, "eval_" + re.sub(r"[^\w.-]+", "_", name) + ".jsonl"))
    for name, policy in world.POLICIES.items():
        records[name] = [world.play(s, policy, seed=args.seed) for s in scenarios]
        results[name] = summarize(per_dialogue(records[name], values, world))
    methods = [*rows, *(planners or {}), *world.POLICIES]
    groups = {name: worlds.decision_accuracy(world, records[name]) for name in methods
              if name not in METHODS or not is_flat(name)}   # a flat agent is asked for no strategy
    if method != "sft":   # rows[1]: the SFT model this run started from
        gap = (results[rows[0]]["tse"]["mean"] - results[rows[1]]["tse"]["mean"]) / \
            max(1e-9, results["oracle"]["tse"]["mean"] - results[rows[1]]["tse"]["mean"])
    md = f"Held-out evaluation of `{run}` on {args.n_scenarios} scenarios (greedy; mean [95% CI]).\n\n" + \
        table(results, methods)
    if method != "sft":   # the same customers for both rows: a paired difference is the sharper test
        paired = tse.paired_diff_ci(*(per_dialogue(records[r], values, world)["tse"] for r in rows[:2]))
        md += f"\nShare of the {rows[1]}->oracle TSE gap closed by {rows[0]}: {gap:.2f} (the oracle is a clairvoyant " \
              f"rule policy that defines z*, not an upper bound: above 1 means {rows[0]} passed it)\n" \
              f"Paired on the same customers, TSE {rows[0]} - {rows[1]}: {paired[0]:+.3f} " \
              f"[{paired[1]:+.3f}, {paired[2]:+.3f}] (95% bootstrap CI)\n"
    prompted = {}
    if planners:
        md += f"\nPrompted planners (planner.py; the run's CS Agent writes). Invalid: served answers that named no " \
              f"strategy or a forbidden one (the fallback, the first allowed strategy, played); seconds: this " \
              f"row's dialogues on this machine, {args.n_scenarios} customers.\n\n" \
              f"| row | TSE {rows[0]} - row, paired [95% CI] | invalid | decisions | seconds | s / decision |\n" \
              f"|---|---|---|---|---|---|\n"
        for name in planners:
            d = tse.paired_diff_ci(*(per_dialogue(records[r], values, world)["tse"] for r in (rows[0], name)))
            n_dec = sum(t["role"] == "agent" for r in records[name] for t in r["turns"])
            prompted[name] = {"paired_tse_diff": d, "invalid": planner_lib.invalid_rate(records[name]),
                              "decisions": n_dec, "seconds": cost[name]}
            md += f"| {name} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {prompted[name]['invalid']:.3f} | {n_dec} | " \
                  f"{cost[name]:.0f} | {cost[name] / max(1, n_dec):.2f} |\n"
    md += f"\nDecision accuracy against the {worlds.label_policy(world).__name__} by kind of decision (share of " \
          f"decisions, count) on each row's own dialogues:\n\n" + group_table(groups)
    print(md)
    with open(os.path.join(run, "eval.md"), "w") as f:
        f.write(md)
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({**results, "n_scenarios": args.n_scenarios,
                   "decision_groups": {name: {g: c / max(n, 1) for g, (c, n) in acc.items()} for name, acc in groups.items()},
                   **({"gap_closed_tse": gap, "paired_tse_diff": paired} if method != "sft" else {}),
                   **({"prompted": prompted, "seconds": cost} if planners else {})},
                  f, indent=2)
    plots.plot(results, methods, os.path.join(run, "eval.png"), f"{run}: {args.n_scenarios} held-out scenarios")
    plots.plot_strategies({name: records[name] for name in rows[::-1]}, world, os.path.join(run, "strategies.png"))
    for i in range(min(args.show, len(scenarios))):
        show(i, {name: records[name][i] for name in rows[::-1]}, values, world)


def show(i, recs_by_method, values, world):
    """One held-out customer, each method's dialogue: strategy, reply and the customer's event."""
    print(f"\n==== held-out customer {i} ({json.dumps(next(iter(recs_by_method.values()))['scenario'])[:150]})")
    for name, rec in recs_by_method.items():
        m = dialogue_metrics(rec, values, world)
        print(f"--- {name}: TSE {m['tse']:.3f}, {'success' if rec['success'] else 'failure'}, {m['turns']} agent turns")
        for turn in rec["turns"]:
            if turn["role"] == "agent":
                print(f"  agent    [{turn['strategy']:<17}] {turn['text']}")
            else:
                print(f"  customer [{turn['event'] or '':<17}] {turn['text']}")


if __name__ == "__main__":
    main()
