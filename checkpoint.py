"""The run folder, its one room: the methods, start, resume, config, training data, SFT checkpoints of
other runs, state, metrics, atomic saves, and the readers that eval.py and experiments/ open a
finished run with (nanochat's checkpoint manager, for this repo). Every function checks before it
writes, and writes atomically, so a bad input or a crash never leaves a run half-written.

    out/<run>/config.json     every flag (resume_run checks all of them before anything is written)
    out/<run>/env.json        where the run came from: command line, commit, package versions, device
    out/<run>/logs.jsonl      the training dialogues; values.json, the event values fitted on them
    out/<run>/state/          what --resume needs after an iteration: both models, both AdamW states
    out/<run>/*_sft/          SFT checkpoints (copied from another run by --sft-from)
    out/<run>/metrics.jsonl   one line per iteration
"""
import argparse
import importlib
import json
import os
import shutil
from typing import NamedTuple

import torch
from transformers.utils import logging as hf_logging

import cli
import data
import lm
import lora
import parallel
import worlds

die = cli.die


class Method(NamedTuple):
    """What a run of a method starts from, and what eval.py plays of it (one entry of METHODS)."""
    sft: tuple = ()        # the SFT models a run starts from (its trainer trains or copies them); () = a row only
    rows: tuple = ()       # eval.py's rows of a run: the method, then the SFT model(s) it started from
    expert: str = None     # checkpoint folders eval.py plays: the Expert (None: a flat agent, asked for no strategy)
    agent: str = None      # ... and the agent that writes the replies
    files: tuple = ()      # (file, "module:loader"): other things eval.py loads first (Memento's bank.pt)
    play: str = None       # "module:function", function(ckpt, method, scenarios, world, seed, max_reply_tokens)
    #                        -> greedy records; None: the two agents' rollout (eval.two_agents)
    trainer: str = "train"  # the command that trains it: train.py, or python -m experiments.baselines


# The one registry of methods, read by train.py (its --method choices), experiments/baselines.py (its
# own) and eval.py (the rows). Nothing changes it. Its models: expert, agent (the two agents); flat (one
# LM writing each reply from the history: the baselines' single agent; --method sft trains it too, so
# every method of a seed can start from one run). A baseline's player and loader are named by string
# and imported by eval.py only when it plays that row (`resolve`), so the top level never imports
# experiments/.
METHODS = {
    "gopo": Method(sft=("expert", "agent"), rows=("gopo", "sft"), expert="expert", agent="agent"),
    "sft": Method(sft=("expert", "agent", "flat"), rows=("sft", "sft-flat"), expert="expert_sft", agent="agent_sft"),
    "ppo": Method(sft=("flat",), rows=("ppo", "sft-flat"), agent="flat", play="experiments.flat:play_flat",
                  trainer="experiments.baselines"),
    "memento": Method(sft=("expert", "agent"), rows=("memento", "sft"), expert="expert_sft", agent="agent_sft",
                      files=(("bank.pt", "experiments.memento:CaseBank.load"),), play="experiments.memento:play_memento",
                      trainer="experiments.baselines"),
    "gopo-noexpert": Method(sft=("flat",), rows=("gopo-noexpert", "sft-flat"), agent="flat",
                            play="experiments.flat:play_flat", trainer="experiments.baselines"),
    "sft-flat": Method(agent="flat_sft", play="experiments.flat:play_flat"),   # a row of sft runs: the SFT flat agent
}
SFT_KEYS = ("seed", "data", "data_path", "world", "horizon", "paraphrases", "n_logs", "logs", "model", "expert_model", "d_model", "n_layer",
            "vocab_size", "sft_steps", "agent_sft_steps", "expert_sft_steps", "sft_batch", "sft_lr", "expert_sft_lr",
            "sft_window_steps", "expert_from_agent", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
            "lora_only")   # what an SFT result depends on


def methods_of(trainer):
    """The methods a command trains (train.py: gopo, sft; experiments.baselines: the baselines)."""
    return [m for m, v in METHODS.items() if v.sft and v.trainer == trainer]


def resolve(name):
    """"module:attr.attr" -> the object (a baseline's player or loader, imported when first needed)."""
    module, _, attrs = name.partition(":")
    obj = importlib.import_module(module)
    for a in attrs.split("."):
        obj = getattr(obj, a)
    return obj


def start_run(args):
    """New run: refuse an existing folder (unless --overwrite), write config.json (rank 0)."""
    run_dir = os.path.join(args.out, args.run or args.method)
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
            json.dump({**vars(args), "world_size": parallel.n_ranks()}, f, indent=2)
        with open(os.path.join(run_dir, "env.json"), "w") as f:
            json.dump(environment(), f, indent=2)
    parallel.barrier()
    return run_dir


