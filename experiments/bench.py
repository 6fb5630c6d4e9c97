"""Benchmark: how close GOPO's rollouts and updates come to the model's own floor.

    python -m experiments.bench                    # trains the default run first (measured), then benchmarks it
    python -m experiments.bench --run out/gopo     # benchmark an existing run's models, skip the train.py timing
    python -m experiments.bench --world desk       # the same on the service desk (its default run is timed)

Every figure is a ratio of two timings taken side by side in this process, on the same models and
shapes, each the median of --repeats interleaved repeats after a warm-up (this machine is shared
and noisy: the absolute times are printed for context only).

  1. rollout_efficiency = agent tokens per second in a full GOPO rollout batch (Expert decisions +
     CS replies + simulator, K rollouts x scenarios, sampled) / tokens per second of a bare
     `model.generate` (Hugging Face) on the CS Agent emitting the same number of tokens per row at
     the same batch size, from the same opening prompts. Higher is better; 1.0 = the floor.
  2. update_efficiency = time of the GOPO preference step (the one forward over every trajectory
     of the pairs, the loss, the backward) / time of one plain forward + backward (token-level
     cross-entropy) of the same model over the same padded tokens. Lower is better; 1.0 = the floor.
     Neither includes the optimizer step.
  3. turn_scaling_exponent: rollout time per dialogue at horizons 4, 8, 16 turns (customers that
     never end the dialogue, so every dialogue runs the whole horizon), and the least-squares slope
     of log(time) on log(horizon): 1.0 = linear in dialogue length, 2.0 = re-encoding the history.
  4. train_wall_s / train_peak_rss_mb: the default `python train.py`, in a subprocess.
Writes bench.json (or --json).

  turn_cost (--batch-sizes): seconds per simulated agent turn of one sampled rollout batch of B
     dialogues (the run's world and models, B / --k scenarios), for each B, interleaved; and each
     B's cost per turn relative to the first B's. Below 1.0 = the batch is sublinear: the same turn
     budget costs less wall time in bigger batches (fewer, larger iterations).

    python -m experiments.bench --sft out/desk     # only: SFT's length groups against one padded batch
    python -m experiments.bench --run out/desk --batch-sizes 64,128,256   # only: what a turn costs per batch size

  sft_speedup = seconds of SFT forward + backward on random batches of 16 whole logged dialogues,
     each padded to its longest / the same batches in 4 length groups (lm.length_buckets), on RUN's
     CS Agent and logs, any world. Higher is better.
"""
import argparse
import json
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU
import resource
import statistics
import subprocess
import sys
import time
import types

import torch

import data
import expert as expert_lib
import gopo
import lm
import rollout as rollout_lib
import worlds
from worlds import shop

p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
p.add_argument("--run", default=None, help="benchmark this run folder's models and skip measuring train.py "
               "(default: run the default `python train.py` into out/bench, timed, and use its models)")
p.add_argument("--world", default="shop", choices=["shop", "desk"],
               help="the world of the timed `python train.py --world ...` and of the measured rollouts "
               "(with --run: the run's own world)")
p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
p.add_argument("--scenarios", type=int, default=16, help="scenarios per rollout batch (train.py default)")
p.add_argument("--k", type=int, default=4, help="rollouts per scenario (train.py default)")
p.add_argument("--json", default="bench.json", help="where to write the results")
p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
               help="where the measured rollouts and steps run: auto = CUDA when there is a GPU")
p.add_argument("--sft", default=None, metavar="RUN",
               help="only measure sft_speedup on this run's CS Agent (agent_sft/) and logs.jsonl, any world")
p.add_argument("--batch-sizes", default=None, metavar="B1,B2,..",
               help="only measure the seconds per simulated agent turn of a rollout batch of each size "
               "(dialogues per batch, multiples of --k), on --run's models")
p.add_argument("--profile", action="store_true",
               help="also print a torch.profiler table of one 16-turn rollout batch (where the time goes)")


def die(message):   # one line on stderr, exit 2 (argparse would print the whole usage)
    print(f"bench.py: error: {message}", file=sys.stderr)
    sys.exit(2)


