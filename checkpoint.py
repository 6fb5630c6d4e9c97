"""The run folder: start, resume, state and SFT checkpoints of other runs (nanochat's checkpoint
manager, for this repo). Every function checks before it writes, and writes atomically, so a bad
input or a crash never leaves a run half-written.

    out/<run>/config.json     every flag (resume_run checks all of them before anything is written)
    out/<run>/state/          what --resume needs after an iteration: both models, both AdamW states
    out/<run>/*_sft/          SFT checkpoints (copied from another run by --sft-from)
"""
import argparse
import json
import os
import shutil

import torch

import cli
import lm
import parallel

die = cli.die

SFT_MODELS = {  # the SFT checkpoints each method starts from (flat: the single-agent model of PPO and the ablation)
    "gopo": ("expert", "agent"), "memento": ("expert", "agent"), "sft": ("expert", "agent", "flat"),
    "ppo": ("flat",), "gopo-noexpert": ("flat",)}
SFT_KEYS = ("seed", "data", "data_path", "world", "horizon", "paraphrases", "n_logs", "logs", "model", "expert_model", "d_model", "n_layer",
            "vocab_size", "sft_steps", "sft_batch", "sft_lr", "sft_window_steps", "expert_from_agent")   # what an SFT result depends on


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
    if saved.get("algo", "gopo") not in ("gopo", "sft"):
        die(f"{run_dir} is an --algo {saved['algo']} run: --resume continues gopo and sft runs only; "
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
    missing = [f"{n}_sft" for n in SFT_MODELS[args.algo] if not os.path.isdir(os.path.join(src, f"{n}_sft"))]
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

def keep_metrics(path, n):
    """Keep the first n lines of metrics.jsonl (those of checkpointed iterations)."""
    lines = open(path).read().splitlines()[:n] if os.path.exists(path) else []
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
