"""Train GOPO end to end on the built-in shop (defaults: tiny model, CPU, a few minutes).

    python train.py                       # logs -> tokenizer + tiny models -> SFT -> GOPO -> out/gopo/
    python train.py --iters 40 --k 8      # longer run
    python train.py --model models/smollm2 --sft-lr 2e-4 --lr 1e-5   # a pretrained backbone (docs/scaling.md: the CPU recipe)
    torchrun --nproc_per_node 8 -- train.py --model <14B> --fsdp --bf16 --grad-ckpt   # the same file, distributed
    python train.py --method sft          # the SFT stages only, for every method of a seed to start from
    python -m experiments.baselines --method ppo --sft-from out/sft   # a baseline: these stages, its own step
    python train.py --help                # every flag

Writes out/<run>/: config.json, env.json (command, commit, versions, device), logs.jsonl (the
behaviour-policy training data), values.json (event values fitted on those logs), expert_sft/
agent_sft/ expert/ agent/ (transformers folders; LoRA adapters with --lora-r),
metrics.jsonl (one line per GOPO iteration), curves.png, time.json; --method sft: SFT only, flat_sft/
too (the baselines' single agent). main() runs the stages top to bottom; experiments/baselines.py
runs them with its own flags, step and checkpoint writer.
"""
import argparse
import json
import os
import sys

import cli

cli.process_env(sys.argv)   # before torch and transformers read it
import random
import time
from types import SimpleNamespace

import torch

import agent as agent_lib
import checkpoint
import data
import expert as expert_lib
import gopo
import lm
import lora
import parallel
import plots
import tracking
import tse
import worlds

die, checked, positive, nonneg = cli.die, cli.checked, cli.positive, cli.nonneg
EXPERT_SFT_DESK = (3e-3, 600)   # the desk's Expert SFT (lr, steps), measured by the ceilings probe (docs/ceilings.md)


