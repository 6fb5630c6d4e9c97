"""The ceilings of a run: what its models can reach under full supervision, before any method is blamed.

    python -m experiments.ceilings out/gopo                  # 200 held-out customers
    python -m experiments.ceilings out/desk --json out/desk/ceilings.json
    python -m experiments.ceilings out/desk --lr 3e-3 --steps 600   # the same probe, another SFT budget

For a run of train.py on a built-in world it reports:
  the Expert ceiling   the run's logs relabelled with the world's label policy (worlds.relabel: the
                       "disclosed" oracle, which reads only what the dialogue has told, where the world
                       has one; else the oracle), DAgger-style: each logged history keeps its text and
                       its strategies, only the target changes. An Expert of the run's architecture,
                       initialisation and SFT budget is trained on them (RUN/expert_ceiling/), then
                       played on the held-out customers with the run's CS Agent, and with the world's
                       template replies (perfect execution: what the Expert's choices alone allow).
  the CS ceiling       the oracle chooses every strategy, the run's CS Agent writes every reply: what
                       the CS Agent's writing allows, whatever the Expert chooses.
  decision groups      accuracy against the label policy on held-out dialogues, per kind of decision
                       (world.decision_group): the SFT Expert, the run's trained Expert, the ceiling.
Writes RUN/ceilings.json (or --json FILE): {"expert_ceiling": {"tse", "tse_template", "success", ...},
"cs_ceiling": {"tse", "success"}, "groups": {group: {"sft", "method", "ceiling"}}, "per_scenario_tse":
{"ceiling", "sft", "method"}, ...}; experiments.compare reads the last to pool the gap GOPO closes over seeds.
"""
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import checkpoint
import cli
import data
import eval as eval_lib
import expert as expert_lib
import lm
import parallel
import rollout as rollout_lib
import tse
import worlds

die = cli.die


class OracleDialogues(rollout_lib.ExpertDialogues):
    """The Expert's seat taken by a rule policy of the world (default: the oracle), fed the dialogue
    as the world's tracker reads it; the CS Agent writes every reply."""
    policy = "oracle"

    def decide(self, logits, allowed, uniforms, live):
        w = self.world
        probe = {"role": "agent", "text": "", "strategy": None}   # the decision due now: the last one read
        out = [w.STRATEGIES.index(worlds.decisions(w, {"turns": self.trajs[i]["turns"] + [probe],
                                                          "scenario": self.scenarios[i]},
                                                      w.POLICIES[self.policy])[-1][2]) for i in live]
        return torch.tensor(out), torch.zeros(len(out))


def probe_rows(method):
    """The rows the probe plays of a gopo or sft run: the method's, then its two-agent SFT start (last).
    An sft run's own last row is its flat agent (sft-flat), which is no start of the Expert this probe
    is about."""
    return checkpoint.METHODS["gopo"].rows if method == "gopo" else ("sft",)


def follow(w, scenario, prefix, seed=0):
    """The world's own dialogue with the strategies `prefix`, template text: (turns, ended). ended:
    the customer finished within the prefix (else a next decision is due)."""
    asked = []

    def policy(tracker, sc, rng):
        asked.append(None)
        return prefix[len(asked) - 1] if len(asked) <= len(prefix) else w.allowed(tracker.strategies)[0]   # a probe
    turns, _ = w.dialogue(scenario, policy, seed, horizon=len(prefix) + 1)
    return turns[:1 + 2 * len(prefix)], len(asked) <= len(prefix)


@torch.no_grad()
def template_play(expert_model, tok, w, scenarios, seed=0):
    """Greedy Expert decisions, the world's template text for every reply: the records. Each turn
    replays every live dialogue from the start with its chosen strategies (w.dialogue) and scores the
    next decision with one forward over the whole history (no cache: the Expert is tiny)."""
    strategy_ids = expert_lib.strategy_ids(tok, w.STRATEGIES)
    prefixes, live = [[] for _ in scenarios], list(range(len(scenarios)))
    while live:
        played = {i: follow(w, scenarios[i], prefixes[i], seed) for i in live}   # i -> (turns, ended)
        live = [i for i in live if not played[i][1] and len(prefixes[i]) < w.HORIZON]
        if not live:
            break
        probe = lambda i: {"role": "agent", "text": "", "strategy": w.allowed(prefixes[i])[0]}   # the next decision
        trajs = [expert_lib.trajectory_from_record(tok, {"turns": played[i][0] + [probe(i)]}, w.STRATEGIES,
                                                   w.allowed, w.INSTRUCTIONS) for i in live]
        batch = expert_lib.collate(trajs, tok.pad_token_id, len(w.STRATEGIES))
        logps = expert_lib.decision_dists(expert_model, batch, strategy_ids)               # (B, T, Z)
        last = batch["step_mask"].sum(1) - 1                                                  # (B,)
        for i, k in zip(live, logps[torch.arange(len(live)), last].argmax(-1).tolist()):    # (B,) greedy
            prefixes[i].append(w.STRATEGIES[k])
    return [w.play(sc, _fixed(z), seed=seed) for sc, z in zip(scenarios, prefixes)]


