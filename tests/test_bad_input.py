"""A catalogue of bad input to the CLIs. Each case must end with exit status 2 and exactly one line on
stderr, "train.py: error: ...", "eval.py: error: ..." or "baselines.py: error: ..." (python -m
experiments.baselines, training or eval), that names the problem; never a traceback;
and it must leave existing output alone (a run folder keeps its files, bytes and mtimes; a fresh
--out folder stays empty).

Speed: a cold `python train.py ...` spends ~4 s of CPU importing torch/transformers, and
this catalogue has ~50 cases. So one helper process pays the imports once, then forks a child per
case that runs the script as `__main__` with its own argv, stdout and stderr (an uncaught exception
prints its traceback and exits 1, as the interpreter does). A few cases also run cold, as real
`python X.py` subprocesses, and must give the same result, which keeps the harness honest. Set
GOPO_COLD_CLI=1 to run every case cold (slow: about two minutes on 2 cores).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch

import checkpoint
from worlds import shop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASE_TIMEOUT = 120   # a case that is wrongly accepted starts a (tiny) training run; it must end
COLD = os.environ.get("GOPO_COLD_CLI") == "1"
COLD_CHECKS = ("logs_malformed", "eval_values_malformed", "ppo_greedy_rollouts")   # also run cold, compared with the fork
BASELINES = "experiments/baselines.py"   # python -m experiments.baselines; the fork runs the file

# the smallest run, added to train.py cases so that a wrongly accepted one finishes in seconds
TINY_RUN = ["--n-logs", "5", "--sft-steps", "1", "--sft-window-steps", "0", "--iters", "1", "--scenarios", "1",
            "--k", "2", "--d-model", "16", "--n-layer", "1", "--vocab-size", "300", "--cs-samples", "0"]

FORK_SERVER = r'''
import json, os, runpy, sys, time, traceback
root, jobs_path, results_path = sys.argv[1:4]
os.chdir(root)
sys.path.insert(0, root)
import torch, transformers  # noqa: F401  the heavy imports every CLI does, paid once here
import agent, data, expert, gopo, lm, rollout, tse, worlds.shop  # noqa: F401  and the repo modules they import
jobs = json.load(open(jobs_path))
running = {}
for name, job in jobs.items():
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child is the CLI process
        code = 1
        try:
            os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = [job["script"], *job["args"]]
            try:
                runpy.run_path(job["script"], run_name="__main__")
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
        finally:
            os._exit(code)
    running[pid] = (name, time.time())
results = {}
while running:
    for pid, (name, t0) in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            results[name] = os.waitstatus_to_exitcode(status)
            del running[pid]
        elif time.time() - t0 > float(sys.argv[4]):
            os.kill(pid, 9)
    time.sleep(0.02)
json.dump(results, open(results_path, "w"))
'''


def run_cold(script, args, env):
    cmd = [sys.executable, "-m", "experiments.baselines"] if script == BASELINES else [sys.executable, script]
    p = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT)
    return p.returncode, p.stdout, p.stderr


def run_forked(jobs, env, work):
    """{name: (script, args)} -> {name: (exit status, stdout, stderr)}, one forked child per case."""
    spec = {name: {"script": script, "args": list(args), "stdout": str(work / f"{name}.out"),
                   "stderr": str(work / f"{name}.err")} for name, (script, args) in jobs.items()}
    (work / "jobs.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-c", FORK_SERVER, ROOT, str(work / "jobs.json"),
                        str(work / "results.json"), str(CASE_TIMEOUT)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT + 120)
    assert p.returncode == 0, f"the fork server failed:\n{p.stderr[-3000:]}"
    codes = json.loads((work / "results.json").read_text())
    return {name: (codes[name], (work / f"{name}.out").read_text(errors="replace"),
                   (work / f"{name}.err").read_text(errors="replace")) for name in jobs}


# ----------------------------------------------------------------------------- the catalogue
@dataclass
class Case:
    script: str                 # "train.py" | "eval.py" | BASELINES
    args: list
    needles: list               # substrings the error line must contain
    keep: str = None            # a folder that must be left exactly as it was
    empty: str = None           # a folder that must stay empty
    needs: str = None           # a train.py flag the case needs ("--resume"): `train.py --help` must list it
    snapshot: dict = field(default=None, repr=False)


def snapshot(folder):
    """{relative path: (bytes or None for a folder, mtime_ns)} of everything under folder."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            snap[os.path.relpath(p, folder) + "/"] = (None, os.stat(p).st_mtime_ns)
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, folder)] = (fh.read(), os.stat(p).st_mtime_ns)
    return snap


