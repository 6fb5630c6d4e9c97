"""The run folder and the models in it: the methods, start, resume, training data, SFT checkpoints
of other runs, state (nanochat's checkpoint manager, for this repo). Every function checks before it
writes, and writes atomically, so a bad input or a crash never leaves a run half-written.

    out/<run>/config.json     every flag (resume_run checks all of them before anything is written)
    out/<run>/logs.jsonl      the training dialogues; values.json, the event values fitted on them
    out/<run>/state/          what --resume needs after an iteration: both models, both AdamW states
    out/<run>/*_sft/          SFT checkpoints (copied from another run by --sft-from)
"""
import argparse
import json
import os
import shutil
from typing import Callable, NamedTuple

import torch

import cli
import data
import lm
import parallel

die = cli.die


class Method(NamedTuple):
    """What a run of a method starts from, and what eval.py plays of it (one entry of METHODS)."""
    sft: tuple = ()        # the SFT models a run starts from (train.py trains or copies them); () = a row only
    rows: tuple = ()       # eval.py's rows of a run: the method, then the SFT model(s) it started from
    expert: str = None     # checkpoint folders eval.py plays: the Expert (None: a flat agent, asked for no strategy)
    agent: str = None      # ... and the agent that writes the replies
    files: tuple = ()      # (file, load(path)): other things eval.py loads first (Memento's bank.pt)
    play: Callable = None  # play(ckpt, method, scenarios, world, seed, max_reply_tokens) -> greedy records;
    #                        None: the two agents' rollout (rollout.py)


# The one registry of methods: train.py's --algo choices (those with SFT models), eval.py's rows. Its
# models: expert, agent (the two agents); flat (one LM writing each reply from the history: the
# baselines' single agent; --algo sft trains it too, so every method of a seed can start from one run).
# experiments/baselines.py adds its methods (ppo, memento, gopo-noexpert, the sft-flat row); nothing
# here imports it.
METHODS = {
    "gopo": Method(sft=("expert", "agent"), rows=("gopo", "sft"), expert="expert", agent="agent"),
    "sft": Method(sft=("expert", "agent", "flat"), rows=("sft",), expert="expert_sft", agent="agent_sft"),
}
SFT_KEYS = ("seed", "data", "data_path", "world", "horizon", "paraphrases", "n_logs", "logs", "model", "expert_model", "d_model", "n_layer",
            "vocab_size", "sft_steps", "agent_sft_steps", "expert_sft_steps", "sft_batch", "sft_lr", "expert_sft_lr",
            "sft_window_steps", "expert_from_agent")   # what an SFT result depends on


def start_run(args):
    """New run: refuse an existing folder (unless --overwrite), write config.json (rank 0)."""
    run_dir = os.path.join(args.out, args.run or args.algo)
    if os.path.exists(run_dir) and not args.overwrite:
        die(f"{run_dir} already exists (holds another run); pass --overwrite, --resume {run_dir} "
            "or choose --run NAME")
    parallel.barrier()   # every rank has looked before rank 0 touches anything
    if parallel.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            os.makedirs(run_dir)
        except OSError as e:
            die(f"cannot create {run_dir}: {e.strerror}")
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**vars(args), "world_size": parallel.world()}, f, indent=2)
    parallel.barrier()
    return run_dir

def resume_run(args, p):
    """--resume RUN: the run's own config.json wins; flags given with it must agree with it."""
    run_dir = args.resume
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        die(f"{run_dir} is not a train.py run (no config.json); check the path or start a new run")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is unreadable or not JSON ({e}); it is not a run train.py can resume")
    if not isinstance(saved, dict):
        die(f"{path} is not a JSON object; it is not a run train.py can resume")
    algos = next(a.choices for a in p._actions if a.dest == "algo")   # the methods this script trains
    if saved.get("algo", "gopo") not in algos:
        die(f"{run_dir} is an --algo {saved['algo']} run: --resume continues {' and '.join(algos)} runs only; "
            "start it again (baselines take a few minutes)")
    given = {k for k in vars(args) if k not in ("resume", "overwrite") and getattr(args, k) != p.get_default(k)}
    clash = [k for k in sorted(given) if saved.get(k) != getattr(args, k)]
    if clash:
        k = clash[0]
        die(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the run's {saved.get(k)}; "
            "resume with the run's own settings (drop the flag) or start a new run")
    check_saved_config(saved, path, p)
    return run_dir, argparse.Namespace(**{**saved, "resume": run_dir, "overwrite": False})