def _read(path):
    with open(path) as f:
        return json.load(f)


def _fixed(zs):
    it = iter(zs)

    def fixed(tracker, scenario, rng):
        return next(it)
    return fixed


def sft_budget(config, lr=None, steps=None):
    """The Expert SFT budget a run used (train.world_defaults' rules for runs written before the
    Expert had its own flags), or the given one."""
    return {"lr": lr or config.get("expert_sft_lr") or config["sft_lr"],
            "steps": steps or config.get("expert_sft_steps") or config["sft_steps"],
            "batch": config.get("sft_batch") or 16, "seed": config.get("seed", 0)}


def train_ceiling(run, config, w, logs, budget):
    """An Expert of the run's architecture and initialisation (the SFT'd CS Agent for the tiny
    models, as train.py's stage 3), trained on the relabelled logs with `budget`."""
    torch.manual_seed(budget["seed"])
    init = "agent_sft" if config.get("model", "tiny") == "tiny" and config.get("expert_from_agent", True) \
        else "expert_sft"
    model, tok = lm.load(os.path.join(run, init))
    if init == "expert_sft":
        die(f"{run}: a pretrained backbone; this probe retrains tiny Experts only")
    losses = expert_lib.sft(model, tok, worlds.relabel(w, logs), w.STRATEGIES, w.allowed, w.INSTRUCTIONS,
                            budget["steps"], budget["batch"], budget["lr"], budget["seed"], desc="SFT ceiling")
    checkpoint.save_model(model, tok, os.path.join(run, "expert_ceiling"))
    return model, tok, losses[-1]


def metrics(records, values, w):
    """({metric: {"mean", "ci95"}} as eval.py reports them, per-dialogue TSE)."""
    per = eval_lib.per_dialogue(records, values, w)
    return eval_lib.summarize(per), per["tse"]