def good_record(seed=0):
    return shop.play(shop.make_scenario(seed), shop.behaviour_policy)


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def with_turn(rec, who, **changes):
    """A copy of rec whose first turn of role `who` has `changes`."""
    rec = json.loads(json.dumps(rec))
    turn = next(t for t in rec["turns"] if t["role"] == who)
    turn.update(changes)
    return rec


def with_event(rec, event):
    """A copy of rec whose first customer reaction (the turn after the first agent turn) has `event`."""
    rec = json.loads(json.dumps(rec))
    next(t for t in rec["turns"][1:] if t["role"] == "customer")["event"] = event
    return rec


def without(rec, key):
    rec = dict(rec)
    del rec[key]
    return rec


def build_cases(tmp, checkpoint):
    """name -> Case. `tmp` is an empty folder; `checkpoint` a folder lm.load can load."""
    ok = good_record(0)
    logs_dir = tmp / "logs"
    logs_dir.mkdir()
    log_files = {   # name -> (content, needles)
        "malformed": (jsonl(ok, ok, '{"id": "x", "turns": [', ok), ["line 3", "malformed JSON"]),
        "missing_field": (jsonl(ok, without(good_record(1), "success")), ["line 2", "'success'"]),
        "unknown_strategy": (jsonl(with_turn(ok, "agent", strategy="tap_dance")), ["'tap_dance'", "strategy"]),
        "unknown_event": (jsonl(ok, with_event(ok, "shrug")), ["line 2", "'shrug'", "event"]),
        "empty": ("", ["no records"]),
        "blank_lines": ("\n  \n\t\n", ["no records"]),
        "list_line": (jsonl(ok, "[1, 2, 3]"), ["line 2", "JSON object", "list"]),
        "null_line": (jsonl("null"), ["line 1", "JSON object"]),
        "role_bot": (jsonl(with_turn(ok, "agent", role="bot")), ["'bot'", "role"]),
        "turn_not_object": (jsonl({**ok, "turns": ["hello"]}), ["turns[0]", "object"]),
        "success_not_bool": (jsonl({**ok, "success": "yes"}), ["'success'", "bool"]),
        "text_not_string": (jsonl(with_turn(ok, "agent", text=42)), ["turns[1].text", "string"]),
        "deep_nesting": (jsonl(ok, "[" * 100_000 + "]" * 100_000), ["line 2", "malformed JSON"]),
        "huge_int": (jsonl('{"id": ' + "9" * 5000 + "}"), ["line 1", "malformed JSON"]),
    }
    cases = {}
    for name, (content, needles) in log_files.items():
        path = logs_dir / f"{name}.jsonl"
        path.write_text(content)
        cases[f"logs_{name}"] = Case("train.py", ["--logs", str(path)], [str(path), *needles])
    (logs_dir / "latin1.jsonl").write_bytes(jsonl(ok).encode() + b'{"id": "caf\xe9"}\n')
    cases["logs_not_utf8"] = Case("train.py", ["--logs", str(logs_dir / "latin1.jsonl")], ["line 2", "UTF-8"])
    cases["logs_missing_file"] = Case("train.py", ["--logs", str(logs_dir / "nope.jsonl")],
                                      ["nope.jsonl", "no such file"])
    cases["logs_directory"] = Case("train.py", ["--logs", str(logs_dir)], [str(logs_dir), "directory"])
    # (an unreadable file needs chmod 000, which root ignores; a path through a file stands in for it)
    cases["logs_parent_is_file"] = Case("train.py", ["--logs", str(logs_dir / "empty.jsonl" / "x.jsonl")],
                                        ["x.jsonl", "no such file"])

    # ---- bad flag values (argparse)
    for name, args, needles in [
        ("algo", ["--algo", "ppo_max"], ["--algo", "ppo_max"]),
        ("model", ["--model", "gpt2-xl"], ["--model", "gpt2-xl"]),
        ("k0", ["--k", "0"], ["--k", "0"]),
        ("iters_neg", ["--iters", "-1"], ["--iters", "-1"]),
        ("scenarios_abc", ["--scenarios", "abc"], ["--scenarios", "abc"]),
        ("alpha_1_5", ["--alpha", "1.5"], ["--alpha", "1.5"]),
        ("sft_batch0", ["--sft-batch", "0"], ["--sft-batch", "0"]),
        ("seed_float", ["--seed", "1.5"], ["--seed", "1.5"]),
        ("unknown_flag", ["--frobnicate", "3"], ["--frobnicate"]),
    ]:
        cases[name] = Case("train.py", args, needles)
    cases["k1"] = Case("train.py", ["--k", "1"], ["--k", ">= 2", "pair"])   # a valid int, but GOPO forms no pair
    cases["rollouts_nonsense"] = Case("train.py", ["--rollouts", "nonsense"], ["--rollouts", "nonsense"])
    cases["branch_k1"] = Case("train.py", ["--rollouts", "branch", "--k", "1"], ["--rollouts branch", "--k", ">= 2"])
    cases["segment_without_branch"] = Case("train.py", ["--segment", "1"], ["--segment", "--rollouts branch"])
    cases["segment_neg"] = Case("train.py", ["--rollouts", "branch", "--segment", "-1"], ["--segment"])
    cases["alpha_nan"] = Case("train.py", ["--alpha", "nan"], ["--alpha", "nan"])
    cases["lr_inf"] = Case("train.py", ["--lr", "inf"], ["--lr", "inf"])
    cases["n_logs_past_train_range"] = Case("train.py", ["--n-logs", "1000001"], ["--n-logs"])
    cases["d_model_not_multiple_of_heads"] = Case("train.py", ["--d-model", "30"], ["--d-model", "30"])
    if not torch.cuda.is_available():
        cases["cuda_without_gpu"] = Case("train.py", ["--device", "cuda"], ["--device cuda"])
    cases["data_without_path"] = Case("train.py", ["--data", "mgshop"], ["--data-path"])
    cases["data_path_missing"] = Case("train.py", ["--data", "mgshop", "--data-path", str(tmp / "nope.json")],
                                      ["nope.json"])
    wrong = tmp / "wrong_format.json"
    wrong.write_text('[{"id": "Books:1", "metadata": {"client_checklist": []}}]\n')
    cases["data_wrong_format"] = Case("train.py", ["--data", "mgshop", "--data-path", str(wrong)],
                                      ["wrong_format.json", "utterances"])
    cases["data_with_logs_flag"] = Case("train.py", ["--data", "multiwoz", "--data-path", str(tmp), "--n-logs", "9"],
                                        ["--n-logs", "multiwoz"])
    cases["data_path_without_data"] = Case("train.py", ["--data-path", str(wrong)], ["--data-path"])
    plain = tmp / "plain_folder"   # neither a corpus nor a Hugging Face dataset
    plain.mkdir()
    (plain / "notes.txt").write_text("hello\n")
    cases["data_folder_neither"] = Case("train.py", ["--data", "multiwoz", "--data-path", str(plain)],
                                        ["plain_folder", "neither the MultiWOZ 2.2 folder", "Hugging Face dataset"])
    cases["records_folder_not_dataset"] = Case("train.py", ["--data", "records", "--data-path", str(plain)],
                                               ["plain_folder", "not a Hugging Face dataset folder"])
    cases["records_hub_id_offline"] = Case("train.py", ["--data", "records", "--data-path", "someone/their_corpus"],
                                           ["someone/their_corpus", "--no-offline"])
    damaged = tmp / "damaged_dataset"   # looks like save_to_disk's folder, holds nothing
    damaged.mkdir()
    (damaged / "state.json").write_text("{}\n")
    cases["logs_dataset_damaged"] = Case("train.py", ["--logs", str(damaged)], ["damaged_dataset"])
    cases["fsdp_without_torchrun"] = Case("train.py", ["--fsdp"], ["--fsdp", "torchrun"])
    cases["world_nonsense"] = Case("train.py", ["--world", "nonsense"], ["--world", "nonsense"])
    cases["paraphrases_0"] = Case("train.py", ["--world", "desk", "--paraphrases", "0"], ["--paraphrases", "0"])
    cases["horizon_0"] = Case("train.py", ["--world", "desk", "--horizon", "0"], ["--horizon", "0"])
    cases["horizon_without_desk"] = Case("train.py", ["--horizon", "8"], ["--horizon", "--world desk"])
    cases["tiny_flag_with_pretrained"] = Case("train.py", ["--model", "gpt2", "--n-layer", "3"], ["only shapes the tiny model", "gpt2"])
    not_a_model = tmp / "not_a_model"
    not_a_model.mkdir()
    cases["model_folder_not_a_model"] = Case("train.py", ["--model", str(not_a_model)], ["config.json"])
    cases["expert_model_missing"] = Case("train.py", ["--model", str(not_a_model.parent / "nope"), "--expert-model",
                                         "nope2"], ["nope", "local folder"])
    parent_file = tmp / "a_file"
    parent_file.write_text("not a folder\n")
    cases["out_parent_is_file"] = Case("train.py", ["--out", str(parent_file / "sub")], ["sub"])

    # ---- an output folder that already holds a run
    taken = tmp / "out_taken"
    run = taken / "taken"
    (run / "expert").mkdir(parents=True)
    (run / "config.json").write_text('{"algo": "gopo", "note": "the earlier run"}\n')
    (run / "metrics.jsonl").write_text('{"iter": 0, "R": 0.5}\n')
    (run / "expert" / "config.json").write_text("{}\n")
    cases["run_exists"] = Case("train.py", ["--out", str(taken), "--run", "taken"], ["--overwrite", "taken"],
                               keep=str(taken))
    cases["run_exists_with_bad_logs"] = Case(   # a bad --logs is reported first; the run is not touched
        "train.py", ["--out", str(taken), "--run", "taken", "--overwrite", "--logs",
                     str(logs_dir / "malformed.jsonl")], ["line 3"], keep=str(taken))

    # ---- --resume (being added to train.py)
    resume = tmp / "resume"
    for name, files in [("not_a_run", {"notes.txt": "hello\n"}),
                        ("bad_config", {"config.json": '{"k": 4, '}),
                        ("config_list", {"config.json": "[1, 2]\n"}),
                        ("clash", {"config.json": '{"k": 4}\n'}),
                        ("foreign_config", {"config.json": '{"a": 1}\n'}),
                        ("config_bad_value", {"config.json": json.dumps({**tiny_config(), "k": 1.5})}),
                        ("no_logs", {"config.json": json.dumps(tiny_config()), "values.json": '{"purchase": 1.0}'})]:
        (resume / name).mkdir(parents=True)
        for f, text in files.items():
            (resume / name / f).write_text(text)
    cases["resume_missing"] = Case("train.py", ["--resume", str(resume / "nope")], ["nope"], needs="--resume")
    cases["resume_not_a_run"] = Case("train.py", ["--resume", str(resume / "not_a_run")],
                                     ["not_a_run", "config.json"], keep=str(resume / "not_a_run"), needs="--resume")
    cases["resume_flag_clash"] = Case("train.py", ["--resume", str(resume / "clash"), "--k", "3"],
                                      ["--k"], keep=str(resume / "clash"), needs="--resume")
    cases["resume_other_world"] = Case("train.py", ["--resume", str(resume / "no_logs"), "--world", "desk"],
                                       ["--world", "desk"], keep=str(resume / "no_logs"), needs="--resume")
    cases["resume_foreign_config"] = Case(   # a config.json that is not a run's: nothing written, one line
        "train.py", ["--resume", str(resume / "foreign_config")], ["config.json", "'a'"],
        keep=str(resume / "foreign_config"), needs="--resume")
    cases["resume_config_bad_value"] = Case(
        "train.py", ["--resume", str(resume / "config_bad_value")], ["--k 1.5"],
        keep=str(resume / "config_bad_value"), needs="--resume")
    cases["resume_config_malformed"] = Case(
        "train.py", ["--resume", str(resume / "bad_config")], ["config.json"], keep=str(resume / "bad_config"),
        needs="--resume")
    cases["resume_config_not_object"] = Case(
        "train.py", ["--resume", str(resume / "config_list")], ["config.json"], keep=str(resume / "config_list"),
        needs="--resume")
    cases["resume_values_without_logs"] = Case(
        "train.py", ["--resume", str(resume / "no_logs")], ["logs.jsonl"], keep=str(resume / "no_logs"),
        needs="--resume")

    # ---- baselines (their own entry point): --sft-from, --algo ppo, --resume of a baseline run
    sft_from = tmp / "sft_from"
    for name, config in [("seed_clash", {**tiny_config(), "sft_batch": 16, "seed": 7}),
                         ("no_checkpoint", {**tiny_config(), "sft_batch": 16})]:
        (sft_from / name).mkdir(parents=True)
        (sft_from / name / "config.json").write_text(json.dumps(config))
        (sft_from / name / "sft.json").write_text("{}")
    cases["sft_from_missing"] = Case(BASELINES, ["--algo", "ppo", "--sft-from", str(sft_from / "nope")],
                                     ["nope", "config.json"])
    cases["sft_from_seed_clash"] = Case(BASELINES, ["--algo", "ppo", "--sft-from", str(sft_from / "seed_clash")],
                                        ["--seed", "7"], keep=str(sft_from / "seed_clash"))
    cases["sft_from_without_checkpoint"] = Case(
        BASELINES, ["--method", "ppo", "--sft-from", str(sft_from / "no_checkpoint")], ["flat_sft", "--method sft"],
        keep=str(sft_from / "no_checkpoint"))
    cases["gopo_noexpert_k1"] = Case(BASELINES, ["--algo", "gopo-noexpert", "--k", "1"], ["--k", ">= 2", "gopo-noexpert"])
    cases["noexpert_branch_k1"] = Case(BASELINES, ["--algo", "gopo-noexpert", "--rollouts", "branch", "--k", "1"],
                                       ["--rollouts branch", "--k", ">= 2"])
    cases["ppo_branch"] = Case(BASELINES, ["--algo", "ppo", "--rollouts", "branch"], ["--rollouts branch", "ppo"])
    cases["ppo_greedy_rollouts"] = Case(BASELINES, ["--algo", "ppo", "--agent-temperature", "0"],
                                        ["--agent-temperature"])
    cases["baseline_algo_in_train"] = Case("train.py", ["--algo", "ppo"], ["--algo", "ppo"])
    cases["baseline_resume"] = Case(BASELINES, ["--algo", "ppo", "--resume", str(resume / "ppo_run")], ["--resume"],
                                    keep=str(resume / "ppo_run"), needs="--resume")
    (resume / "ppo_run").mkdir(parents=True)
    (resume / "ppo_run" / "config.json").write_text(json.dumps({**tiny_config(), "method": "ppo"}))
    cases["resume_baseline_run"] = Case("train.py", ["--resume", str(resume / "ppo_run")], ["--resume", "ppo"],
                                        keep=str(resume / "ppo_run"), needs="--resume")
    cases["resume_with_sft_from"] = Case("train.py", ["--resume", str(resume / "ppo_run"), "--sft-from",
                                                      str(sft_from / "no_checkpoint")], ["--sft-from"],
                                         keep=str(resume / "ppo_run"), needs="--resume")

    # ---- issue 29: LoRA, micro-batches, trackers
    cases["lora_r0"] = Case("train.py", ["--lora-r", "0"], ["--lora-r", "0"])
    cases["lora_with_tiny"] = Case("train.py", ["--lora-r", "8"], ["--lora-r", "tiny"])
    cases["lora_targets_nonsense"] = Case("train.py", ["--model", str(checkpoint), "--lora-r", "8", "--lora-targets",
                                                       "nonsense"], ["--lora-targets", "nonsense"])
    cases["device_batch_size0"] = Case("train.py", ["--device-batch-size", "0"], ["--device-batch-size", "0"])
    cases["report_to_nonsense"] = Case("train.py", ["--report-to", "nonsense"], ["--report-to", "nonsense"])
    try:
        import wandb  # noqa: F401
    except ImportError:   # the usual case: wandb is not in requirements.txt
        cases["report_to_wandb_missing"] = Case("train.py", ["--report-to", "wandb"], ["--report-to wandb", "not installed"])

    # every training case writes into its own fresh --out (which must stay empty) unless it names one
    for name, case in cases.items():
        if "--out" not in case.args and "--resume" not in case.args:
            out = tmp / "fresh" / name
            out.mkdir(parents=True)
            case.args = [*case.args, "--out", str(out)]
            case.empty = str(out)
        if "--resume" not in case.args:
            base = TINY_RUN if "--model" not in case.args else TINY_RUN[:-8] + TINY_RUN[-2:]  # no tiny shape flags
            base = base if "--data" not in case.args else base[2:]                            # no --n-logs
            case.args = [*base, *case.args]

    # ---- eval.py
    ev = tmp / "eval"

    def eval_run(name, values='{"purchase": 1.0, "leave": 0.0}', broken=None, broken_files=None):
        """A run folder: values.json and four checkpoint copies, `broken` replaced by broken_files."""
        d = ev / name
        d.mkdir(parents=True)
        (d / "config.json").write_text('{"algo": "gopo"}\n')
        if values is not None:
            (d / "values.json").write_text(values)
        for c in ("expert", "agent", "expert_sft", "agent_sft"):
            if c == broken:
                (d / c).mkdir()
                for f, content in broken_files.items():
                    (d / c / f).write_bytes(content)
            else:
                shutil.copytree(checkpoint, d / c)
        return str(d)

    no_ckpt = ev / "no_checkpoints"
    no_ckpt.mkdir(parents=True)
    (no_ckpt / "config.json").write_text("{}\n")
    (no_ckpt / "values.json").write_text('{"purchase": 1.0}\n')
    (ev / "file_parent").mkdir()
    a_file = ev / "file_parent" / "a_file.txt"
    a_file.write_text("not a run\n")
    config = (checkpoint / "config.json").read_bytes()
    eval_cases = {
        "eval_missing_folder": ([str(ev / "nope")], ["nope", "does not exist"], None),
        "eval_file_not_folder": ([str(a_file)], ["a_file.txt", "not a folder"], str(ev / "file_parent")),
        "eval_no_checkpoints": ([str(no_ckpt)], [str(no_ckpt), "expert"], str(no_ckpt)),
        "eval_n_scenarios0": ([eval_run("n0"), "--n-scenarios", "0"], ["--n-scenarios"], str(ev / "n0")),
        "eval_n_scenarios_abc": ([eval_run("nabc"), "--n-scenarios", "abc"], ["--n-scenarios", "abc"],
                                 str(ev / "nabc")),
        "eval_batch_neg": ([eval_run("bneg"), "--batch", "-5"], ["--batch"], str(ev / "bneg")),
        "eval_show_neg": ([eval_run("showneg"), "--show", "-1"], ["--show", "-1"], str(ev / "showneg")),
        "eval_no_values": ([eval_run("noval", values=None)], ["values.json"], str(ev / "noval")),
        "eval_values_malformed": ([eval_run("valbad", values='{"purchase": 1.0,')],
                                  ["values.json", "malformed JSON"], str(ev / "valbad")),
        "eval_values_not_object": ([eval_run("vallist", values="[0.5, 1.0]")], ["values.json", "JSON object"],
                                   str(ev / "vallist")),
        "eval_values_not_numbers": ([eval_run("valstr", values='{"purchase": "high"}')],
                                    ["values.json", "number"], str(ev / "valstr")),
        "eval_expert_config_only": ([eval_run("cfgonly", broken="expert", broken_files={"config.json": config})],
                                    ["cfgonly/expert", "no loadable model"], str(ev / "cfgonly")),
        "eval_expert_empty_config": ([eval_run("cfgempty", broken="expert", broken_files={"config.json": b"{}"})],
                                     ["cfgempty/expert", "no loadable model"], str(ev / "cfgempty")),
        "eval_agent_sft_garbage_weights": (   # three good checkpoints load first: still one line
            [eval_run("garbage", broken="agent_sft",
                      broken_files={"config.json": config, "model.safetensors": b"garbage" * 100})],
            ["garbage/agent_sft", "no loadable model"], str(ev / "garbage")),
    }
    unknown = eval_run("unknown_algo")
    (ev / "unknown_algo" / "config.json").write_text('{"algo": "dqn"}\n')
    memento = eval_run("memento")
    (ev / "memento" / "config.json").write_text('{"algo": "memento"}\n')
    (ev / "memento" / "bank.pt").write_bytes(b"not a case bank" * 10)
    real = eval_run("realdata")   # a real-data run: no SOP, logged contexts (planners_of says why it is refused)
    (ev / "realdata" / "config.json").write_text('{"method": "gopo", "data": "mgshop"}\n')
    ppo = eval_run("ppo")
    (ev / "ppo" / "config.json").write_text('{"method": "ppo"}\n')
    eval_cases.update({
        "eval_planner_not_a_model": ([eval_run("pl_nomodel"), "--planner", str(ev / "file_parent")],
                                     ["--planner", "file_parent", "config.json"], str(ev / "pl_nomodel")),
        "eval_planner_url_without_model": ([eval_run("pl_nourlmodel"), "--planner-url", "http://127.0.0.1:9/v1"],
                                           ["--planner-url", "--planner-model"], str(ev / "pl_nourlmodel")),
        "eval_planner_shots_neg": ([eval_run("pl_shots"), "--planner", str(checkpoint), "--planner-shots", "-1"],
                                   ["--planner-shots", "-1"], str(ev / "pl_shots")),
        "eval_planner_real_data": ([real, "--planner", str(checkpoint)], ["real-data", "SOP"], real),
        "eval_planner_flat_run": ([ppo, "--planner", str(checkpoint)], ["ppo", "CS Agent"], ppo),
        "eval_planner_url_unreachable": (   # port 9 (discard) on 127.0.0.1: nothing listens there
            [eval_run("pl_unreach"), "--planner-url", "http://127.0.0.1:9/v1", "--planner-model", "m",
             "--planner-timeout", "2"], ["127.0.0.1:9", "did not answer"], str(ev / "pl_unreach")),
        "eval_run_and_compare": ([eval_run("both"), "--compare", str(ev / "both")], ["--compare"], str(ev / "both")),
        "eval_nothing_to_evaluate": ([], ["run"], None),
        "eval_unknown_algo": ([unknown], ["dqn"], unknown),
    })
    for name, (args, needles, keep) in eval_cases.items():
        cases[name] = Case("eval.py", args, needles, keep=keep)
    cases["eval_memento_bad_bank"] = Case(BASELINES, ["eval", memento], ["bank.pt"], keep=memento)   # a baseline
    cases["eval_baseline_run_in_eval_py"] = Case("eval.py", [memento], ["bank.pt"], keep=memento)   # eval.py plays it
    return cases