def parser(methods=("gopo", "sft"), default=True, method_help=None):
    """train.py's command line, its --method choices given: train.py's own methods, or the baselines'
    (experiments/baselines.py adds its flags to the parser this returns; default=False: --method is
    required)."""
    p = cli.Parser(__doc__)
    # ---- run: what to train, where, and from what
    g = p.add_argument_group("run")
    g.add_argument("--method", "--algo", dest="method", default=methods[0] if default else None, choices=methods,
                   required=not default, help=method_help or "gopo; sft (the SFT stages only: Expert, CS Agent and the "
                   "baselines' flat agent). The baselines: python -m experiments.baselines --method ppo|memento|gopo-noexpert. "
                   "--algo is the old name of this flag")
    g.add_argument("--out", default="out", help="parent folder of run folders")
    g.add_argument("--run", default=None, help="run folder name under --out (default: the --method name)")
    g.add_argument("--seed", type=int, default=0, help="seeds every sampler: logs, init, batches, rollouts")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run from its last completed stage/iteration, with its own config; with a larger "
                   "--turn-budget (and more --keep-at points), carry a run that stopped at its budget further")
    g.add_argument("--sft-from", default=None, metavar="RUN_DIR",
                   help="copy the SFT checkpoints from this run (e.g. a --method sft run with the same seed, data and "
                   "SFT flags) instead of training them again: every method then starts from the same SFT models")
    g.add_argument("--report-to", default="none", choices=tracking.TRACKERS,
                   help="also send each metrics.jsonl line (TRL's names, train/...) to this tracker: tensorboard "
                   "(out/<run>/tensorboard/), trackio or wandb (each installed separately; docs/cli.md)")
    g.add_argument("--max-nonfinite", type=positive(int), default=3,
                   help="stop after this many iterations in a row with non-finite losses or gradients")
    # ---- data
    g = p.add_argument_group("data: logged dialogues of the behaviour (\"typical human agent\") policy, or a real dataset")
    g.add_argument("--data", default="sim", choices=["sim", "mgshop", "multiwoz", "records"],
                   type=lambda v: "sim" if v == "shop" else v,   # shop: the old name of sim
                   help="sim: a built-in simulated world (--world; 'shop' is the old name of this value); mgshop, multiwoz: real logs with a logged-context "
                   "world (worlds/logged.py); records: your own dialogues in the common record schema "
                   "(docs/real-data.md), with that world")
    g.add_argument("--world", default="shop", choices=list(worlds.WORLDS),
                   help="the built-in world (worlds/__init__.py has the contract): shop, small and quick; desk, a service desk "
                   "with 1-3 requests per customer, hidden facts used turns later and SOP gates on the whole history")
    g.add_argument("--horizon", type=positive(int), default=None, help="desk: maximum agent turns; a customer brings at most one request per 8 "
                   "turns (default: the world's, 24: 1-3 requests; 10: one request, about shop's length)")
    g.add_argument("--paraphrases", type=positive(int), default=None,
                   help="desk: paraphrases per strategy in the rule policies' text (default: the world's)")
    g.add_argument("--data-path", default=None,
                   help="mgshop: the MGShopDial.json file; multiwoz: the official MultiWOZ 2.2 folder, or its Hugging "
                   "Face copy (a save_to_disk folder, or a hub id with --no-offline); records: a JSONL file or a Hugging "
                   "Face dataset (a save_to_disk folder, e.g. from python -m worlds.export, or a hub id with --no-offline)")
    g.add_argument("--n-logs", type=positive(int), default=1200, help="logged training dialogues to simulate")
    g.add_argument("--logs", default=None,
                   help="read the logged dialogues (common schema) from this JSONL file, or from a Hugging Face dataset: a "
                   "save_to_disk folder (python -m worlds.export writes one) or a hub id with --no-offline")
    # ---- model
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="backbone of both agents: 'tiny' (built from config, "
                   "tokenizer trained on the logs), a Hugging Face hub id, or a local model folder")
    g.add_argument("--expert-model", default=None, help="the Expert's backbone, if not --model "
                   "(a smaller planner than responder; hub id or folder)")
    g.add_argument("--offline", default=True, action=argparse.BooleanOptionalAction,
                   help="never touch the network (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): a model or a dataset hub id not on "
                   "disk fails at once")
    g.add_argument("--lora-r", type=positive(int), default=None, metavar="R",
                   help="pretrained backbones: train LoRA adapters of rank R (peft, pip install -r requirements.txt) and "
                   "the strategy tokens' rows instead of every weight; the base stays frozen (bf16 with --bf16). "
                   "expert/ and agent/ then hold adapters that eval.py, --resume and --sft-from load over the base")
    g.add_argument("--lora-alpha", type=positive(float), default=None, help="LoRA scale alpha (default 2 x --lora-r)")
    g.add_argument("--lora-dropout", type=checked(float, 0, True, 1), default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="all-linear", metavar="NAMES",
                   help="comma-separated linear layer names to adapt (e.g. q_proj,v_proj); all-linear: every linear "
                   "layer but the output layer")
    g.add_argument("--lora-only", default=None, choices=["expert", "agent"],
                   help="LoRA on this agent only; the other trains every weight")
    g.add_argument("--merge-lora", action="store_true",
                   help="also write expert_merged/ and agent_merged/: the adapters merged into whole models that plain "
                   "AutoModelForCausalLM.from_pretrained loads")
    g.add_argument("--d-model", type=positive(int), default=128, help="tiny model width")
    g.add_argument("--n-layer", type=positive(int), default=2, help="tiny model depth")
    g.add_argument("--vocab-size", type=positive(int), default=1024, help="tiny BPE vocabulary size")
    # ---- devices and precision
    g = p.add_argument_group("devices and precision; distributed: torchrun --nproc_per_node N -- train.py ... "
                             "(without --fsdp: plain data parallelism)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute: auto = CUDA when there is a GPU (under torchrun: GPU LOCAL_RANK)")
    g.add_argument("--fsdp", action="store_true", help="shard both models with FSDP2 (each decoder block, then the root); "
                   "needs torchrun (--nproc_per_node 1 is fine)")
    g.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights and fp32 AdamW states: "
                   "autocast in one process (on a GPU the rollouts play a bf16 copy of each model, refreshed after "
                   "every step: 2 bytes per parameter more), FSDP2 mixed precision (fp32 gradient reduction) with --fsdp")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant) on each block")
    g.add_argument("--device-batch-size", type=positive(int), default=None, metavar="N",
                   help="at most N sequences per forward in every update (both SFTs, GOPO's pairs, CS alignment, the "
                   "baselines), gradients accumulated over the micro-batches: the same loss and gradient up to float "
                   "rounding, peak activation memory set by N instead of the batch. A preference pair (or a --listwise "
                   "group) is never split. Default: the whole batch at once")
    g.add_argument("--save-every", type=nonneg(int), default=1,
                   help="gopo: write the --resume state every N iterations (0: never): both models and AdamW states, 12 "
                   "bytes per parameter, the old state kept until the new one is complete: 2 x 1.5B parameters need 37 GB, "
                   "74 GB during a swap (docs/scaling.md)")
    # ---- SFT
    g = p.add_argument_group("SFT")
    g.add_argument("--sft-steps", type=positive(int), default=300, help="SFT steps of the Expert (and, by default, of "
                   "the models that write replies)")
    g.add_argument("--agent-sft-steps", type=positive(int), default=None,
                   help="SFT steps of the CS Agent (and the baselines' flat agent); default --sft-steps, 3x that on the "
                   "desk, whose replies copy order numbers from turns far back (docs/log.md)")
    g.add_argument("--sft-batch", type=positive(int), default=None,
                   help="SFT batch size (dialogues); default 16 for the shop, 4 for a real dataset (dialogues ~5x longer)")
    g.add_argument("--sft-lr", type=positive(float), default=1e-2, help="SFT learning rate (the CS Agent and the "
                   "flat agent; the Expert too unless --expert-sft-lr)")
    g.add_argument("--expert-sft-lr", type=positive(float), default=None,
                   help=f"the Expert's SFT learning rate; default --sft-lr, {EXPERT_SFT_DESK[0]} on the desk, where at 1e-2 "
                   "the Expert never carries a fact from the opening line to the decision that needs it (docs/ceilings.md)")
    g.add_argument("--expert-sft-steps", type=positive(int), default=None,
                   help=f"the Expert's SFT steps; default --sft-steps, {EXPERT_SFT_DESK[1]} on the desk (docs/ceilings.md)")
    g.add_argument("--expert-from-agent", default=True, action=argparse.BooleanOptionalAction,
                   help="tiny models: the Expert starts its SFT from the SFT'd CS Agent (which reads the dialogue)")
    g.add_argument("--sft-window-steps", type=nonneg(int), default=None,
                   help="first CS Agent SFT steps on short windows (a curriculum; see agent.sft); default "
                   "150, --sft-steps on the desk")
    # ---- GOPO
    g = p.add_argument_group("GOPO")
    g.add_argument("--iters", type=positive(int), default=20, help="GOPO iterations (at most, with --turn-budget)")
    g.add_argument("--turn-budget", type=nonneg(int), default=0,
                   help="stop after the iteration whose rollouts bring the simulated agent turns (metrics.jsonl's "
                   "agent_turns) to this many (0: --iters alone): rollout modes compared at equal turns")
    g.add_argument("--keep-at", type=cli.int_list, default=[], metavar="T1,T2,...",
                   help="gopo: when agent_turns first reaches each of these, write the models as they are then into "
                   "at-<T>/, a run folder that eval.py evaluates (learning curves at equal turns)")
    g.add_argument("--scenarios", type=positive(int), default=16, help="scenarios per iteration (B)")
    g.add_argument("--k", type=positive(int), default=4,
                   help="rollouts per scenario (K); gopo needs >= 2, its preference pairs compare them")
    g.add_argument("--beta", type=positive(float), default=0.5, help="DPO temperature of the Expert loss")
    g.add_argument("--nll-coef", type=nonneg(float), default=0.1, help="lambda: weight of the winners' NLL")
    g.add_argument("--alpha", type=checked(float, 0, True, 1), default=0.5, help="R = alpha*TSE + (1-alpha)*ESNDCG")
    g.add_argument("--delta", type=positive(float), default=0.05, help="min reward gap for a preference pair")
    g.add_argument("--max-pairs", type=positive(int), default=4, help="pairs per scenario, at most")
    g.add_argument("--listwise", action="store_true", help="Plackett-Luce over the K rollouts instead of pairs")
    g.add_argument("--rollouts", default="independent", choices=["independent", "branch", "fork"],
                   help="how the K rollouts of a scenario are played: independent, K dialogues from the opening line; branch, "
                   "one dialogue, then K-1 continuations of it from one of its decisions (copies of the customer and the "
                   "contexts there), so a pair's dialogues share every decision before it and the preference falls on "
                   "the branch (docs/branching.md; gopo and gopo-noexpert); fork, one dialogue (the spine), then K-1 forks "
                   "of it, each at another decision with more than one allowed strategy, drawn uniformly, where it takes "
                   "the runner-up of the spine's own draw and plays on: each fork is paired with the spine, and they "
                   "differ first at exactly that decision (rollout.py; gopo only)")
    g.add_argument("--branch-at", default="entropy", choices=["entropy", "uniform"],
                   help="--rollouts branch: which decision to branch at: entropy, drawn in proportion to the entropy of the "
                   "Expert's SOP-masked distribution there (a forced or sure decision gives no contrast); uniform, any of "
                   "the dialogue's decisions (the flat agent always: it has no decision distribution)")
    g.add_argument("--segment", type=nonneg(int), default=0,
                   help="--rollouts branch: the loss scores this many decisions from the branch on (0: all of them, to the "
                   "end); 1 puts each preference on the branch decision alone, as SDPO scores the segment where two "
                   "dialogues part. Pairs that chose the same at every scored decision are left out")
    g.add_argument("--mix", type=checked(float, 0, True, 1), default=0.0,
                   help="--rollouts branch or fork: the share of each iteration's scenarios played with independent "
                   "rollouts instead, so that the decisions the branch or fork pairs do not contrast keep being trained")
    g.add_argument("--gopo-epochs", type=positive(int), default=2, help="gradient steps per iteration")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="Expert learning rate in GOPO")
    g.add_argument("--ref", default="rollout", choices=["rollout", "sft"],
                   help="pi_ref of the Expert's loss: rollout, the Expert that played the iteration's dialogues "
                   "(iterative DPO; the default: it did better in docs/baselines.md); sft, the frozen SFT Expert (textbook DPO). "
                   "Either way S_ref is one no-grad forward before the iteration's first step")
    g.add_argument("--agent-temperature", type=nonneg(float), default=0.7, help="CS sampling temperature in rollouts")
    g.add_argument("--max-reply-tokens", type=checked(int, 1, True, 4095), default=32,
                   help="a reply is cut after this many tokens (rollouts and CS alignment samples)")
    g.add_argument("--cs-samples", type=nonneg(int), default=16, help="(h_t, z_t) per iteration for CS alignment pairs")
    g.add_argument("--beta-cs", type=positive(float), default=0.1, help="DPO temperature of the CS alignment loss")
    g.add_argument("--lr-cs", type=positive(float), default=1e-4, help="CS Agent learning rate in GOPO")
    return p


