"""Train GOPO end to end on the built-in shop (defaults: tiny model, CPU, a few minutes).

    python train.py                       # logs -> tokenizer + tiny models -> SFT -> GOPO -> out/gopo/
    python train.py --iters 40 --k 8      # longer run
    python train.py --help                # every flag

Writes out/<run>/: config.json, logs.jsonl (the behaviour-policy training data), values.json
(event values fitted on those logs), expert_sft/ agent_sft/ expert/ agent/ (transformers folders),
metrics.jsonl (one line per GOPO iteration), curves.png.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU
import random
import shutil
import sys
import time

import torch

import agent as agent_lib
import data
import expert as expert_lib
import gopo
import lm
import shop
import tse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def die(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def checked(kind, lo, lo_ok, hi=None):
    """argparse type: a number in [lo, hi] (lo excluded unless lo_ok)."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v > hi):
            bound = f"{'>=' if lo_ok else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
        return v
    return parse


def positive(kind):
    return checked(kind, 0, False)


def nonneg(kind):
    return checked(kind, 0, True)


p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = p.add_argument_group("run")
g.add_argument("--algo", default="gopo", choices=["gopo"], help="training method")
g.add_argument("--out", default="out", help="parent folder of run folders")
g.add_argument("--run", default=None, help="run folder name under --out (default: the --algo name)")
g.add_argument("--seed", type=int, default=0, help="seeds every sampler: logs, init, batches, rollouts")
g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
g = p.add_argument_group("data: logged dialogues of the behaviour (\"typical human agent\") policy")
g.add_argument("--n-logs", type=positive(int), default=1200, help="logged training dialogues to simulate")
g.add_argument("--logs", default=None, help="read the logged dialogues from this JSONL (common schema) "
               "instead of simulating them")
g = p.add_argument_group("model")
g.add_argument("--model", default="tiny", choices=["tiny"], help="backbone of both agents")
g.add_argument("--d-model", type=positive(int), default=128, help="tiny model width")
g.add_argument("--n-layer", type=positive(int), default=2, help="tiny model depth")
g.add_argument("--vocab-size", type=positive(int), default=1024, help="tiny BPE vocabulary size")
g = p.add_argument_group("SFT")
g.add_argument("--sft-steps", type=positive(int), default=300, help="SFT steps per agent")
g.add_argument("--sft-batch", type=positive(int), default=16, help="SFT batch size (dialogues)")
g.add_argument("--sft-lr", type=positive(float), default=1e-2, help="SFT learning rate")
g.add_argument("--sft-window-steps", type=nonneg(int), default=150,
               help="first CS Agent SFT steps on short windows (a curriculum; see agent.sft)")
g = p.add_argument_group("GOPO")
g.add_argument("--iters", type=positive(int), default=20, help="GOPO iterations")
g.add_argument("--scenarios", type=positive(int), default=16, help="scenarios per iteration (B)")
g.add_argument("--k", type=positive(int), default=4, help="rollouts per scenario (K)")
g.add_argument("--beta", type=positive(float), default=0.5, help="DPO temperature of the Expert loss")
g.add_argument("--nll-coef", type=nonneg(float), default=0.1, help="lambda: weight of the winners' NLL")
g.add_argument("--alpha", type=checked(float, 0, True, 1), default=0.5, help="R = alpha*TSE + (1-alpha)*ESNDCG")
g.add_argument("--delta", type=positive(float), default=0.05, help="min reward gap for a preference pair")
g.add_argument("--max-pairs", type=positive(int), default=4, help="pairs per scenario, at most")
g.add_argument("--listwise", action="store_true", help="Plackett-Luce over the K rollouts instead of pairs")
g.add_argument("--gopo-epochs", type=positive(int), default=2, help="gradient steps per iteration")
g.add_argument("--lr", type=positive(float), default=1e-3, help="Expert learning rate in GOPO")
g.add_argument("--agent-temperature", type=nonneg(float), default=0.7, help="CS sampling temperature in rollouts")
g.add_argument("--cs-samples", type=nonneg(int), default=16, help="(h_t, z_t) per iteration for CS alignment pairs")
g.add_argument("--beta-cs", type=positive(float), default=0.1, help="DPO temperature of the CS alignment loss")
g.add_argument("--lr-cs", type=positive(float), default=1e-4, help="CS Agent learning rate in GOPO")


