"""Train GOPO end to end on the built-in shop (defaults: tiny model, CPU, a few minutes).

    python train.py                       # logs -> tokenizer + tiny models -> SFT -> GOPO -> out/gopo/
    python train.py --iters 40 --k 8      # longer run
    python train.py --model models/smollm2 --sft-lr 5e-5 --lr 1e-5   # a pretrained backbone (README "Scaling")
    torchrun --nproc_per_node 8 -- train.py --model <14B> --fsdp --bf16 --grad-ckpt   # the same file, distributed
    python train.py --algo ppo --sft-from out/sft   # a baseline (sft, ppo, memento, gopo-noexpert; experiments/baselines.py)
    python train.py --help                # every flag

Writes out/<run>/: config.json, logs.jsonl (the behaviour-policy training data), values.json
(event values fitted on those logs), expert_sft/ agent_sft/ expert/ agent/ (transformers folders),
metrics.jsonl (one line per GOPO iteration), curves.png, time.json. Baselines write flat_sft/ and
flat/ (the flat agent; ppo adds value_head.pt) or bank.pt (memento) instead of expert/ agent/.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU
if "--no-offline" not in sys.argv:  # before transformers: a missing model fails at once, no hub retries
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import random
import time

import torch

import agent as agent_lib
import checkpoint
import cli
import data
import expert as expert_lib
import gopo
import lm
import parallel
import tse
import world as world_lib


die, checked, positive, nonneg = cli.die, cli.checked, cli.positive, cli.nonneg


ALGOS = ["gopo", "sft", "ppo", "memento", "gopo-noexpert"]

p = cli.Parser(__doc__)
g = p.add_argument_group("run")
g.add_argument("--algo", default="gopo", choices=ALGOS,
               help="gopo; sft (the SFT stages only); the baselines (experiments/baselines.py): ppo (flat agent, token-level "
               "PPO), memento (case bank over the frozen SFT agents), gopo-noexpert (GOPO's loss on a flat agent)")
g.add_argument("--out", default="out", help="parent folder of run folders")
g.add_argument("--run", default=None, help="run folder name under --out (default: the --algo name)")
g.add_argument("--seed", type=int, default=0, help="seeds every sampler: logs, init, batches, rollouts")
g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
g.add_argument("--resume", default=None, metavar="RUN_DIR",
               help="continue a killed run from its last completed stage/iteration, with its own config")
g.add_argument("--sft-from", default=None, metavar="RUN_DIR",
               help="copy the SFT checkpoints from this run (e.g. an --algo sft run with the same seed, data and "
               "SFT flags) instead of training them again: every method then starts from the same SFT models")
g.add_argument("--max-nonfinite", type=positive(int), default=3,
               help="stop after this many iterations in a row with non-finite losses or gradients")
g = p.add_argument_group("data: logged dialogues of the behaviour (\"typical human agent\") policy, or a real dataset")
g.add_argument("--data", default="shop", choices=["shop", "mgshop", "multiwoz"],
               help="shop: a built-in simulated world (--world); mgshop, multiwoz: real logs with a logged-context "
               "world (realdata/logged.py)")
g.add_argument("--world", default="shop", choices=list(world_lib.WORLDS),
               help="the built-in world (world.py has the contract): shop, small and quick; desk, a service desk "
               "with 1-3 requests per customer, hidden facts used turns later and SOP gates on the whole history")
g.add_argument("--horizon", type=positive(int), default=None, help="desk: maximum agent turns (default: the world's)")
g.add_argument("--paraphrases", type=positive(int), default=None,
               help="desk: paraphrases per strategy in the rule policies' text (default: the world's)")
g.add_argument("--data-path", default=None, help="MG-ShopDial JSON file, or the MultiWOZ 2.2 folder")
g.add_argument("--n-logs", type=positive(int), default=1200, help="logged training dialogues to simulate")
g.add_argument("--logs", default=None, help="read the logged dialogues from this JSONL (common schema) "
               "instead of simulating them")
g = p.add_argument_group("model")
g.add_argument("--model", default="tiny", help="backbone of both agents: 'tiny' (built from config, "
               "tokenizer trained on the logs), a Hugging Face hub id, or a local model folder")
g.add_argument("--expert-model", default=None, help="the Expert's backbone, if not --model "
               "(a smaller planner than responder; hub id or folder)")
g.add_argument("--offline", default=True, action=argparse.BooleanOptionalAction,
               help="never touch the network (HF_HUB_OFFLINE): a model not on disk fails at once")
g.add_argument("--d-model", type=positive(int), default=128, help="tiny model width")
g.add_argument("--n-layer", type=positive(int), default=2, help="tiny model depth")
g.add_argument("--vocab-size", type=positive(int), default=1024, help="tiny BPE vocabulary size")
g = p.add_argument_group("devices and precision; distributed: torchrun --nproc_per_node N -- train.py ... "
                         "(without --fsdp: plain data parallelism)")
g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
               help="where to compute: auto = CUDA when there is a GPU (under torchrun: GPU LOCAL_RANK)")
g.add_argument("--fsdp", action="store_true", help="shard both models with FSDP2 (each decoder block, then the root); "
               "needs torchrun (--nproc_per_node 1 is fine)")
g.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights and fp32 AdamW states: "
               "autocast in one process, FSDP2 mixed precision (fp32 gradient reduction) with --fsdp")
g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant) on each block")
g.add_argument("--save-every", type=nonneg(int), default=1,
               help="gopo: write the --resume state every N iterations (0: never). It holds both models and both "
               "AdamW states, 12 bytes per parameter, and the atomic swap keeps the old one until the new one "
               "is complete: 2 x 1.5B parameters need 37 GB, 74 GB during a swap (docs/scaling.md)")
g = p.add_argument_group("SFT")
g.add_argument("--sft-steps", type=positive(int), default=300, help="SFT steps per agent")
g.add_argument("--sft-batch", type=positive(int), default=None,
               help="SFT batch size (dialogues); default 16 for the shop, 4 for a real dataset (dialogues ~5x longer)")
g.add_argument("--sft-lr", type=positive(float), default=1e-2, help="SFT learning rate")
g.add_argument("--expert-from-agent", default=True, action=argparse.BooleanOptionalAction,
               help="tiny models: the Expert starts its SFT from the SFT'd CS Agent's weights (so it can read "
               "the dialogue) instead of from scratch")
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
g.add_argument("--max-reply-tokens", type=checked(int, 1, True, 4095), default=32,
               help="a reply is cut after this many tokens (rollouts and CS alignment samples)")
g.add_argument("--cs-samples", type=nonneg(int), default=16, help="(h_t, z_t) per iteration for CS alignment pairs")
g.add_argument("--beta-cs", type=positive(float), default=0.1, help="DPO temperature of the CS alignment loss")
g.add_argument("--lr-cs", type=positive(float), default=1e-4, help="CS Agent learning rate in GOPO")
g = p.add_argument_group("baselines (experiments/baselines.py; same budget as GOPO: --iters x --scenarios x --k dialogues)")
g.add_argument("--flat-lr", type=positive(float), default=3e-4, help="flat agent learning rate (ppo, gopo-noexpert)")
g.add_argument("--kl-coef", type=nonneg(float), default=0.02, help="ppo: per-token KL penalty to the SFT flat agent")
g.add_argument("--clip", type=positive(float), default=0.2, help="ppo: ratio clip range epsilon")
g.add_argument("--gae-lambda", type=checked(float, 0, True, 1), default=1.0, help="ppo: GAE lambda (gamma is 1)")
g.add_argument("--vf-coef", type=nonneg(float), default=0.5, help="ppo: weight of the value loss")
g.add_argument("--ppo-epochs", type=positive(int), default=4, help="ppo: passes over each iteration's rollouts")
g.add_argument("--ppo-minibatch", type=positive(int), default=16, help="ppo: dialogues per gradient step")
g.add_argument("--memento-k", type=positive(int), default=16, help="memento: cases retrieved per decision")
g.add_argument("--memento-eps", type=checked(float, 0, True, 1), default=0.2,
               help="memento: share of training decisions sampled from the SFT Expert (exploration)")
g.add_argument("--memento-decay", type=checked(float, 0, False, 1), default=0.5,
               help="memento: weight of a turn in the state embedding per turn of age")
g.add_argument("--memento-logs", default=True, action=argparse.BooleanOptionalAction,
               help="memento: start the case bank with the cases of the logged training dialogues")


def check_flags(args):
    """Conflicting flags: one line, exit 2, before anything is written."""
    tiny_flags = [f for f in ("d_model", "n_layer", "vocab_size") if getattr(args, f) != p.get_default(f)]
    if args.model != "tiny" and tiny_flags:
        die(f"--{tiny_flags[0].replace('_', '-')} only shapes the tiny model; drop it with --model {args.model}")
    if args.expert_model is not None and (args.model == "tiny") != (args.expert_model == "tiny"):
        die("--expert-model and --model must both be 'tiny' or both be pretrained (the tiny models "
            "share a tokenizer trained on the logs)")
    if args.fsdp and not parallel.distributed():
        die("--fsdp shards over torchrun ranks: launch with torchrun --nproc_per_node N -- train.py --fsdp ... "
            "(N = 1 is fine)")
    if args.fsdp and args.algo not in ("gopo", "sft"):
        die(f"--algo {args.algo} runs without FSDP (in one process; --bf16 gives it bf16 compute); drop --fsdp")
    if args.algo not in ("gopo", "sft") and parallel.world() > 1:
        die(f"--algo {args.algo} runs in one process (only gopo and sft are distributed); drop torchrun")
    if args.algo == "ppo" and args.agent_temperature == 0:
        die("--algo ppo needs sampled rollouts: --agent-temperature must be > 0 (it is the policy's temperature)")
    if args.sft_from and args.resume:
        die("--sft-from starts a new run; --resume continues one with its own SFT checkpoints")
    if args.resume and parallel.distributed():
        die("--resume runs in one process without --fsdp; resume without torchrun")
    if args.d_model % 4:
        die(f"--d-model must be a multiple of the 4 attention heads, got {args.d_model}")
    if args.data != "shop" and not args.data_path:
        die(f"--data {args.data} needs --data-path (see README \"Real data\" for where to get it)")
    if args.data != "shop" and (args.world != "shop" or args.horizon or args.paraphrases):
        die(f"--world, --horizon and --paraphrases pick a built-in world; --data {args.data} brings its own")
    if args.world == "shop" and (args.horizon or args.paraphrases):
        die("--horizon and --paraphrases are knobs of the desk world: add --world desk")
    if args.data == "shop" and args.data_path:
        die("--data-path is for --data mgshop or multiwoz; the built-in shop needs no file")
    if args.data != "shop" and (args.logs or args.n_logs != p.get_default("n_logs")):
        die(f"--logs and --n-logs are for the built-in shop; --data {args.data} trains on its own train split")


def load_world(args):
    """(world, training logs or None, splits or None). The built-in shop simulates its logs later;
    a real dataset's training split is the logs, and its world is a logged-context one (realdata/logged.py)."""
    try:
        if args.data == "shop":   # on --resume the run's own logs.jsonl is read later instead
            world = world_lib.load(args.world, args.horizon, args.paraphrases)
            read = args.logs and not args.resume
            return world, data.read_jsonl(args.logs, world.STRATEGIES, world.EVENTS) if read else None, None
        from realdata import logged
        splits = logged.load_splits(args.data, args.data_path)
        if not splits["train"] or not splits["test"]:
            die(f"--data-path {args.data_path}: the {args.data} data has an empty train or test split")
        world = logged.make_world(splits["train"], [r for v in splits.values() for r in v])
        return world, splits["train"], splits
    except data.DataError as e:
        die(str(e))