def check_saved_config(saved, path, p):
    """Every flag of a run must be in its config.json, and each value must be one its flag accepts
    (type, range, choices): a folder that is not a run, or a config edited into nonsense, is refused
    here, before anything is written into the folder."""
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "resume", "overwrite")}
    unknown = sorted(set(saved) - set(actions) - {"resume", "overwrite", "world_size"})
    missing = sorted(set(actions) - set(saved))
    if unknown or missing:
        what = f"unknown setting '{unknown[0]}'" if unknown else f"no '{missing[0]}' setting"
        die(f"{path}: {what}; it is not the config of a run this train.py can resume")
    for k, a in actions.items():
        v, flag = saved[k], "--" + k.replace("_", "-")
        if v is None and a.default is None and k != "sft_batch":   # sft_batch is filled in when a run starts
            continue
        if isinstance(a.default, bool):
            ok = isinstance(v, bool)
        else:
            try:
                ok = not isinstance(v, (bool, dict, list)) and (a.type or str)(str(v)) == v \
                    and (a.choices is None or v in a.choices)
            except (ValueError, argparse.ArgumentTypeError):
                ok = False
        if not ok:
            die(f"{path}: {flag} {json.dumps(v)} is not a value {flag} accepts; it is not a run this train.py can resume")

def check_sft_from(args):
    """--sft-from RUN: a finished run whose SFT settings are this run's, holding the checkpoints needed."""
    src = args.sft_from
    try:
        with open(os.path.join(src, "config.json")) as f:
            theirs = json.load(f)
    except (OSError, ValueError):
        die(f"--sft-from {src}: not a train.py run (no readable config.json)")
    clash = [k for k in SFT_KEYS if theirs.get(k) != getattr(args, k)]
    if clash:
        k = clash[0]
        die(f"--sft-from {src}: its --{k.replace('_', '-')} is {theirs.get(k)}, this run's is "
            f"{getattr(args, k)}; the SFT checkpoints must come from the same seed, data and SFT settings")
    missing = [f"{n}_sft" for n in METHODS[args.algo].sft if not os.path.isdir(os.path.join(src, f"{n}_sft"))]
    if missing or not os.path.isfile(os.path.join(src, "sft.json")):
        die(f"--sft-from {src}: no {(missing or ['sft.json'])[0]} (an unfinished run, or one whose --algo "
            f"trained other models: --algo sft trains all three)")

def copy_sft(src, run_dir, need, values):
    """The SFT checkpoints and loss curves of another run, after checking its logs gave the same values."""
    with open(os.path.join(src, "values.json")) as f:
        if json.load(f) != values:
            die(f"--sft-from {src}: its event values differ from this run's (different training logs)")
    for name in need:
        shutil.copytree(os.path.join(src, f"{name}_sft"), os.path.join(run_dir, f"{name}_sft"))
    with open(os.path.join(src, "sft.json")) as f:
        losses = json.load(f)
    with open(os.path.join(run_dir, "sft.json"), "w") as f:
        json.dump({f"{n}_loss": losses[f"{n}_loss"] for n in need}, f)

def save_state(folder, expert_model, agent_model, tok_e, tok_a, opt_e, opt_a, iterations_done, bad_in_a_row):
    """Everything --resume needs after an iteration, swapped in atomically as one folder."""
    def write(tmp):
        expert_model.save_pretrained(os.path.join(tmp, "expert"))
        agent_model.save_pretrained(os.path.join(tmp, "agent"))
        tok_e.save_pretrained(os.path.join(tmp, "expert"))
        tok_a.save_pretrained(os.path.join(tmp, "agent"))
        torch.save({"opt_e": opt_e.state_dict(), "opt_a": opt_a.state_dict(),
                    "iterations_done": iterations_done, "bad_in_a_row": bad_in_a_row},
                   os.path.join(tmp, "trainer.pt"))
    lm.atomic_dir(folder, write)

def load_state(folder, models, args, device):
    """GOPO's (expert, agent, tok_e, tok_a, opt_e, opt_a, iterations_done, bad_in_a_row): on --resume,
    what save_state wrote in `folder` (both models placed before their AdamW states are rebuilt);
    else the placed SFT `models` {name: (model, tokenizer)} with fresh AdamW states (lr: args)."""
    (expert_model, tok_e), (agent_model, tok_a) = models["expert"], models["agent"]
    trainer = {"iterations_done": 0, "bad_in_a_row": 0}
    if args.resume and os.path.exists(folder):   # the last completed iteration
        (expert_model, tok_e), (agent_model, tok_a) = (lm.load(os.path.join(folder, n)) for n in ("expert", "agent"))
        expert_model, agent_model = place(expert_model, args, device), place(agent_model, args, device)
        trainer = torch.load(os.path.join(folder, "trainer.pt"))
    opt_e = torch.optim.AdamW(expert_model.parameters(), lr=args.lr, weight_decay=0.0)
    opt_a = torch.optim.AdamW(agent_model.parameters(), lr=args.lr_cs, weight_decay=0.0)
    if "opt_e" in trainer:
        opt_e.load_state_dict(trainer["opt_e"])
        opt_a.load_state_dict(trainer["opt_a"])
    return expert_model, agent_model, tok_e, tok_a, opt_e, opt_a, trainer["iterations_done"], trainer["bad_in_a_row"]