def main(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("run", help="a finished train.py run on a built-in world (gopo or sft)")
    p.add_argument("--n", type=cli.positive(int), default=200, help="held-out customers")
    p.add_argument("--json", default=None, help="where to write the report (default RUN/ceilings.json)")
    p.add_argument("--lr", type=cli.positive(float), default=None, help="the ceiling's SFT learning rate "
                   "(default: the run's Expert SFT learning rate)")
    p.add_argument("--steps", type=cli.positive(int), default=None, help="the ceiling's SFT steps (default: the run's)")
    p.add_argument("--retrain", action="store_true", help="train the ceiling Expert again even if "
                   "RUN/expert_ceiling/ exists from an earlier probe with the same budget")
    args = p.parse_args(argv)
    run = checkpoint.check_folder(args.run)
    if not os.path.isfile(os.path.join(run, "config.json")):
        die(f"{run} has no config.json: not a train.py run")
    config = checkpoint.read_config(run)
    if config.get("data", "sim") != "sim":
        die(f"{run}: a run on --data {config['data']}: logged data has no oracle to relabel with; "
            "the ceilings need a built-in world")
    method = config.get("method", "gopo")
    if method not in ("gopo", "sft"):
        die(f"{run}: an --method {method} run; give a gopo or sft run of train.py (its SFT models are the same)")
    w = checkpoint.world_of(config, run)
    rows = probe_rows(method)
    ckpt = checkpoint.load_run(run, rows)
    values = checkpoint.read_values(os.path.join(run, "values.json"))
    logs = checkpoint.read_logs(run, w)
    torch.set_num_threads(parallel.cpu_threads())
    agent_name = checkpoint.METHODS[method].agent
    agent_model, tok_a = ckpt[agent_name]
    scenarios = [w.make_scenario(s) for s in data.test_seeds(args.n)]

    budget = sft_budget(config, args.lr, args.steps)
    stamp = os.path.join(run, "expert_ceiling", "budget.json")
    if not args.retrain and os.path.exists(stamp) and _read(stamp) == budget:
        ceiling, tok_e = lm.load(os.path.join(run, "expert_ceiling"))
        print(f"ceiling Expert: loaded {run}/expert_ceiling ({budget})")
    else:
        ceiling, tok_e, loss = train_ceiling(run, config, w, logs, budget)
        with open(stamp, "w") as f:
            json.dump(budget, f)
        print(f"ceiling Expert: SFT on relabelled logs {budget}, final loss {loss:.3f}")
    ceiling.eval()

    with torch.no_grad():
        played = {name: eval_lib.method_records(ckpt, name, scenarios, w, 100, 0, config.get("max_reply_tokens", 32))
                  for name in rows}
        played["ceiling"] = [t["record"] for t in rollout_lib.rollout((ceiling, tok_e), (agent_model, tok_a), scenarios,
                                                                      w, greedy=True)]
        template = template_play(ceiling, tok_e, w, scenarios)
        cs = [t["record"] for t in OracleDialogues(ckpt[checkpoint.METHODS[method].expert], (agent_model, tok_a),
                                                   scenarios, w).play(greedy=True)]
    oracle = [w.play(sc, w.POLICIES["oracle"]) for sc in scenarios]

    m_ceiling, tse_ceiling = metrics(played["ceiling"], values, w)
    m_template, _ = metrics(template, values, w)
    m_cs, _ = metrics(cs, values, w)
    m_oracle, _ = metrics(oracle, values, w)
    sft_row = rows[-1]
    m_sft, tse_sft = metrics(played[sft_row], values, w)
    m_method, tse_method = metrics(played[rows[0]], values, w) if method != "sft" else (None, None)
    accuracy = {"sft": worlds.decision_accuracy(w, played[sft_row]),
                **({"method": worlds.decision_accuracy(w, played[rows[0]])} if method != "sft" else {}),
                "ceiling": worlds.decision_accuracy(w, played["ceiling"]),
                "ceiling, template replies": worlds.decision_accuracy(w, template)}
    label_vs_oracle = worlds.decision_accuracy(w, [w.play(sc, worlds.label_policy(w)) for sc in scenarios],
                                               w.POLICIES["oracle"])
    report = {
        "run": run, "n": args.n, "budget": budget, "label_policy": worlds.label_policy(w).__name__,
        "expert_ceiling": {"tse": m_ceiling["tse"]["mean"], "tse_ci95": m_ceiling["tse"]["ci95"],
                           "success": m_ceiling["success"]["mean"], "sop_ok": m_ceiling["sop_ok"]["mean"],
                           "tse_template": m_template["tse"]["mean"], "tse_template_ci95": m_template["tse"]["ci95"],
                           "success_template": m_template["success"]["mean"],
                           "sop_ok_template": m_template["sop_ok"]["mean"]},
        "cs_ceiling": {"tse": m_cs["tse"]["mean"], "tse_ci95": m_cs["tse"]["ci95"], "success": m_cs["success"]["mean"],
                       "sop_ok": m_cs["sop_ok"]["mean"]},
        "oracle": {"tse": m_oracle["tse"]["mean"], "success": m_oracle["success"]["mean"]},
        "sft": {"tse": m_sft["tse"]["mean"], "tse_ci95": m_sft["tse"]["ci95"], "success": m_sft["success"]["mean"]},
        "ceiling_minus_sft_tse": tse.paired_diff_ci(tse_ceiling, tse_sft),
        "groups": {g: {row: acc[g][0] / max(acc[g][1], 1) for row, acc in accuracy.items()} |
                   {"n_ceiling": accuracy["ceiling"][g][1]} for g in accuracy["sft"]},
        "label_policy_vs_oracle": {g: c / max(n, 1) for g, (c, n) in label_vs_oracle.items()},
        "per_scenario_tse": {"ceiling": tse_ceiling, "sft": tse_sft,   # experiments.compare pools the gap over seeds
                             **({"method": tse_method} if method != "sft" else {})},
    }
    if method == "sft":
        for g in report["groups"].values():
            g["method"] = g["sft"]
    if method != "sft":
        report["method"] = {"tse": m_method["tse"]["mean"], "tse_ci95": m_method["tse"]["ci95"],
                            "success": m_method["success"]["mean"]}
        gap = m_ceiling["tse"]["mean"] - m_sft["tse"]["mean"]
        report["gap_closed"] = (m_method["tse"]["mean"] - m_sft["tse"]["mean"]) / gap if gap > 0 else None

    ci = lambda m: f"{m['tse']['mean']:.3f} [{m['tse']['ci95'][0]:.3f}, {m['tse']['ci95'][1]:.3f}]"
    print(f"\nCeilings of {run} on {args.n} held-out customers (greedy; mean [95% CI]); labels: "
          f"{report['label_policy']}\n")
    print("| what | TSE | success | sop_ok |\n|---|---|---|---|")
    lines = [("Expert ceiling, the run's CS Agent", m_ceiling), ("Expert ceiling, template replies", m_template),
             ("CS ceiling (oracle strategies, the run's CS Agent)", m_cs), (f"{sft_row} (the SFT start)", m_sft),
             *([(rows[0], m_method)] if method != "sft" else []),
             ("oracle (template replies)", m_oracle)]
    for name, m in lines:
        print(f"| {name} | {ci(m)} | {m['success']['mean']:.3f} | {m['sop_ok']['mean']:.3f} |")
    d = report["ceiling_minus_sft_tse"]
    print(f"\nceiling - SFT, paired TSE: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]; template ceiling / oracle TSE: "
          f"{m_template['tse']['mean'] / m_oracle['tse']['mean']:.3f}"
          + (f"; share of the SFT -> ceiling gap closed by {rows[0]}: {report['gap_closed']:.2f}"
             if report.get("gap_closed") is not None else ""))
    print(f"\nDecision accuracy against {report['label_policy']}, by group (share, decisions), on each Expert's own "
          f"held-out dialogues:\n")
    print(eval_lib.group_table(accuracy))
    print("The label policy against the true oracle on its own dialogues (where it cannot know): " +
          ", ".join(f"{g} {a:.3f}" for g, a in report["label_policy_vs_oracle"].items()))
    path = args.json or os.path.join(run, "ceilings.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
