"""--lora-r: LoRA adapters through peft on a pretrained-shaped backbone (a tiny Llama saved with
save_pretrained, so no download). Only the adapters and the strategy tokens' rows train, the base
stays bit for bit, the run's adapter folders load in eval.py, --merge-lora's folders load with plain
from_pretrained and score the same decisions, and --resume after a kill gives the same metrics."""
import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import agent as agent_lib
import checkpoint
import expert as expert_lib
import lm
import lora
from conftest import TINY, kill_after
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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--"]


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory, cli_env):
    """Side by side: a LoRA run of 3 iterations with --merge-lora, the same run killed with SIGKILL
    after its first iteration and resumed, and a 1-iteration run on 2 gloo ranks with --fsdp."""
    out = tmp_path_factory.mktemp("lora_runs")
    cmd = lambda launch, run, *extra: [*launch, "train.py", *RUN, "--model", base, "--out", str(out),  # noqa: E731
                                       "--run", run, *extra]
    procs = {name: subprocess.Popen(cmd(*spec), cwd=ROOT, env=cli_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
             for name, spec in (("whole", ([sys.executable], "whole", "--iters", "3", "--merge-lora")),
                                ("fsdp", (TORCHRUN, "fsdp", "--iters", "1", "--merge-lora", "--fsdp")))}
    killed = subprocess.Popen(cmd([sys.executable], "killed", "--iters", "3"), cwd=ROOT, env=cli_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / "killed" / "metrics.jsonl"
    kill_after(killed, path, 1)
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(out / "killed")], cwd=ROOT,
                             env=cli_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name, p in procs.items():
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    return out


def decisions(tok, logs, folder, plain=False):
    """The Expert's decision log-probs on 6 logged dialogues, loaded by lm.load or plain from_pretrained."""
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:6]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(shop.STRATEGIES))
    model = AutoModelForCausalLM.from_pretrained(str(folder)) if plain else lm.load(str(folder))[0]
    with torch.no_grad():
        return expert_lib.decision_logps(model, batch, expert_lib.strategy_ids(tok, shop.STRATEGIES))


def test_resume_after_kill_merge_and_eval(runs, tok, logs):
    assert metrics(runs / "killed") == metrics(runs / "whole")
    run = runs / "whole"
    assert os.path.isfile(run / "expert" / "adapter_config.json") and os.path.isfile(run / "env.json")
    assert not os.path.exists(run / "expert" / "model.safetensors")          # adapters, not a second model
    adapters = decisions(tok, logs, run / "expert")
    assert torch.allclose(adapters, decisions(tok, logs, run / "expert_merged", plain=True), atol=1e-5)
    assert not torch.allclose(adapters, decisions(tok, logs, run / "expert_sft"), atol=1e-5)   # GOPO moved them
    ckpt = checkpoint.load_run(str(run), ("gopo", "sft"))                  # what eval.py loads
    assert all(lora.is_peft(ckpt[name][0]) for name in ("expert", "agent", "expert_sft", "agent_sft"))
    assert checkpoint.stack_warning(str(run)) is None                      # trained on this stack


def test_fsdp_two_ranks_with_lora(runs, tok, logs):
    """2 gloo ranks, --fsdp: LoRA trains, and the folders it saves (adapters, merged) load in one
    process and score the same decisions; SFT losses as in one process (tests/test_scale.py's bound)."""
    sft = {name: json.loads((runs / name / "sft.json").read_text()) for name in ("fsdp", "whole")}
    for k in sft["whole"]:
        assert sft["fsdp"][k] == pytest.approx(sft["whole"][k], abs=1e-5), k
    run = runs / "fsdp"
    assert torch.allclose(decisions(tok, logs, run / "expert"), decisions(tok, logs, run / "expert_merged", plain=True),
                          atol=1e-5)
    assert len(metrics(run)) == 1 and lora.is_peft(lm.load(str(run / "agent"))[0])