STACK = ("python", "torch", "transformers", "peft", "datasets")   # the versions a run's numbers depend on


def environment():
    """What produced a run (env.json, as nanochat's report header): the command line, the git commit
    and whether the tree had uncommitted changes, the versions of STACK (None where not installed),
    the device, the CPU threads, and ATEN_CPU_CAPABILITY if set (it changes CPU kernels, so numbers)."""
    import platform
    import subprocess
    import sys
    from importlib import metadata

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    commit = git("rev-parse", "HEAD")
    device = parallel.DEVICE
    return {"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "commit": commit,
            "dirty": None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no")),
            "versions": {"python": platform.python_version(), **{p: version(p) for p in STACK[1:]}},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
            "world_size": parallel.n_ranks(), "threads": torch.get_num_threads(),
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY")}


def stack_warning(run):
    """One line if `run` was trained on another stack (env.json's versions or device) than this
    process runs on, else None; runs from before env.json: None."""
    try:
        with open(os.path.join(run, "env.json")) as f:
            then = json.load(f)
    except (OSError, ValueError):
        return None
    now = environment()
    diff = [f"{k} {then['versions'].get(k)} -> {now['versions'][k]}" for k in STACK
            if isinstance(then.get("versions"), dict) and then["versions"].get(k) != now["versions"][k]]
    if then.get("aten_cpu_capability") != now["aten_cpu_capability"]:
        diff.append(f"ATEN_CPU_CAPABILITY {then.get('aten_cpu_capability')} -> {now['aten_cpu_capability']}")
    if diff:
        return f"warning: {run} was trained on another stack ({', '.join(diff)}); its numbers may not reproduce here"
    return None

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
    saved = upgrade_config(saved)
    methods = methods_of("train")
    if saved.get("method", "gopo") not in methods:
        die(f"{run_dir} is a --method {saved['method']} run: --resume continues {' and '.join(methods)} runs only; "
            "start it again (baselines take a few minutes)")
    given = {k for k in vars(args) if k not in ("resume", "overwrite") and getattr(args, k) != p.get_default(k)}
    extended = extend_budget(saved, args, given)
    clash = [k for k in sorted(given - set(extended)) if saved.get(k) != getattr(args, k)]
    if clash:
        k = clash[0]
        die(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the run's {saved.get(k)}; "
            "resume with the run's own settings (drop the flag) or start a new run")
    check_saved_config(saved, path, p)
    if extended:   # the run's config says what it now runs to, so that it resumes again the same way
        saved.update(extended)
        with open(path + ".tmp", "w") as f:
            json.dump(saved, f, indent=2)
        os.replace(path + ".tmp", path)
    return run_dir, argparse.Namespace(**{**saved, "resume": run_dir, "overwrite": False})

def extend_budget(saved, args, given):
    """--resume RUN --turn-budget T [--keep-at ...]: carry a run that stopped at its turn budget on to a
    larger one. The resumed iterations are those of a run started with T (the state holds every
    sampler), so a learning curve grows from 1x to 2x without replaying 1x. --keep-at adds points to the
    run's own. Returns the settings that change ({} when neither flag is given)."""
    extended = {}
    if "turn_budget" in given:
        if not saved.get("turn_budget") or args.turn_budget <= saved["turn_budget"]:
            die(f"--turn-budget {args.turn_budget} with --resume must raise the run's own budget "
                f"({saved.get('turn_budget') or 'none, it runs to --iters'}); drop the flag to resume as it was")
        extended["turn_budget"] = args.turn_budget
    if "keep_at" in given:
        extended["keep_at"] = sorted(set(saved.get("keep_at", [])) | set(args.keep_at))
    return extended

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
        elif isinstance(a.default, list):   # --keep-at
            ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
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
            theirs = upgrade_config(json.load(f))
    except (OSError, ValueError, TypeError):
        die(f"--sft-from {src}: not a train.py run (no readable config.json)")
    clash = [k for k in SFT_KEYS if theirs.get(k) != getattr(args, k)]
    if clash:
        k = clash[0]
        die(f"--sft-from {src}: its --{k.replace('_', '-')} is {theirs.get(k)}, this run's is "
            f"{getattr(args, k)}; the SFT checkpoints must come from the same seed, data and SFT settings")
    missing = [f"{n}_sft" for n in METHODS[args.method].sft if not os.path.isdir(os.path.join(src, f"{n}_sft"))]
    if missing or not os.path.isfile(os.path.join(src, "sft.json")):
        die(f"--sft-from {src}: no {(missing or ['sft.json'])[0]} (an unfinished run, or one whose --method "
            f"trained other models: --method sft trains all three)")

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

def save_state(folder, models, opts, progress):
    """Everything --resume needs after an iteration, swapped in atomically as one folder: both models
    {"expert", "agent": (model, tokenizer)}, their AdamW states, and progress {"iterations_done",
    "bad_in_a_row"}."""
    def write(tmp):
        for name in ("expert", "agent"):
            model, tok = models[name]
            save_pretrained(model, os.path.join(tmp, name))
            tok.save_pretrained(os.path.join(tmp, name))
        torch.save({"opt_e": opts["expert"].state_dict(), "opt_a": opts["agent"].state_dict(), **progress},
                   os.path.join(tmp, "trainer.pt"))
    atomic_dir(folder, write)

def load_state(folder, models, args, device):
    """GOPO's (models, opts, progress): on --resume, what save_state wrote in `folder` (both models
    placed before their AdamW states are rebuilt); else the placed SFT `models` {"expert", "agent":
    (model, tokenizer)} with fresh AdamW states (lr: args) and no progress."""
    models = {name: models[name] for name in ("expert", "agent")}
    progress = {"iterations_done": 0, "bad_in_a_row": 0}
    trainer = {}
    if args.resume and os.path.exists(folder):   # the last completed iteration
        for name in ("expert", "agent"):
            model, tok = lm.load(os.path.join(folder, name))
            models[name] = (lm.place(model, args, device), tok)
        trainer = torch.load(os.path.join(folder, "trainer.pt"))
        progress = {k: trainer[k] for k in progress}
    opts = {"expert": torch.optim.AdamW(lm.trainable(models["expert"][0]), lr=args.lr, weight_decay=0.0),
            "agent": torch.optim.AdamW(lm.trainable(models["agent"][0]), lr=args.lr_cs, weight_decay=0.0)}
    if trainer:
        opts["expert"].load_state_dict(trainer["opt_e"])
        opts["agent"].load_state_dict(trainer["opt_a"])
    return models, opts, progress


def read_logs(run_dir, world, reader="--resume"):
    """The run's own training dialogues (logs.jsonl), for `reader` (--resume, --planner-shots N), or a
    one-line error that names it."""
    try:
        return data.read_jsonl(os.path.join(run_dir, "logs.jsonl"), world.STRATEGIES, world.EVENTS)
    except data.DataError as e:
        die(f"{reader} reads the run's logged training dialogues: {e}")

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
        recover(os.path.join(run_dir, name))
    if sft_from and not os.path.exists(os.path.join(run_dir, "sft.json")) and parallel.is_main():
        copy_sft(sft_from, run_dir, need, values)
    parallel.barrier()
    if not os.path.exists(os.path.join(run_dir, "sft.json")):
        return None
    return {name: lm.load(os.path.join(run_dir, f"{name}_sft")) for name in need}

def keep_metrics(path, n):
    """Keep the first n lines of metrics.jsonl (those of checkpointed iterations), rank 0; returns them,
    parsed (every rank)."""
    lines = open(path).read().splitlines()[:n] if os.path.exists(path) else []
    parallel.barrier()
    if parallel.is_main():
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines]