def check_model(name):
    """Fail before anything is written if a pretrained backbone is not there (a config is enough)."""
    if name is None or name == "tiny":
        return
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        die(f"--model {name}: the folder holds no config.json (not a Hugging Face model folder)")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        load_backbone(name, None)   # the one-line error that says what to do


def load_backbone(name, strategies):
    """A pretrained model + tokenizer, or a one-line error that says how to get one offline."""
    try:
        return lm.from_pretrained(name, strategies)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            die(f"cannot load a model from the folder {name}: {str(e).splitlines()[0]}")
        hint = " (offline: pass a local folder, e.g. python tools/convert.py models/smollm2 then " \
               "--model models/smollm2, or add --no-offline to download)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        die(f"cannot load --model '{name}': not a local folder and not in the Hugging Face cache{hint}")


def main(argv=None):
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: this machine has no CUDA GPU that torch can see (use --device cpu)")
    device = parallel.init(args.device)       # torchrun sets WORLD_SIZE; one process otherwise
    check_flags(args)
    if args.sft_batch is None and not args.resume:   # a resumed run's config.json has its own
        args.sft_batch = 16 if args.data == "shop" else 4
    check_model(args.model)
    if args.sft_from:
        checkpoint.check_sft_from(args)
    check_model(args.expert_model)
    # read user data before touching the output folder, so a bad file loses nothing
    world, logs, splits = load_world(args) if not args.resume else (None, None, None)
    n_logs = len(logs) if logs is not None else args.n_logs
    if n_logs + args.iters * args.scenarios > data.TEST_SEED_BASE:
        die(f"--n-logs + --iters x --scenarios needs more than the {data.TEST_SEED_BASE} training "
            "scenario seeds; use fewer")
    run_dir, args = checkpoint.resume_run(args, p) if args.resume else (checkpoint.start_run(args), args)
    if args.resume:
        world, logs, splits = load_world(args)
    path = lambda name: os.path.join(run_dir, name)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    say = print if parallel.is_main() else (lambda *a, **k: None)
    amp = lambda: lm.autocast(device, args.bf16 and not args.fsdp)   # --bf16 in one process (FSDP has its own)
    t_start = time.time()

    # ---- 1. logged dialogues (training data) and the event values fitted on them
    if args.resume and os.path.exists(path("values.json")):
        try:
            logs = data.read_jsonl(path("logs.jsonl"), world.STRATEGIES, world.EVENTS)
        except data.DataError as e:
            die(f"cannot resume: {e}")
    else:
        if logs is None:
            logs = [world.play(world.make_scenario(s), world.behaviour_policy, seed=args.seed)
                    for s in data.train_seeds(args.n_logs)]
        if parallel.is_main():
            if splits is not None:   # the split of a real dataset, by dialogue id
                with open(path("split.json"), "w") as f:
                    json.dump({k: [r["id"] for r in v] for k, v in splits.items()}, f, indent=1)
            data.write_jsonl(logs, path("logs.jsonl"))
            with open(path("values.json") + ".tmp", "w") as f:
                json.dump(tse.event_values(logs, world.SUCCESS_EVENTS), f, indent=2)
            os.replace(path("values.json") + ".tmp", path("values.json"))
        parallel.barrier()
    with open(path("values.json")) as f:
        values = json.load(f)
    say(f"logs: {len(logs)} dialogues, behaviour success {gopo.mean(r['success'] for r in logs):.3f}")

    # ---- 2. tokenizer and models; 3. SFT: Expert on logged strategies, CS Agent (and the flat agent
    #         of the baselines) on logged replies; or the SFT checkpoints of another run (--sft-from)
    need = checkpoint.SFT_MODELS[args.algo]
    for name in ("expert_sft", "agent_sft", "flat_sft", "state"):
        lm.recover(path(name))
    if args.sft_from and not os.path.exists(path("sft.json")) and parallel.is_main():
        checkpoint.copy_sft(args.sft_from, run_dir, need, values)
    parallel.barrier()
    models = {}      # name -> (model, tokenizer)
    if os.path.exists(path("sft.json")):   # sft.json is written last: SFT finished (--resume, --sft-from)
        for name in need:
            model, tok = lm.load(path(f"{name}_sft"))
            models[name] = (place(model, args, device), tok)
        say(f"SFT: loaded from {args.sft_from or 'the run'}")
    else:
        if args.model == "tiny":
            texts = [t["text"] for r in logs for t in r["turns"]] + list(world.INSTRUCTIONS.values())
            tok = lm.train_tokenizer(texts, world.STRATEGIES, args.vocab_size)
            max_len = 1024 if args.world == "shop" and args.data == "shop" else 4096   # desk, real dialogues: ~2k tokens
            for name in need:   # each model its own init seed, the same whichever others are built
                m = lm.build_tiny_model(tok, args.d_model, args.n_layer, max_len=max_len,
                                        seed=args.seed + {"expert": 0, "agent": 1, "flat": 2}[name])
                lm.add_strategy_tokens(m, tok, world.STRATEGIES)
                models[name] = (m, tok)
        else:
            for name in need:
                models[name] = load_backbone(args.expert_model or args.model if name == "expert" else args.model,
                                             world.STRATEGIES)
        say("models: " + ", ".join(f"{name} {lm.n_params(m) / 1e6:.2f}M" for name, (m, _) in models.items()) +
            f" parameters, vocab {len(next(iter(models.values()))[1])}")
        models = {name: (place(m, args, device), tok) for name, (m, tok) in models.items()}
        losses = {}
        for name in sorted(models, key=("agent", "flat", "expert").index):   # the CS Agent before the Expert
            model, tok = models[name]
            if name == "expert" and args.model == "tiny" and args.expert_from_agent and "agent" in models:
                # a tiny Expert trained from scratch on one decision token per turn never learns to read
                # the customer (README "Baselines"); the SFT'd CS Agent has learned to: start from it
                model = place(lm.load(path("agent_sft"))[0], args, device)
                models[name] = (model, tok)
            with amp():
                if name == "expert":
                    losses[name] = expert_lib.sft(model, tok, logs, world.STRATEGIES, world.allowed, world.INSTRUCTIONS,
                                                  args.sft_steps, args.sft_batch, args.sft_lr, args.seed)
                else:   # the CS Agent with strategy prompts, the flat agent without (instructions=None)
                    losses[name] = agent_lib.sft(model, tok, logs, world.INSTRUCTIONS if name == "agent" else None,
                                                 args.sft_steps, args.sft_batch, args.sft_lr, args.seed,
                                                 window_steps=args.sft_window_steps, desc=f"SFT {name}")
            lm.save(model, tok, path(f"{name}_sft"))
        if parallel.is_main():
            with open(path("sft.json"), "w") as f:
                json.dump({f"{name}_loss": losses[name] for name in need}, f)
        say("SFT: " + ", ".join(f"{name} loss {losses[name][-1]:.3f}" for name in need))
    expert_model, tok_e = models.get("expert", (None, None))
    agent_model, tok_a = models.get("agent", models.get("flat", (None, None)))

    # ---- 4. the method's iterations on fresh training scenarios (never the held-out ones); every
    #         method sees the same scenarios and plays the same number of dialogues
    start, bad_in_a_row = 0, 0
    if args.algo == "gopo":
        opt_e = torch.optim.AdamW(expert_model.parameters(), lr=args.lr, weight_decay=0.0)
        opt_a = torch.optim.AdamW(agent_model.parameters(), lr=args.lr_cs, weight_decay=0.0)
        if args.resume and os.path.exists(path("state")):   # the last completed iteration
            expert_model, tok_e = lm.load(path("state/expert"))
            agent_model, tok_a = lm.load(path("state/agent"))
            expert_model, agent_model = place(expert_model, args, device), place(agent_model, args, device)
            opt_e = torch.optim.AdamW(expert_model.parameters(), lr=args.lr, weight_decay=0.0)
            opt_a = torch.optim.AdamW(agent_model.parameters(), lr=args.lr_cs, weight_decay=0.0)
            trainer = torch.load(path("state/trainer.pt"))
            opt_e.load_state_dict(trainer["opt_e"])
            opt_a.load_state_dict(trainer["opt_a"])
            start, bad_in_a_row = trainer["iterations_done"], trainer["bad_in_a_row"]
        step = lambda scenarios, it, seed: gopo.iteration(expert_model, agent_model, tok_e, tok_a, opt_e, opt_a,
                                                          scenarios, values, world, args, it, seed)
    elif args.algo != "sft":   # a baseline: its step and its checkpoint writer (experiments/baselines.py)
        from experiments import baselines
        step, save_method = baselines.trainer(args.algo, expert_model, agent_model, tok_e, tok_a, logs, values,
                                              world, args, device)
    n_iters = args.iters if args.algo != "sft" else 0
    if parallel.is_main() and n_iters:
        checkpoint.keep_metrics(path("metrics.jsonl"), start)   # drop lines of an iteration that did not finish
    from tqdm import tqdm
    for it in (bar := tqdm(range(start, n_iters), initial=start, total=n_iters, desc=args.algo,
                           disable=not parallel.is_main() or not n_iters)):
        seeds = data.train_seeds(args.scenarios, offset=len(logs) + it * args.scenarios)
        with amp():
            m = step([world.make_scenario(s) for s in seeds], it, args.seed * 100_003 + it)
        if parallel.is_main():
            with open(path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
        bar.set_postfix(R=f"{m['R']:.3f}", tse=f"{m['tse']:.3f}")
        if m.get("nonfinite_steps"):
            bar.write(f"iteration {it}: {m['nonfinite_steps']} step(s) skipped (non-finite loss or gradient)")
        bad_in_a_row = bad_in_a_row + 1 if m.get("nonfinite_steps") else 0
        if bad_in_a_row >= args.max_nonfinite:
            where = f"The last good state is in {path('state')} (lower --lr or --beta, then --resume)" \
                if args.algo == "gopo" else "Lower the learning rate and start again"
            die(f"{bad_in_a_row} iterations in a row had non-finite losses or gradients; stopped. {where}")
        if args.algo == "gopo" and not parallel.distributed() and args.save_every and \
                ((it + 1) % args.save_every == 0 or it + 1 == n_iters):
            checkpoint.save_state(path("state"), expert_model, agent_model, tok_e, tok_a, opt_e, opt_a, it + 1, bad_in_a_row)
    if args.algo == "gopo":
        lm.save(expert_model, tok_e, path("expert"))
        lm.save(agent_model, tok_a, path("agent"))
    elif args.algo != "sft":
        save_method(run_dir)
    if parallel.is_main():
        plot_curves(run_dir)
        with open(path("time.json"), "w") as f:   # this process's wall time (--compare reports it)
            json.dump({"seconds": round(time.time() - t_start, 1)}, f)
    say(f"done in {time.time() - t_start:.0f}s -> {run_dir}")
    parallel.close()


def place(model, args, device):
    """Move to the device; under torchrun --fsdp, shard (FSDP2); --grad-ckpt either way."""
    model.to(device)
    if args.fsdp:
        return parallel.shard(model, bf16=args.bf16, grad_ckpt=args.grad_ckpt)
    if args.grad_ckpt:
        lm.activation_checkpointing(model)
    return model


def plot_curves(run_dir):
    """curves.png: SFT losses and the per-iteration metrics of the method (none for --algo sft)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "sft.json")) as f:
        sft = json.load(f)
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    dpo = bool(rows) and "rewards/margins" in rows[-1]
    fig, ax = plt.subplots(1, (4 if dpo else 3) if rows else 1, figsize=((20 if dpo else 15) if rows else 5, 4),
                           squeeze=False)
    ax = ax[0]
    labels = {"expert_loss": "Expert (decision NLL)", "agent_loss": "CS Agent (reply-token NLL)",
              "flat_loss": "flat agent (reply-token NLL)"}
    for key, curve in sft.items():
        ax[0].plot(curve, label=labels.get(key, key))
    ax[0].set(title="SFT", xlabel="step", ylabel="loss", yscale="log")
    ax[0].legend()
    if rows:
        its = [r["iter"] for r in rows]
        for key in ("R", "tse", "esndcg", "gre", "success"):
            if key in rows[0]:
                ax[1].plot(its, [r[key] for r in rows], label=key)
        ax[1].set(title="rollouts (training scenarios, sampled)", xlabel="iteration")
        ax[1].legend()
        for key, label in (("loss", "loss"), ("value_loss", "value loss"), ("pairs", "pairs"),
                           ("cases", "cases in the bank")):
            if key in rows[0]:
                ax[2].plot(its, [r[key] if r[key] is not None else float("nan") for r in rows], label=label)
        ax[2].set(title="update", xlabel="iteration", yscale="log")
        ax[2].legend()
        if dpo:   # what the Expert's update did to the pairs, in the terms DPO trainers log
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                ax[3].plot(its, [r.get(key, float("nan")) for r in rows], label=key)
            ax[3].axhline(0, color="grey", lw=0.5)
            ax[3].set(title="Expert update: beta (S - S_ref) after it", xlabel="iteration")
            ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
