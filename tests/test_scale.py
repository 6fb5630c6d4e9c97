"""Scale: pretrained backbones through --model, chat templates, and torchrun + FSDP2 on CPU (gloo).

The distributed tests launch `torchrun --nproc_per_node 2` on the tiny model and compare with the
single-process run on the same global batch: SFT losses, the GOPO iteration's loss and metrics, the
saved checkpoint's logits. Rollouts are split over the ranks, and dialogues end at different turns
on each rank, so a finished run also shows that generation under FSDP does not hang.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lm
import serialize
from worlds import shop
from conftest import ROOT, hf_env

SMALL = ["--n-logs", "60", "--d-model", "32", "--sft-steps", "4", "--sft-window-steps", "2", "--iters", "2",
         "--scenarios", "4", "--k", "3", "--cs-samples", "6"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--"]


def run(cmd, timeout=150):
    p = subprocess.run(cmd, cwd=ROOT, env=hf_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and four 2-rank runs (plain data parallel; FSDP fp32, with and without
    micro-batches of one sequence; FSDP bf16 with activation checkpointing)."""
    out = tmp_path_factory.mktemp("runs")
    run([sys.executable, "train.py", "--out", str(out), "--run", "single", *SMALL])
    run(TORCHRUN + ["train.py", "--out", str(out), "--run", "ddp", *SMALL])
    run(TORCHRUN + ["train.py", "--out", str(out), "--run", "fsdp", "--fsdp", *SMALL])
    # --device-batch-size 1: every rank runs as many micro-batches (forwards hold FSDP's collectives)
    run(TORCHRUN + ["train.py", "--out", str(out), "--run", "fsdp_micro", "--fsdp", "--device-batch-size", "1", *SMALL])
    run(TORCHRUN + ["train.py", "--out", str(out), "--run", "bf16", "--fsdp", "--bf16", "--grad-ckpt", *SMALL])
    run([sys.executable, "train.py", "--out", str(out), "--run", "single_bf16", "--bf16", *SMALL])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_micro"])
def test_two_ranks_match_single_process(runs, mode):
    """Same global batches: SFT losses to 1e-5, each GOPO iteration's loss to 1e-5 and its rollout
    metrics exactly (every dialogue is played the same, whichever rank plays it)."""
    single, multi = (json.load(open(runs / r / "sft.json")) for r in ("single", mode))
    for key in ("expert_loss", "agent_loss"):
        torch.testing.assert_close(torch.tensor(multi[key]), torch.tensor(single[key]), rtol=0, atol=1e-5)
    m1, m2 = metrics(runs / "single"), metrics(runs / mode)
    assert len(m1) == len(m2) == 2 and m1[0]["pairs"] > 0
    for a, b in zip(m1, m2):
        for k in ("R", "tse", "esndcg", "success", "gre", "pairs", "cs_pairs"):
            assert a[k] == b[k], k
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert json.load(open(runs / mode / "config.json"))["world_size"] == 2


def test_fsdp_checkpoint_reloads_on_one_process(runs):
    """rank 0 wrote a folder that from_pretrained loads alone; its logits equal the single-process
    model's (same training), and tied embeddings stayed tied."""
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    for name in ("expert", "agent"):
        (a, _), (b, _) = lm.load(str(runs / "single" / name)), lm.load(str(runs / "fsdp" / name))
        assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=1e-4)


def assert_gopo_iterations_finite(run_dir):
    """Both GOPO iterations took every step: no step skipped as non-finite, and a finite loss (the
    iteration found pairs to learn from). A run whose every step was skipped logs loss None."""
    m = metrics(run_dir)
    assert len(m) == 2, m
    for r in m:
        assert r["nonfinite_steps"] == 0, (run_dir.name, r["iter"], r["nonfinite_steps"])
        assert r["pairs"] > 0 and r["loss"] is not None and math.isfinite(r["loss"]), \
            (run_dir.name, r["iter"], r["pairs"], r["loss"])