def append_metrics(path, m):
    """One iteration's line of metrics.jsonl; rank 0."""
    if parallel.is_main():
        with open(path, "a") as f:
            f.write(json.dumps(m) + "\n")


def keep_models(run_dir, name, models):
    """--keep-at: run_dir/name/, a run folder of the models as they are now, that eval.py evaluates like
    the run itself: its expert/ and agent/, and copies of the run's config, event values, SFT models
    (the rows it is compared with) and training data (a prompted planner's --planner-shots read it)."""
    folder = os.path.join(run_dir, name)
    for n in ("expert", "agent"):
        save_model(*models[n], os.path.join(folder, n))
    if parallel.is_main():
        for f in ("config.json", "values.json", "sft.json", "logs.jsonl", "split.json"):
            if f != "split.json" or os.path.exists(os.path.join(run_dir, f)):   # split.json: real data only
                shutil.copy(os.path.join(run_dir, f), os.path.join(folder, f))
        for d in ("expert_sft", "agent_sft"):
            shutil.copytree(os.path.join(run_dir, d), os.path.join(folder, d), dirs_exist_ok=True)
    parallel.barrier()


def save_model(model, tokenizer, path):
    """A folder that `AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)` loads, written atomically;
    a LoRA model's holds its adapters and strategy-token rows, which lm.load puts over their base.
    Distributed: every rank joins the gather of the full state dict, rank 0 writes."""
    state = parallel.full_state_dict(model) if parallel.FSDP else None
    if parallel.is_main():
        atomic_dir(path, lambda tmp: (save_pretrained(model, tmp, state), tokenizer.save_pretrained(tmp)))
    parallel.barrier()


