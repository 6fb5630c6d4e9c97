"""--lora-r: LoRA adapters through peft on a pretrained-shaped backbone (a tiny Llama saved with
save_pretrained, so no download). Only the adapters and the strategy tokens' rows train, the base
stays bit for bit, the run's adapter folders load in eval.py, --merge-lora's folders load with plain
from_pretrained and score the same decisions, and --resume after a kill gives the same metrics."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import agent as agent_lib
import checkpoint
import expert as expert_lib
import lm
from conftest import TINY
from worlds import shop

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--n-logs", "30", "--sft-steps", "6", "--sft-window-steps", "5", "--scenarios", "2", "--k", "3",
       "--lora-r", "4", "--ref", "sft"]


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A 'pretrained' backbone folder: a tiny Llama and its tokenizer, save_pretrained."""
    folder = str(tmp_path_factory.mktemp("tinybase"))
    lm.build_tiny_model(tok, **TINY).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def lora_args(base, **kw):
    return SimpleNamespace(**{"model": base, "expert_model": None, "lora_r": 4, "lora_alpha": None, "lora_dropout": 0.0,
                              "lora_targets": "all-linear", "lora_only": None, "bf16": False, "fsdp": False,
                              "grad_ckpt": False, **kw})


def test_only_adapters_and_strategy_rows_train_and_the_base_stays(base, logs):
    args = lora_args(base)
    models = lm.new_models(("expert", "agent"), args, shop, logs)
    (expert_model, tok), (agent_model, _) = models["expert"], models["agent"]
    frozen = {n: p.detach().clone() for n, p in expert_model.named_parameters() if not p.requires_grad}
    names = [n for n, p in expert_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    delta = dict(expert_model.named_parameters())[next(n for n in names if "trainable_tokens_delta" in n)]
    assert delta.shape[0] == len(shop.STRATEGIES) and delta.dtype == torch.float32
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:4]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(shop.STRATEGIES))
    expert_lib.decision_logps(expert_model, batch, expert_lib.strategy_ids(tok, shop.STRATEGIES)).sum().backward()
    got = {n for n, p in expert_model.named_parameters() if p.grad is not None}
    assert got <= set(names) and any("trainable_tokens_delta" in n for n in got) and any("lora_B" in n for n in got)
    expert_model.zero_grad()
    before = delta.detach().clone()
    expert_lib.sft(expert_model, tok, logs[:20], shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS, 3, batch_size=4, lr=1e-2)
    agent_lib.sft(agent_model, tok, logs[:20], shop.INSTRUCTIONS, 3, batch_size=4, lr=1e-2, window_steps=1)
    assert not torch.equal(before, delta)                              # the strategy rows trained ...
    for n, p in expert_model.named_parameters():                       # ... and nothing of the base moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # --bf16: the frozen base in bf16, what trains in fp32; a forward still runs
    placed = lm.place(copy.deepcopy(agent_model), lora_args(base, bf16=True), torch.device("cpu"))
    dtypes = {p.requires_grad: p.dtype for p in placed.parameters()}
    assert dtypes == {False: torch.bfloat16, True: torch.float32}
    with lm.autocast(torch.device("cpu"), True):
        ids, attn, mask = agent_lib.collate(agent_lib.sft_examples(tok, logs[:2], shop.INSTRUCTIONS)[0], tok.pad_token_id)
        assert torch.isfinite(agent_lib.reply_logps(placed, ids, attn, mask)).all()


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_run_merge_eval_and_resume_after_kill(base, tok, logs, tmp_path, cli_env):
    cmd = lambda run, *extra: [sys.executable, "train.py", *RUN, "--model", base, "--out", str(tmp_path),  # noqa: E731
                               "--run", run, *extra]
    whole = subprocess.Popen(cmd("whole", "--iters", "3", "--merge-lora"), cwd=ROOT, env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(cmd("killed", "--iters", "3"), cwd=ROOT, env=cli_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "killed" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "killed")], cwd=ROOT,
                             env=cli_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")

    run = tmp_path / "whole"
    assert os.path.isfile(run / "expert" / "adapter_config.json") and os.path.isfile(run / "env.json")
    assert not os.path.exists(run / "expert" / "model.safetensors")          # adapters, not a second model
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:6]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(shop.STRATEGIES))
    ids = expert_lib.strategy_ids(tok, shop.STRATEGIES)
    with torch.no_grad():
        adapters = expert_lib.decision_logps(lm.load(str(run / "expert"))[0], batch, ids)
        merged = expert_lib.decision_logps(AutoModelForCausalLM.from_pretrained(str(run / "expert_merged")), batch, ids)
        sft = expert_lib.decision_logps(lm.load(str(run / "expert_sft"))[0], batch, ids)
    assert torch.allclose(adapters, merged, atol=1e-5)
    assert not torch.allclose(adapters, sft, atol=1e-5)                     # GOPO moved the adapters
    ckpt = checkpoint.load_run(str(run), ("gopo", "sft"))                  # what eval.py loads
    assert all(lm.is_peft(ckpt[name][0]) for name in ("expert", "agent", "expert_sft", "agent_sft"))
    assert checkpoint.stack_warning(str(run)) is None                      # trained on this stack


def test_fsdp_two_ranks_with_lora(base, tok, logs, tmp_path, cli_env):
    """2 gloo ranks, --fsdp: LoRA trains, and the folders it saves (adapters, merged) load in one
    process and score the same decisions; SFT losses as in one process (tests/test_scale.py's bound)."""
    args = [*RUN, "--model", base, "--iters", "1", "--merge-lora"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--"]
    runs = {name: subprocess.Popen([*launch, "train.py", *args, "--out", str(tmp_path), "--run", name, *extra], cwd=ROOT,
                                   env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, launch, extra in (("fsdp", torchrun, ["--fsdp"]), ("one", [sys.executable], []))}
    for name, p in runs.items():
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    sft = {name: json.loads((tmp_path / name / "sft.json").read_text()) for name in runs}
    for k in sft["one"]:
        assert sft["fsdp"][k] == pytest.approx(sft["one"][k], abs=1e-5), k
    run = tmp_path / "fsdp"
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:4]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(shop.STRATEGIES))
    ids = expert_lib.strategy_ids(tok, shop.STRATEGIES)
    with torch.no_grad():
        adapters = expert_lib.decision_logps(lm.load(str(run / "expert"))[0], batch, ids)
        merged = expert_lib.decision_logps(AutoModelForCausalLM.from_pretrained(str(run / "expert_merged")), batch, ids)
    assert torch.allclose(adapters, merged, atol=1e-5)
    assert len(metrics(run)) == 1 and lm.is_peft(lm.load(str(run / "agent"))[0])