def check_flags(args, p):
    """Conflicting flags: one line, exit 2, before anything is written."""
    tiny_flags = [f for f in ("d_model", "n_layer", "vocab_size") if getattr(args, f) != p.get_default(f)]
    if args.model != "tiny" and tiny_flags:
        die(f"--{tiny_flags[0].replace('_', '-')} only shapes the tiny model; drop it with --model {args.model}")
    lora = [f for f in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_only", "merge_lora")
            if getattr(args, f) != p.get_default(f)]
    if lora and args.model == "tiny":
        die(f"--{lora[0].replace('_', '-')} adapts a pretrained backbone; the tiny model is trained from scratch "
            "(give --model a pretrained model)")
    if lora and not args.lora_r:
        die(f"--{lora[0].replace('_', '-')} sets up LoRA: add --lora-r R")
    if args.expert_model is not None and (args.model == "tiny") != (args.expert_model == "tiny"):
        die("--expert-model and --model must both be 'tiny' or both be pretrained (the tiny models "
            "share a tokenizer trained on the logs)")
    if args.fsdp and not parallel.distributed():
        die("--fsdp shards over torchrun ranks: launch with torchrun --nproc_per_node N -- train.py --fsdp ... "
            "(N = 1 is fine)")
    if args.sft_from and args.resume:
        die("--sft-from starts a new run; --resume continues one with its own SFT checkpoints")
    if args.resume and parallel.distributed():
        die("--resume runs in one process without --fsdp; resume without torchrun")
    if args.d_model % 4:
        die(f"--d-model must be a multiple of the 4 attention heads, got {args.d_model}")
    if args.rollouts in ("branch", "fork") and args.k < 2:
        die(f"--rollouts {args.rollouts} plays one dialogue and --k - 1 others from its decisions and compares "
            f"them: --k must be >= 2, got {args.k}")
    if args.segment and args.rollouts == "independent":
        die(f"--segment {args.segment} scores decisions from a branch point: add --rollouts branch or fork "
            "(independent dialogues share no prefix, so nothing before their first difference cancels)")
    if args.mix and args.rollouts == "independent":
        die(f"--mix {args.mix} mixes independent groups into --rollouts branch or fork; with --rollouts independent "
            "every group is independent already")
    if args.keep_at and args.method != "gopo":
        die(f"--keep-at keeps GOPO's models along the way; --method {args.method} has none to keep")
    if args.rollouts == "fork" and args.listwise:
        die("--listwise ranks a scenario's K rollouts from one shared branch point; --rollouts fork pairs each fork "
            "with the spine at its own decision: drop --listwise")
    if args.method == "gopo" and args.k < 2:   # with one rollout per scenario build_pairs finds no pair: nothing learnt
        die(f"--k must be >= 2 for --method gopo: a preference pair compares two rollouts of one scenario, got {args.k}")
    if args.data != "sim" and not args.data_path:
        die(f"--data {args.data} needs --data-path (docs/real-data.md says where to get it)")
    if args.data != "sim" and (args.world != "shop" or args.horizon or args.paraphrases):
        die(f"--world, --horizon and --paraphrases pick a built-in world; --data {args.data} brings its own")
    if args.world == "shop" and (args.horizon or args.paraphrases):
        die("--horizon and --paraphrases are knobs of the desk world: add --world desk")
    if args.data == "sim" and args.data_path:
        die("--data-path is for --data mgshop, multiwoz or records; the built-in worlds read logs from --logs")
    if args.data != "sim" and (args.logs or args.n_logs != p.get_default("n_logs")):
        die(f"--logs and --n-logs are for the built-in worlds; --data {args.data} trains on its own train split")