def tiny_config():
    """train.py's config.json for a TINY_RUN (what a run killed early leaves behind)."""
    import train   # the parser only: main() is not called
    return {**vars(train.world_defaults(train.parser().parse_args(TINY_RUN))), "world_size": 1}


# ----------------------------------------------------------------------------- running them
@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tok, models, cli_env):
    tmp = tmp_path_factory.mktemp("bad_input")
    folder = tmp / "checkpoint"
    checkpoint.save_model(models[0], tok, str(folder))
    (tmp / "cases").mkdir()
    cases = build_cases(tmp / "cases", folder)
    for case in cases.values():
        if case.keep:
            case.snapshot = snapshot(case.keep)
    jobs = {name: (c.script, c.args) for name, c in cases.items()}
    jobs["help"] = ("train.py", ["--help"])
    cold_names = list(jobs) if COLD else [n for n in COLD_CHECKS if n in jobs]
    work = tmp / "work"
    work.mkdir()
    with ThreadPoolExecutor(max_workers=2 if COLD else 1 + len(cold_names)) as pool:
        cold = {n: pool.submit(run_cold, *jobs[n], cli_env) for n in cold_names}
        forked = {} if COLD else run_forked(jobs, cli_env, work)
        cold = {n: f.result() for n, f in cold.items()}
    results = {**forked, **cold} if COLD else forked
    return cases, results, cold