def main(argv=None):
    args = p.parse_args(argv)
    run_dir = os.path.join(args.out, args.run or args.algo)
    world = shop
    try:  # read user data before touching the output folder, so a bad file loses nothing
        logs = data.read_jsonl(args.logs, world.STRATEGIES, world.EVENTS) if args.logs else None
    except data.DataError as e:
        die(str(e))
    if os.path.exists(run_dir):
        if not args.overwrite:
            die(f"{run_dir} already exists (holds another run); pass --overwrite or choose --run NAME")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.time()

    # ---- 1. logged dialogues (training data) and the event values fitted on them
    if logs is None:
        logs = [world.play(world.make_scenario(s), world.behaviour_policy, seed=args.seed)
                for s in data.train_seeds(args.n_logs)]
    data.write_jsonl(logs, os.path.join(run_dir, "logs.jsonl"))
    values = tse.event_values(logs, world.SUCCESS_EVENTS)
    with open(os.path.join(run_dir, "values.json"), "w") as f:
        json.dump(values, f, indent=2)
    print(f"logs: {len(logs)} dialogues, behaviour success {gopo.mean(r['success'] for r in logs):.3f}")

    # ---- 2. tokenizer and models
    texts = [t["text"] for r in logs for t in r["turns"]] + list(world.INSTRUCTIONS.values())
    tok = lm.train_tokenizer(texts, world.STRATEGIES, args.vocab_size)
    expert_model = lm.build_tiny_model(tok, args.d_model, args.n_layer, seed=args.seed)
    agent_model = lm.build_tiny_model(tok, args.d_model, args.n_layer, seed=args.seed + 1)
    for m in (expert_model, agent_model):
        lm.add_strategy_tokens(m, tok, world.STRATEGIES)
    print(f"models: 2 x {lm.n_params(expert_model) / 1e6:.2f}M parameters, vocab {len(tok)}")

    # ---- 3. SFT: Expert on logged strategies, CS Agent on logged replies
    sft_e = expert_lib.sft(expert_model, tok, logs, world.STRATEGIES, world.SOP, world.INSTRUCTIONS,
                           args.sft_steps, args.sft_batch, args.sft_lr, args.seed)
    sft_a = agent_lib.sft(agent_model, tok, logs, world.INSTRUCTIONS, args.sft_steps, args.sft_batch,
                          args.sft_lr, args.seed, window_steps=args.sft_window_steps)
    lm.save(expert_model, tok, os.path.join(run_dir, "expert_sft"))
    lm.save(agent_model, tok, os.path.join(run_dir, "agent_sft"))
    with open(os.path.join(run_dir, "sft.json"), "w") as f:
        json.dump({"expert_loss": sft_e, "agent_loss": sft_a}, f)
    print(f"SFT: expert loss {sft_e[-1]:.3f}, agent loss {sft_a[-1]:.3f}")

    # ---- 4. GOPO iterations on fresh training scenarios (never the held-out ones)
    opt_e = torch.optim.AdamW(expert_model.parameters(), lr=args.lr, weight_decay=0.0)
    opt_a = torch.optim.AdamW(agent_model.parameters(), lr=args.lr_cs, weight_decay=0.0)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    from tqdm import tqdm
    for it in (bar := tqdm(range(args.iters), desc="GOPO")):
        seeds = data.train_seeds(args.scenarios, offset=len(logs) + it * args.scenarios)
        m = gopo.iteration(expert_model, agent_model, tok, tok, opt_e, opt_a,
                           [world.make_scenario(s) for s in seeds], values, world, args, it,
                           seed=args.seed * 100_003 + it)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        bar.set_postfix(R=f"{m['R']:.3f}", tse=f"{m['tse']:.3f}", pairs=m["pairs"])
    lm.save(expert_model, tok, os.path.join(run_dir, "expert"))
    lm.save(agent_model, tok, os.path.join(run_dir, "agent"))
    plot_curves(run_dir)
    print(f"done in {time.time() - t_start:.0f}s -> {run_dir}")


def plot_curves(run_dir):
    """curves.png: SFT losses and the per-iteration GOPO metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "sft.json")) as f:
        sft = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(sft["expert_loss"], label="Expert (decision NLL)")
    ax[0].plot(sft["agent_loss"], label="CS Agent (reply-token NLL)")
    ax[0].set(title="SFT", xlabel="step", ylabel="loss", yscale="log")
    ax[0].legend()
    its = [r["iter"] for r in rows]
    for key in ("R", "tse", "esndcg", "gre", "success"):
        ax[1].plot(its, [r[key] for r in rows], label=key)
    ax[1].set(title="GOPO rollouts (training scenarios, sampled)", xlabel="iteration")
    ax[1].legend()
    ax[2].plot(its, [r["loss"] if r["loss"] is not None else float("nan") for r in rows], label="Expert loss")
    ax[2].plot(its, [r["pairs"] for r in rows], label="pairs")
    ax[2].set(title="GOPO update", xlabel="iteration", yscale="log")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