def main(argv=None):
    p = parser(checkpoint.methods_of("train"))
    run = open_run(p, *parse(p, argv))
    load_logs(run)
    models = run_sft(run, build_models(run))
    if run.args.method == "gopo":   # 4. GOPO (--method sft: the SFT stages only); --resume: from the last state
        models, opts, progress = checkpoint.load_state(run.path("state"), models, run.args, run.device)
        models["expert_sft"] = (lm.reference(models["expert"][0], run.path("expert_sft"), run.args,   # --ref sft;
                                             run.device), models["expert"][1])                           # kl_to_sft
        step = lambda scenarios, it, seed: gopo.iteration(models, opts, scenarios, run.event_values, run.world,  # noqa: E731
                                                          run.args, it, seed)
        save_state = lambda progress: checkpoint.save_state(run.path("state"), models, opts, progress)  # noqa: E731
        keep = lambda turns: checkpoint.keep_models(run.dir, f"at-{turns}", models)  # noqa: E731
        train_loop(run, step, progress, save_state, keep)
        for name in ("expert", "agent"):
            checkpoint.save_model(*models[name], run.path(name))
        for name in lora.names(run.args) if run.args.merge_lora else ():
            checkpoint.save_merged(run.path(name), run.path(f"{name}_merged"))
    save_outputs(run)