p.error = lambda message: die(f"{message} (see --help)")


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync():
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def side_by_side(fns, repeats):
    """Interleave the candidates (a, b, a, b, ...) after one warm-up each; median seconds of each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def measure_train(world, out="out"):
    """Wall seconds and peak RSS (MB) of the default `python train.py --world world`, in a subprocess."""
    cmd = [sys.executable, "train.py", "--world", world, "--out", out, "--run", "bench", "--overwrite"]
    print("timing:", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"bench.py: error: train.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss     # Linux: KB, max over children
    return wall, peak_kb / 1024, os.path.join(out, "bench")


def run_world(run):
    """(config.json, its world with the run's knobs) of a run folder."""
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    return config, worlds.load(config.get("world", "shop"), config.get("horizon"), config.get("paraphrases"))


def sft_speedup(run, repeats, batch_size=16, n_batches=4):
    """SFT's forward + backward over n_batches random batches of whole dialogues: one padded tensor
    per batch against lm.length_buckets. Returns the results' dict."""
    import random

    import agent as agent_lib
    config, world = run_world(run)
    model, tok = lm.load(os.path.join(run, "agent_sft"))
    with open(os.path.join(run, "logs.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    examples = agent_lib.sft_examples(tok, logs, world.INSTRUCTIONS)[0]
    rng = random.Random(0)
    batches = [rng.sample(examples, batch_size) for _ in range(n_batches)]
    model.train()

    def steps(grouped):
        def run_batches():
            for batch in batches:
                model.zero_grad(set_to_none=True)
                groups = lm.length_buckets(batch, length=lambda e: len(e[0])) if grouped else [batch]
                (-sum(agent_lib.reply_logps(model, *agent_lib.collate(g, tok.pad_token_id)).sum()
                      for g in groups)).backward()
        return run_batches
    t_padded, t_grouped = side_by_side([steps(False), steps(True)], repeats)
    real = sum(len(e[0]) for b in batches for e in b)
    padded = sum(len(b) * max(len(e[0]) for e in b) for b in batches)
    print(f"SFT on {run} ({config.get('world', 'shop')}): {n_batches} batches of {batch_size} dialogues, "
          f"{real / padded:.2f} of the padded tokens real; padded {t_padded * 1e3 / n_batches:.0f} ms, "
          f"length groups {t_grouped * 1e3 / n_batches:.0f} ms per step; sft_speedup {t_padded / t_grouped:.2f}")
    return {"sft_run": run, "sft_padded_s": t_padded / n_batches, "sft_grouped_s": t_grouped / n_batches,
            "sft_real_token_share": real / padded, "sft_speedup": t_padded / t_grouped}


def turn_cost(run, sizes, k, repeats, device):
    """Seconds per simulated agent turn of one rollout batch of B dialogues, for each B in sizes,
    measured side by side. Returns the results' dict."""
    expert, agent = (lm.load(os.path.join(run, name)) for name in ("expert", "agent"))
    expert, agent = (expert[0].to(device), expert[1]), (agent[0].to(device), agent[1])
    config, world = run_world(run)
    turns = {}

    def batch_of(B):
        scenarios = [world.make_scenario(s) for s in data.train_seeds(B // k, offset=50_000)]
        batch = [s for s in scenarios for _ in range(k)]

        def play():
            turns[B] = rollout_lib.turns_played(rollout_lib.rollout(expert, agent, batch, world, seed=1))
        return play
    seconds = side_by_side([batch_of(B) for B in sizes], repeats)
    per_turn = [s / turns[B] for s, B in zip(seconds, sizes)]
    for B, s, c in zip(sizes, seconds, per_turn):
        print(f"{B:4d} dialogues: {turns[B]} turns in {s:.1f} s, {c * 1e3:.2f} ms per turn, "
              f"{c / per_turn[0]:.2f} of the {sizes[0]}-dialogue batch's cost per turn", flush=True)
    return {"turn_cost_run": run, "turn_cost_batch_sizes": sizes, "turn_cost_turns": [turns[B] for B in sizes],
            "turn_cost_s": seconds, "turn_cost_s_per_turn": per_turn,
            "turn_cost_relative": [c / per_turn[0] for c in per_turn]}


def endless_world(horizon=None, base=shop):
    """A world (default: the shop) whose customers never end the dialogue and whose SOP allows every
    strategy where it would end it, so every dialogue runs the whole horizon (default: the world's;
    rollouts play world.HORIZON turns): only for timing."""
    class Customer(base.Customer):
        def reply(self, text, turn):
            utterance, event, _ = super().reply(text, turn)
            return utterance, event, False
    world = types.SimpleNamespace(**{k: getattr(base, k) for k in dir(base) if not k.startswith("_")})
    world.Customer = Customer
    world.allowed = lambda zs: base.allowed(zs) or list(base.STRATEGIES)
    world.HORIZON = horizon or base.HORIZON
    return world


def main():
    args = p.parse_args()
    if min(args.repeats, args.scenarios, args.k, args.threads) < 1:
        p.error("--repeats, --scenarios, --k and --threads must be at least 1")
    needed = ["expert/config.json", "agent/config.json", "values.json", "config.json"]
    if args.run is not None and not all(os.path.isfile(os.path.join(args.run, f)) for f in needed):
        p.error(f"--run {args.run}: not a finished train.py run (needs expert/, agent/ and values.json)")
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA GPU that torch can see")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    res = {"threads": args.threads, "repeats": args.repeats, "device": str(device)}
    if args.sft:
        if not all(os.path.exists(os.path.join(args.sft, f)) for f in ("agent_sft", "logs.jsonl", "config.json")):
            p.error(f"--sft {args.sft}: not a run with SFT checkpoints (needs agent_sft/, logs.jsonl, config.json)")
        res.update(sft_speedup(args.sft, args.repeats))
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        return
    if args.batch_sizes:
        try:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            p.error(f"--batch-sizes {args.batch_sizes}: expected comma-separated integers")
        if args.run is None or any(b < args.k or b % args.k for b in sizes):
            p.error("--batch-sizes needs --run, and sizes that are positive multiples of --k")
        res.update(turn_cost(args.run, sizes, args.k, args.repeats, device))
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        return
    if args.run is None:
        res["train_wall_s"], res["train_peak_rss_mb"], run = measure_train(args.world)
    else:
        run = args.run
    expert_model, tok_e = lm.load(os.path.join(run, "expert"))
    agent_model, tok_a = lm.load(os.path.join(run, "agent"))
    expert_model, agent_model = expert_model.to(device), agent_model.to(device)
    config, world = run_world(run)
    res["run"], res["world"] = run, config.get("world", "shop")
    res["model_params"] = lm.n_params(agent_model)
    scenarios = [world.make_scenario(s) for s in data.train_seeds(args.scenarios, offset=50_000)]
    batch = [s for s in scenarios for _ in range(args.k)]
    B = len(batch)

    # ---- 1. rollout efficiency
    last = {}

    def gopo_rollout():
        last["trajs"] = rollout_lib.rollout((expert_model, tok_e), (agent_model, tok_a), batch, world, seed=1)
    gopo_rollout()
    trajs = last["trajs"]
    emitted = sum(e - s for t in trajs for s, e in t["replies"]) + sum(len(t["decisions"]) for t in trajs)
    per_row = round(emitted / B)
    turns = max(len(t["replies"]) for t in trajs)     # lockstep: a turn lasts as long as its longest reply
    decode_steps = sum(max(e - s for t in trajs if len(t["replies"]) > k for s, e in [t["replies"][k]])
                       for k in range(turns))
    openings = [t["agent_ids"][:t["agent_ids"].index(tok_a.eos_token_id) + 1] for t in trajs]
    # the same final lengths: each row's prompt is its own dialogue minus the tokens it emitted
    contexts = [t["agent_ids"][:max(len(t["agent_ids"]) - per_row, 1)] for t in trajs]
    floors = {}
    for name, prompts in (("same_lengths", contexts), ("openings", openings)):
        ids, attn = lm.pad(prompts, tok_a.pad_token_id, left=True)
        floors[name] = (ids.to(device), attn.to(device))
    gen_kwargs = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=per_row,
                      min_new_tokens=per_row, pad_token_id=tok_a.pad_token_id)

    def bare_hf(name):
        def run():
            with torch.no_grad():
                agent_model.generate(input_ids=floors[name][0], attention_mask=floors[name][1], **gen_kwargs)
        return run
    print(f"rollout: {B} dialogues, {emitted} tokens emitted ({per_row} per dialogue, "
          f"{statistics.mean(len(t['agent_ids']) for t in trajs):.0f} CS Agent tokens in all; "
          f"{turns} turns, {decode_steps} lockstep decode steps)", flush=True)
    t_roll, t_long, t_short = side_by_side([gopo_rollout, bare_hf("same_lengths"), bare_hf("openings")],
                                           args.repeats)
    rate = emitted / t_roll
    res.update(rollout_s=t_roll, bare_generate_s=t_long, bare_generate_openings_s=t_short, rollout_batch=B,
               rollout_tokens=emitted, rollout_tokens_per_s=rate, rollout_turns=turns,
               rollout_decode_steps=decode_steps, rollout_tokens_per_row=per_row,
               bare_generate_tokens_per_s=B * per_row / t_long,
               rollout_efficiency=rate / (B * per_row / t_long),
               rollout_efficiency_vs_openings=rate / (B * per_row / t_short))

    # ---- 2. update efficiency: GOPO step vs plain forward+backward on the same tokens
    values = json.load(open(os.path.join(run, "values.json")))
    cfg = types.SimpleNamespace(**{"segment": 0, **config})   # runs from before --segment scored every decision
    rewards = [gopo.joint_reward(t["record"], values, world.HORIZON, cfg.alpha)["R"] for t in trajs]
    groups = [list(range(i * args.k, (i + 1) * args.k)) for i in range(len(scenarios))]
    pairs = gopo.build_pairs(rewards, groups, cfg.delta, cfg.max_pairs)
    strategy_ids = expert_lib.strategy_ids(tok_e, world.STRATEGIES)
    used = sorted({i for pr in pairs for i in pr})
    plain = expert_lib.collate([trajs[i] for i in used], tok_e.pad_token_id, len(world.STRATEGIES))
    plain = {k: v.to(device) for k, v in plain.items()}
    labels = plain["ids"].masked_fill(plain["attn"] == 0, -100)
    expert_model.train()

    S_ref = gopo.reference_logps(expert_model, tok_e, trajs, pairs, world.STRATEGIES, cfg.segment)   # (N,)
    R = torch.tensor(rewards)

    def gopo_step():   # gopo.expert_update's forward and backward, without the optimizer step
        expert_model.zero_grad(set_to_none=True)
        S, n_steps = gopo.scored_logps(expert_model, tok_e, [trajs[i] for i in used], world.STRATEGIES, cfg.segment)
        losses, _ = gopo.expert_loss(S, S_ref[used], n_steps, gopo.rows_of(pairs)[1], R[used], cfg.beta, cfg.nll_coef,
                                     False)
        losses.mean().backward()

    def plain_step():
        expert_model.zero_grad(set_to_none=True)
        expert_model(input_ids=plain["ids"], attention_mask=plain["attn"], labels=labels).loss.backward()
    print(f"update: {len(pairs)} pairs over {len(used)} trajectories, {tuple(plain['ids'].shape)} tokens",
          flush=True)
    t_gopo, t_plain = side_by_side([gopo_step, plain_step], args.repeats)
    expert_model.eval()
    res.update(update_s=t_gopo, plain_fwd_bwd_s=t_plain, update_pairs=len(pairs),
               update_tokens=list(plain["ids"].shape), update_efficiency=t_gopo / t_plain)

    # ---- 3. turn scaling: seconds per dialogue at horizons 4, 8, 16
    horizons = [4, 8, 16]
    per_dialogue = []
    for h in horizons:
        endless = endless_world(h, world)

        def run_h():
            rollout_lib.rollout((expert_model, tok_e), (agent_model, tok_a), batch, endless, seed=1)
        run_h()
        per_dialogue.append(median_time(run_h, args.repeats) / B)
        print(f"horizon {h}: {per_dialogue[-1] * 1e3:.1f} ms per dialogue", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rollout_lib.rollout((expert_model, tok_e), (agent_model, tok_a), batch, endless_world(16, world), seed=1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    xs, ys = [math.log(h) for h in horizons], [math.log(t) for t in per_dialogue]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    res.update(turn_scaling_horizons=horizons, turn_scaling_s_per_dialogue=per_dialogue,
               turn_scaling_exponent=slope)

    # ---- report
    rows = [("rollout efficiency (>= 0.85)", res["rollout_efficiency"],
             f"{res['rollout_tokens_per_s']:.0f} vs {res['bare_generate_tokens_per_s']:.0f} tok/s "
             f"(HF generate, same final lengths)"),
            ("  vs generate from the openings", res["rollout_efficiency_vs_openings"],
             "the floor with short contexts (no dialogue history to attend to)"),
            ("update efficiency (<= 1.2)", res["update_efficiency"],
             f"{t_gopo * 1e3:.1f} vs {t_plain * 1e3:.1f} ms"),
            ("turn scaling exponent (<= 1.2)", res["turn_scaling_exponent"],
             " / ".join(f"H={h}: {t * 1e3:.1f} ms" for h, t in zip(horizons, per_dialogue)))]
    if "train_wall_s" in res:
        wall, rss = (600, 3072) if args.world == "desk" else (300, 2048)    # the issues' budgets
        rows += [(f"train wall s (<= {wall})", res["train_wall_s"], f"python train.py --world {args.world}"),
                 (f"train peak RSS MB (<= {rss})", res["train_peak_rss_mb"], "ru_maxrss of the subprocess")]
    print(f"\n{'measure':34s} {'value':>9s}  context")
    for name, v, ctx in rows:
        print(f"{name:34s} {v:9.3f}  {ctx}")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