def test_catalogue_size(catalogue):
    cases, _, _ = catalogue
    assert len(cases) >= 15


def test_fork_harness_matches_cold_processes(catalogue):
    """The forked children report what a real `python X.py ...` reports (exit status, stderr)."""
    _, results, cold = catalogue
    if COLD:
        pytest.skip("every case ran cold")
    for name, (rc, _, err) in cold.items():
        assert (results[name][0], results[name][2]) == (rc, err), name


def assert_one_line_error(result, prog, needles):
    rc, stdout, stderr = result
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    assert rc == 2, (rc, stdout[-2000:], stderr[-2000:])
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


ALL_CASES = [
    *(f"logs_{n}" for n in ["malformed", "missing_field", "unknown_strategy", "unknown_event", "empty",
                            "blank_lines", "list_line", "null_line", "role_bot", "turn_not_object",
                            "success_not_bool", "text_not_string", "deep_nesting", "huge_int", "not_utf8",
                            "missing_file", "directory", "parent_is_file"]),
    "algo", "model", "k0", "k1", "rollouts_nonsense", "branch_k1", "segment_without_branch", "segment_neg", "iters_neg", "scenarios_abc", "alpha_1_5", "sft_batch0", "seed_float", "unknown_flag",
    "alpha_nan", "lr_inf", "n_logs_past_train_range", "d_model_not_multiple_of_heads", "out_parent_is_file",
    *([] if torch.cuda.is_available() else ["cuda_without_gpu"]), "fsdp_without_torchrun", "tiny_flag_with_pretrained", "model_folder_not_a_model",
    "expert_model_missing", "data_without_path", "data_path_missing", "data_wrong_format", "data_with_logs_flag",
    "data_path_without_data", "data_folder_neither", "records_folder_not_dataset", "records_hub_id_offline",
    "logs_dataset_damaged",
    "lora_r0", "lora_with_tiny", "lora_targets_nonsense", "device_batch_size0", "report_to_nonsense",
    *([] if importlib.util.find_spec("wandb") else ["report_to_wandb_missing"]),
    "run_exists", "run_exists_with_bad_logs",
    "resume_missing", "resume_not_a_run", "resume_flag_clash", "resume_config_malformed",
    "resume_config_not_object", "resume_values_without_logs", "resume_foreign_config", "resume_config_bad_value",
    "world_nonsense", "paraphrases_0", "horizon_0", "horizon_without_desk", "resume_other_world",
    "eval_missing_folder", "eval_file_not_folder", "eval_no_checkpoints", "eval_n_scenarios0",
    "eval_n_scenarios_abc", "eval_batch_neg", "eval_show_neg", "eval_no_values", "eval_values_malformed",
    "eval_values_not_object",
    "eval_values_not_numbers", "eval_expert_config_only", "eval_expert_empty_config",
    "eval_agent_sft_garbage_weights",
    "sft_from_missing", "sft_from_seed_clash", "sft_from_without_checkpoint", "ppo_greedy_rollouts",
    "gopo_noexpert_k1", "noexpert_branch_k1", "ppo_branch",
    "resume_baseline_run", "resume_with_sft_from", "baseline_algo_in_train", "baseline_resume",
    "eval_run_and_compare", "eval_nothing_to_evaluate", "eval_unknown_algo", "eval_memento_bad_bank",
    "eval_baseline_run_in_eval_py",
    "eval_planner_not_a_model", "eval_planner_url_without_model", "eval_planner_shots_neg", "eval_planner_real_data",
    "eval_planner_flat_run", "eval_planner_url_unreachable",
]


def lists_flag(help_text, flag):
    """Whether --help lists `flag` as an option: a line of the options list that starts with it (a
    mention in another flag's help, "the --resume state", does not count)."""
    return re.search(r"^ +(?:--?[\w-]+(?: \S+)?, )*" + re.escape(flag) + r"(?![\w-])", help_text, re.M) is not None


def test_parametrize_list_matches_catalogue(catalogue):
    cases, _, _ = catalogue
    assert sorted(cases) == sorted(ALL_CASES)


@pytest.mark.parametrize("name", ALL_CASES)
def test_bad_input(catalogue, name):
    cases, results, _ = catalogue
    case = cases[name]
    if case.needs:   # a renamed or removed flag fails here, not as a skip
        assert lists_flag(results["help"][1], case.needs), f"`train.py --help` does not list {case.needs}"
    assert_one_line_error(results[name], os.path.basename(case.script), case.needles)
    if case.keep:
        assert snapshot(case.keep) == case.snapshot, f"{case.keep} changed"
    if case.empty:
        assert os.listdir(case.empty) == [], f"{case.empty} was written to"