say = lambda message: parallel.is_main() and print(message)   # noqa: E731  rank 0 speaks

def parse(p, argv=None, check=None):
    """(flags, device) of parser p, checked: one line and exit 2 before anything is written.
    check(args): more checks."""
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: this machine has no CUDA GPU that torch can see (use --device cpu)")
    device = parallel.init(args.device)       # torchrun sets WORLD_SIZE; one process otherwise
    check_flags(args, p)
    if check:
        check(args)
    if not args.resume:   # a resumed run's config.json has its own
        world_defaults(args)
    tracking.check(args.report_to)
    lm.check_model(args.model)
    if getattr(args, "lora_r", None):
        check_lora(args)
    if args.sft_from:
        checkpoint.check_sft_from(args)
    lm.check_model(args.expert_model)
    return args, device

def check_lora(args):
    """--lora-r: peft installed, and --lora-targets naming linear layers of the backbone(s)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        die("--lora-r needs peft: pip install -r requirements.txt (it pins peft)")
    if args.lora_targets != "all-linear":
        for name in {args.model, args.expert_model or args.model}:
            known = lora.linear_names(name)
            bad = [t for t in args.lora_targets.split(",") if t not in known]
            if bad:
                die(f"--lora-targets: {name} has no linear layer named '{bad[0]}' (it has: {', '.join(sorted(known))})")

def world_defaults(args):
    """The defaults that depend on the data and the world (None in the parser), so that config.json
    records the values used: the desk's knobs, and the SFT budget. Returns args."""
    desk = args.data == "sim" and args.world == "desk"
    if desk:
        default = worlds.load("desk")
        args.horizon, args.paraphrases = args.horizon or default.HORIZON, args.paraphrases or default.PARAPHRASES
    args.sft_batch = args.sft_batch or (16 if args.data == "sim" else 4)
    args.agent_sft_steps = args.agent_sft_steps or args.sft_steps * (3 if desk else 1)
    args.expert_sft_lr = args.expert_sft_lr or (EXPERT_SFT_DESK[0] if desk else args.sft_lr)
    args.expert_sft_steps = args.expert_sft_steps or (EXPERT_SFT_DESK[1] if desk else args.sft_steps)
    if args.sft_window_steps is None:
        args.sft_window_steps = args.sft_steps if desk else 150
    return args