def save_merged(adapters, path):
    """--merge-lora: the adapter folder `adapters` merged into its base (fp32), a whole model that plain
    `from_pretrained` loads; by rank 0, in one process from the saved folder (FSDP's shards need no
    merging, and the trained model is left as it is)."""
    if parallel.is_main():
        model, tokenizer = lm.load(adapters)
        merged = model.merge_and_unload()
        atomic_dir(path, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    parallel.barrier()


def save_pretrained(model, folder, state=None):
    """model.save_pretrained; a LoRA model: its trained adapter only, not the frozen SFT one that
    lm.reference loads beside it."""
    if lora.is_peft(model):   # FSDP: from the gathered full state dict
        # save_embedding_layers=False: peft would otherwise save the whole resized embedding (and output
        # layer), 240 MB for SmolLM2, where the strategy tokens' rows, in the adapter, are all that changed
        model.save_pretrained(folder, selected_adapters=["default"], save_embedding_layers=False,
                              **({"state_dict": state} if state else {}))
    else:
        model.save_pretrained(folder, state_dict=state)


def atomic_dir(path, write):
    """Write a folder so that a crash at any moment leaves either the old folder or the new one.

    `write(tmp)` fills a temporary folder; then the old folder moves aside, the new one takes its
    name and the old one is deleted. A crash between the two renames leaves `path.old`, which
    `recover` puts back.
    """
    tmp, old = path + ".tmp", path + ".old"
    recover(path)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path):
    """Undo a save that died between its two renames; drop half-written temporaries."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.replace(path + ".old", path)
    shutil.rmtree(path + ".old", ignore_errors=True)




# ----------------------------------------------------------------------------- reading a finished run
def check_folder(run):
    if not os.path.exists(run):
        die(f"{run} does not exist (give the run folder train.py wrote, e.g. out/gopo)")
    if not os.path.isdir(run):
        die(f"{run} is not a folder (give the run folder train.py wrote, e.g. out/gopo)")
    return run


def read_config(run):
    """The config.json of the run folder `run`, in today's names: runs from before --method and --data
    sim said --algo and --data shop. {} if there is none (runs from before --data existed: the
    built-in shop)."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return upgrade_config(config) if isinstance(config, dict) else {}


# Flags added after runs were already on disk, with the defaults that do what the code did before them
# (whole-batch updates, no LoRA, no tracker): a run made earlier resumes and evaluates as it was made.
ADDED_SETTINGS = {"device_batch_size": None, "lora_r": None, "lora_alpha": None, "lora_dropout": 0.0,
                  "lora_targets": "all-linear", "lora_only": None, "merge_lora": False, "report_to": "none"}


def upgrade_config(config):
    """Old names -> today's: "algo" -> "method", --data "shop" -> "sim" (the deprecated spellings); the
    settings a run made before ADDED_SETTINGS existed did not record."""
    config = {**ADDED_SETTINGS, **config}
    if "algo" in config:
        config.setdefault("method", config.pop("algo"))
    if config.get("data") == "shop":
        config["data"] = "sim"
    return config


def world_of(config, run):
    """The built-in world a run trained in (its config's --world and knobs; shop before --world existed)."""
    try:
        return worlds.load(config.get("world", "shop"), config.get("horizon"), config.get("paraphrases"))
    except ValueError as e:
        die(f"{run}/config.json: {e}")


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


def load_checkpoint(folder):
    """(model, tokenizer) of a checkpoint folder; a folder that does not load is a one-line error."""
    try:
        return lm.load(folder)
    except Exception as e:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, SafetensorError, ...
        why = (str(e).strip().splitlines() or [""])[0][:200]
        die(f"{folder} holds no loadable model ({type(e).__name__}: {why}); "
            "re-run train.py or check the path")


def needed_files(rows):
    files = [c for m in rows for c in (METHODS[m].expert, METHODS[m].agent) if c]
    return sorted(set(files), key=files.index)


def load_run(run, rows, device="cpu"):
    """Every checkpoint (and other file, e.g. Memento's case bank) the rows need, loaded before any
    rollout, so a broken one costs no time and overwrites no report: {name: (model on `device`,
    tokenizer)}, plus {file: what its method's loader returned}."""
    extra = {f: loader for m in rows for f, loader in METHODS[m].files}
    for need in ("values.json", *needed_files(rows), *extra):
        if not os.path.exists(os.path.join(run, need)):
            die(f"{run} has no {need}: not a finished train.py run (train first, or check the path)")
    hf_logging.disable_progress_bar()
    ckpt = {name: load_checkpoint(os.path.join(run, name)) for name in needed_files(rows)}
    ckpt = {name: (model.to(device), tok) for name, (model, tok) in ckpt.items()}
    for f, loader in extra.items():
        try:
            ckpt[f] = resolve(loader)(os.path.join(run, f))
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds
            die(f"{run}/{f} does not load ({type(e).__name__}); train the run again")
    return ckpt