def assert_float32_weights(folder):
    """Every tensor of a saved model folder is float32: the master weights were not cast to bf16."""
    from safetensors.torch import load_file
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert files, f"no safetensors in {folder}"
    for f in files:
        dtypes = {k: v.dtype for k, v in load_file(os.path.join(folder, f)).items()}
        assert dtypes and set(dtypes.values()) == {torch.float32}, \
            (str(folder), {k: d for k, d in dtypes.items() if d != torch.float32})


def test_fsdp_bf16_grad_ckpt_runs_close(runs):
    """bf16 compute with fp32 master weights: same pipeline, SFT losses within bf16 rounding, every
    GOPO step taken with a finite loss, and the sharded master weights (gathered into the saved
    checkpoints) are float32."""
    single, bf16 = (json.load(open(runs / r / "sft.json")) for r in ("single", "bf16"))
    torch.testing.assert_close(torch.tensor(bf16["agent_loss"]), torch.tensor(single["agent_loss"]),
                               rtol=0.02, atol=0.02)
    assert_gopo_iterations_finite(runs / "bf16")
    for name in ("expert", "agent", "expert_sft", "agent_sft"):
        assert_float32_weights(runs / "bf16" / name)


def test_single_process_bf16_runs_close_to_fp32(runs):
    """--bf16 in one process (autocast over fp32 weights and AdamW states): SFT losses within bf16
    rounding of the fp32 run's; every GOPO step taken with a finite loss; the weights and both AdamW
    states (the --resume state after the last iteration, and the saved checkpoints) are float32."""
    single, bf16 = (json.load(open(runs / r / "sft.json")) for r in ("single", "single_bf16"))
    for key in ("expert_loss", "agent_loss"):
        torch.testing.assert_close(torch.tensor(bf16[key]), torch.tensor(single[key]), rtol=0.02, atol=0.02)
    assert_gopo_iterations_finite(runs / "single_bf16")
    run_dir = runs / "single_bf16"
    for folder in (run_dir / "expert", run_dir / "agent", run_dir / "state" / "expert", run_dir / "state" / "agent"):
        assert_float32_weights(folder)
    trainer = torch.load(run_dir / "state" / "trainer.pt")
    assert trainer["iterations_done"] == 2
    n_states = {}
    for opt in ("opt_e", "opt_a"):
        states = trainer[opt]["state"].values()
        moments = [(k, v.dtype) for st in states for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
        assert all(d == torch.float32 for _, d in moments), (opt, {d for _, d in moments})
        n_states[opt] = len(moments)
    assert n_states["opt_e"] > 0, "the Expert's AdamW state is empty: no GOPO step was taken"


def test_generation_under_fsdp_returns_when_ranks_stop_at_different_lengths(tmp_path):
    """Rank 0 writes 3 tokens, rank 1 writes 40: both return and meet at the next collective."""
    script = tmp_path / "gen.py"
    script.write_text(f'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import engine, lm, parallel
parallel.init()
torch.manual_seed(0)
from transformers import LlamaConfig, AutoModelForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
model = parallel.shard(AutoModelForCausalLM.from_config(cfg))
n = 3 if parallel.rank() == 0 else 40
with parallel.gathered(model):
    out = engine.Context(model, [[1, 2, 3]] * 2, 0).sample(-1, n, 1.0, torch.tensor([0, 1]))
assert [len(o) for o in out] == [n, n]
print(f"rank {{parallel.rank()}} total {{parallel.total(float(n))}}")   # one write: the ranks share stdout
parallel.close()
''')
    p = run(TORCHRUN + [str(script)], timeout=60)
    assert "total 43.0" in p.stdout


def test_gathered_reshards_every_block_and_an_idle_rank_joins_every_gather(tmp_path):
    """parallel.gathered: inside, every FSDP unit's parameters (root and each decoder block) are
    unsharded; after, all are sharded again (DTensors). A rollout in which rank 1 has no dialogue
    at all still returns on both ranks: the idle rank enters the same gathers every turn."""
    script = tmp_path / "gather.py"
    script.write_text(f'''
import sys, torch
sys.path.insert(0, {ROOT!r})
from torch.distributed.tensor import DTensor
import data, lm, parallel, rollout
from worlds import shop
parallel.init("cpu")
logs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in range(20)]
tok = lm.train_tokenizer([t["text"] for r in logs for t in r["turns"]] + list(shop.INSTRUCTIONS.values()),
                         shop.STRATEGIES, 300)
models = []
for seed in (0, 1):
    m = lm.build_tiny_model(tok, 32, 2, 2, seed=seed)
    lm.add_strategy_tokens(m, tok, shop.STRATEGIES)
    models.append(parallel.shard(m))
expert, agent = models
sharded = lambda m: [isinstance(p, DTensor) for p in m.parameters()]
assert all(sharded(expert)) and len(sharded(expert)) > 4
with parallel.gathered(expert):
    assert not any(sharded(expert)), "a unit stayed sharded inside gathered()"
assert all(sharded(expert)), "a unit stayed unsharded after gathered()"
scen = [shop.make_scenario(s) for s in data.train_seeds(3, offset=900)] if parallel.rank() == 0 else []
trajs = rollout.rollout((expert, tok), (agent, tok), scen, seed=1, max_reply_tokens=6)
assert all(sharded(expert)) and all(sharded(agent))
print(f"rank {{parallel.rank()}} dialogues {{len(trajs)}} total {{parallel.total(float(len(trajs)))}}")   # one write
parallel.close()
''')
    p = run(TORCHRUN + [str(script)], timeout=120)
    assert "total 3.0" in p.stdout


def test_pretrained_backbone_with_chat_template(tmp_path, tok):
    """--model FOLDER: a Hugging Face model folder with a chat template trains end to end; the
    template's role markers frame every turn, and the strategy tokens were added to its tokenizer.
    --expert-model gives the Expert another backbone with another tokenizer (no template)."""
    folder = tmp_path / "chatml-tiny"
    t = lm.train_tokenizer(["C: hello there", "A: welcome"] * 20, [], vocab_size=300)
    t.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
    model = lm.build_tiny_model(t, d_model=32, n_layer=1, n_head=2)
    model.save_pretrained(folder)
    t.save_pretrained(folder)
    loaded, t2 = lm.from_pretrained(str(folder), shop.STRATEGIES)
    assert serialize.chat_parts(t2) == ("", "\n<|bos|>user\n", "\n<|bos|>assistant\n")
    new_ids = [t2.convert_tokens_to_ids(serialize.strategy_token(z)) for z in shop.STRATEGIES]
    assert sorted(new_ids) == list(range(len(t), len(t) + len(shop.STRATEGIES)))     # one new token each
    assert loaded.get_input_embeddings().weight.shape[0] == len(t2)
    ids = serialize.customer_ids(t2, "Hi.")
    assert t2.decode(ids) == "\n<|bos|>user\nC: Hi.<|eot|>\n<|bos|>assistant\n"
    planner = tmp_path / "plain-tiny"
    p = lm.train_tokenizer(["C: something else entirely", "A: yes"] * 20, [], vocab_size=280)
    lm.build_tiny_model(p, d_model=32, n_layer=1, n_head=2, seed=3).save_pretrained(planner)
    p.save_pretrained(planner)
    out = tmp_path / "runs"
    run([sys.executable, "train.py", "--out", str(out), "--model", str(folder), "--expert-model", str(planner),
         "--n-logs", "40", "--sft-steps", "2", "--sft-window-steps", "1", "--iters", "1", "--scenarios", "2",
         "--k", "2", "--cs-samples", "2"])
    (_, tok_e), (_, tok_a) = lm.load(str(out / "gopo" / "expert")), lm.load(str(out / "gopo" / "agent"))
    assert serialize.strategy_token("close") in tok_e.get_vocab() and serialize.strategy_token("close") in tok_a.get_vocab()
    assert not tok_e.chat_template and tok_a.chat_template and len(tok_e) != len(tok_a)
    assert len(metrics(out / "gopo")) == 1          # the GOPO iteration ran with two tokenizers
    shutil.rmtree(out)