def read_logs(run_dir, world):
    """The run's own training dialogues (logs.jsonl), for --resume."""
    try:
        return data.read_jsonl(os.path.join(run_dir, "logs.jsonl"), world.STRATEGIES, world.EVENTS)
    except data.DataError as e:
        die(f"cannot resume: {e}")

def save_logs(run_dir, logs, values, splits=None):
    """The training data of a run, written by rank 0: logs.jsonl, values.json (the event values; last
    and atomic: --resume reads the logs back once it exists) and a real dataset's split.json (ids)."""
    path = lambda name: os.path.join(run_dir, name)
    if parallel.is_main():
        if splits is not None:
            with open(path("split.json"), "w") as f:
                json.dump({k: [r["id"] for r in v] for k, v in splits.items()}, f, indent=1)
        data.write_jsonl(logs, path("logs.jsonl"))
        with open(path("values.json") + ".tmp", "w") as f:
            json.dump(values, f, indent=2)
        os.replace(path("values.json") + ".tmp", path("values.json"))
    parallel.barrier()

def load_sft(run_dir, sft_from, need, values):
    """The run's finished SFT models {name: (model, tokenizer)} (sft.json is written last), copied
    first from --sft-from (rank 0); None if SFT has not finished. Cleans up a crash during a save."""
    for name in ("expert_sft", "agent_sft", "flat_sft", "state"):
        lm.recover(os.path.join(run_dir, name))
    if sft_from and not os.path.exists(os.path.join(run_dir, "sft.json")) and parallel.is_main():
        copy_sft(sft_from, run_dir, need, values)
    parallel.barrier()
    if not os.path.exists(os.path.join(run_dir, "sft.json")):
        return None
    return {name: lm.load(os.path.join(run_dir, f"{name}_sft")) for name in need}

def new_models(need, args, world, logs):
    """{name: (model, tokenizer)} for the models in `need` (expert, agent, flat), before SFT: tiny ones
    (--d-model, --n-layer) sharing a tokenizer trained on the logs, or the pretrained backbones."""
    if args.model != "tiny":
        return {name: load_backbone(args.expert_model or args.model if name == "expert" else args.model,
                                    world.STRATEGIES) for name in need}
    tok = lm.train_tokenizer([t["text"] for r in logs for t in r["turns"]] + list(world.INSTRUCTIONS.values()),
                             world.STRATEGIES, args.vocab_size)
    max_len = 1024 if args.world == "shop" and args.data == "shop" else 4096   # desk, real dialogues: ~2k tokens
    models = {}
    for name in need:   # each model its own init seed, the same whichever others are built
        models[name] = (lm.build_tiny_model(tok, args.d_model, args.n_layer, max_len=max_len,
                                            seed=args.seed + {"expert": 0, "agent": 1, "flat": 2}[name]), tok)
        lm.add_strategy_tokens(models[name][0], tok, world.STRATEGIES)
    return models

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

def place(model, args, device):
    """Move a model to the device; under torchrun --fsdp, shard it (FSDP2); --grad-ckpt either way."""
    model.to(device)
    if args.grad_ckpt:          # on the blocks before sharding them, so FSDP wraps checkpointed blocks
        lm.activation_checkpointing(model)
    return parallel.shard(model, bf16=args.bf16) if args.fsdp else model

def frozen(folder, args, device):
    """A model that is only read, placed like the trained ones: the SFT Expert (pi_ref with --ref sft,
    and the reference of the kl_to_sft metric). It costs one more Expert's weights (docs/scaling.md)."""
    return place(lm.load(folder)[0].requires_grad_(False).eval(), args, device)

def keep_metrics(path, n):
    """Keep the first n lines of metrics.jsonl (those of checkpointed iterations); rank 0."""
    if parallel.is_main():
        lines = open(path).read().splitlines()[:n] if os.path.exists(path) else []
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))

def append_metrics(path, m):
    """One iteration's line of metrics.jsonl; rank 0."""
    if parallel.is_main():
        with open(path, "a") as f:
            f.write(json.dumps(m) + "\n")