def open_run(p, args, device):
    """What the stages share: the world and user data, read before a new run folder is touched (a bad
    file loses nothing), and the folder (--resume: the killed run's, with its flags); samplers seeded."""
    run_dir, args = checkpoint.resume_run(args, p) if args.resume else (None, args)
    try:   # on --resume the run's own logs.jsonl is read later, not --logs
        world, logs, splits = worlds.load_world(args.data, args.data_path, args.world, args.horizon, args.paraphrases,
                                                None if args.resume else args.logs)
    except data.DataError as e:
        die(str(e))
    if (len(logs) if logs is not None else args.n_logs) + args.iters * args.scenarios > data.TEST_SEED_BASE:
        die(f"--n-logs + --iters x --scenarios needs more than the {data.TEST_SEED_BASE} training seeds; use fewer")
    run_dir = run_dir or checkpoint.start_run(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(parallel.cpu_threads())
    return SimpleNamespace(args=args, dir=run_dir, device=device, world=world, logs=logs, splits=splits,
                           path=lambda name: os.path.join(run_dir, name), t_start=time.time(),
                           amp=lambda: lm.autocast(device, args.bf16, fsdp=args.fsdp))   # --fsdp: FSDP2's own bf16

def load_logs(run):
    """1. The logged dialogues (training data) and the event values fitted on them; or the run's own."""
    if run.args.resume and os.path.exists(run.path("values.json")):
        run.logs = checkpoint.read_logs(run.dir, run.world)
    else:
        run.logs = run.logs or [run.world.play(run.world.make_scenario(s), run.world.behaviour_policy,
                                               seed=run.args.seed) for s in data.train_seeds(run.args.n_logs)]
        checkpoint.save_logs(run.dir, run.logs, tse.event_values(run.logs, run.world.SUCCESS_EVENTS), run.splits)
    run.event_values = checkpoint.read_values(run.path("values.json"))
    say(f"logs: {len(run.logs)} dialogues, behaviour success {tse.mean(r['success'] for r in run.logs):.3f}")

def build_models(run):
    """2. The SFT models the method starts from (checkpoint.METHODS), {name: (model, tokenizer)}: the
    run's finished SFT (--resume, --sft-from), or new ones (tiny, with a tokenizer trained on the logs)."""
    need = checkpoint.METHODS[run.args.method].sft
    models = checkpoint.load_sft(run.dir, run.args.sft_from, need, run.event_values)
    if models is None:
        models = lm.new_models(need, run.args, run.world, run.logs)
        say("models: " + ", ".join(f"{name} {lm.n_params(m) / 1e6:.2f}M" for name, (m, _) in models.items()) +
            f" parameters, vocab {len(next(iter(models.values()))[1])}")
    return models

def run_sft(run, models):
    """3. SFT, unless done: the CS Agent on the logged replies with their strategy prompts, the flat
    agent on them without, then the Expert on the logged strategies. Returns the placed models."""
    args, world = run.args, run.world
    models = {name: (lm.place(m, args, run.device), tok) for name, (m, tok) in models.items()}
    if os.path.exists(run.path("sft.json")):   # written last
        say(f"SFT: loaded from {args.sft_from or 'the run'}")
        return models
    losses = {}
    for name in sorted(models, key=("agent", "flat", "expert").index):   # the CS Agent before the Expert
        model, tok = models[name]
        if name == "expert" and args.model == "tiny" and args.expert_from_agent and "agent" in models:
            # trained from scratch, a tiny Expert never learns to read the customer (docs/baselines.md, "What we found")
            model = lm.place(lm.load(run.path("agent_sft"))[0], args, run.device)
            models[name] = (model, tok)
        with run.amp():
            losses[name] = expert_lib.sft(model, tok, run.logs, world.STRATEGIES, world.allowed, world.INSTRUCTIONS,
                                          args.expert_sft_steps, args.sft_batch, args.expert_sft_lr, args.seed,
                                          micro=args.device_batch_size) \
                if name == "expert" else \
                agent_lib.sft(model, tok, run.logs, world.INSTRUCTIONS if name == "agent" else None,   # flat: None
                              args.agent_sft_steps, args.sft_batch, args.sft_lr, args.seed,
                              window_steps=args.sft_window_steps, desc=f"SFT {name}", micro=args.device_batch_size)
        checkpoint.save_model(model, tok, run.path(f"{name}_sft"))
    if parallel.is_main():
        with open(run.path("sft.json"), "w") as f:
            json.dump({f"{name}_loss": losses[name] for name in models}, f)
    say("SFT: " + ", ".join(f"{name} loss {losses[name][-1]:.3f}" for name in models))
    return models

def train_loop(run, step, progress=None, save_state=None, keep=None):
    """5. The method's iterations, on fresh training scenarios (never the held-out ones) that every
    method shares. step(scenarios, it, seed) -> a metrics.jsonl line; progress: {"iterations_done",
    "bad_in_a_row"} of a resumed run; save_state(progress): gopo's --resume; keep(T): gopo's --keep-at.
    --turn-budget ends the loop early, at equal simulated turns for every method."""
    args, world = run.args, run.world
    start, bad_in_a_row = (progress or {}).get("iterations_done", 0), (progress or {}).get("bad_in_a_row", 0)
    kept = checkpoint.keep_metrics(run.path("metrics.jsonl"), start)   # drop lines of an iteration that did not finish
    agent_turns = kept[-1].get("agent_turns", 0) if kept else 0        # the budget spent, in simulated agent turns
    tracker = tracking.Tracker(args.report_to, run.dir, vars(args)) if parallel.is_main() else None
    from tqdm import tqdm
    for it in (bar := tqdm(range(start, args.iters), initial=start, total=args.iters, desc=args.method,
                           disable=not parallel.is_main())):
        seeds = data.train_seeds(args.scenarios, offset=len(run.logs) + it * args.scenarios)
        with run.amp():
            m = step([world.make_scenario(s) for s in seeds], it, args.seed * 100_003 + it)
        before, agent_turns = agent_turns, agent_turns + m.pop("turns_played")
        m["agent_turns"] = agent_turns
        checkpoint.append_metrics(run.path("metrics.jsonl"), m)
        if tracker:
            tracker.log(m)
        for t in args.keep_at:
            if keep and before < t <= agent_turns:
                keep(t)
        bar.set_postfix(R=f"{m['R']:.3f}", tse=f"{m['tse']:.3f}")
        bad_in_a_row = bad_in_a_row + 1 if m.get("nonfinite_steps") else 0
        if bad_in_a_row:
            bar.write(f"iteration {it}: {m['nonfinite_steps']} step(s) skipped (non-finite loss or gradient)")
        if bad_in_a_row >= args.max_nonfinite:
            where = f"The last good state is in {run.path('state')} (lower --lr or --beta, then --resume)" \
                if save_state else "Lower the learning rate and start again"
            die(f"{bad_in_a_row} iterations in a row had non-finite losses or gradients; stopped. {where}")
        if save_state and not parallel.distributed() and args.save_every and \
                ((it + 1) % args.save_every == 0 or it + 1 == args.iters):
            save_state({"iterations_done": it + 1, "bad_in_a_row": bad_in_a_row})
        if args.turn_budget and agent_turns >= args.turn_budget:
            bar.write(f"--turn-budget {args.turn_budget}: {agent_turns} agent turns after {it + 1} iterations")
            break
    if tracker:
        tracker.close()

def save_outputs(run):
    """6. curves.png and time.json (after the method's own checkpoints)."""
    if parallel.is_main():
        plots.plot_curves(run.dir)
        with open(run.path("time.json"), "w") as f:   # this process's wall time (--compare reports it)
            json.dump({"seconds": round(time.time() - run.t_start, 1)}, f)
    say(f"done in {time.time() - run.t_start:.0f}s -> {run.dir}")
    parallel.close()

if __name__ == "__main__":
    main()
