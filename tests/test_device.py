"""What the GPU paths rely on, checked on CPU: scoring that never builds full-vocabulary logits,
device-side counter noise, bf16 autocast numerics, and the prepared GPU check's dry run.

FSDP's own pieces (every block resharded after `gathered`, ranks with no dialogue joining the same
collectives) run under 2-rank gloo in tests/test_scale.py."""
import copy
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import engine
import expert as expert_lib
import gopo
import lm
import rollout as rollout_lib
import serialize
from worlds import shop
from conftest import ROOT, hf_env

Z = len(shop.STRATEGIES)


def test_strategy_row_scoring_equals_full_logits_in_value_and_gradient(models, tok, logs, strategy_ids):
    """decision_logps (output layer on the Z strategy rows at the decision positions only) against
    the same quantity from the full (B, L, V) logits, and the gradients of their sums."""
    model = copy.deepcopy(models[0])
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:5]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, Z)
    step = expert_lib.decision_logps(model, batch, strategy_ids)                   # (B, T)
    step.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=batch["ids"], attention_mask=batch["attn"]).logits     # (B, L, V)
    prev = (batch["pos"] - 1).clamp(min=0)
    at = torch.gather(logits, 1, prev[..., None].expand(-1, -1, logits.shape[-1]))  # (B, T, V)
    full = expert_lib.masked_logps(at, strategy_ids, batch["allowed"]).gather(2, batch["z"][..., None]).squeeze(2)
    full = torch.where(batch["step_mask"], full, torch.zeros_like(full))
    full.sum().backward()
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    for a, p in zip(grads, model.parameters()):    # fp32 sums in another order: relative to the largest entry
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4 * float(p.grad.abs().max()))


def test_counter_noise_is_a_pure_function_of_key_counter_and_column():
    keys = torch.tensor([0, 1, 2**40 + 7, -5], dtype=torch.int64)
    u = engine.uniforms(keys, 3, 1000)
    assert u.shape == (4, 1000) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    torch.testing.assert_close(engine.uniforms(keys[[2, 0]], 3, 1000), u[[2, 0]], rtol=0, atol=0)   # batch-free
    assert not torch.equal(engine.uniforms(keys, 4, 1000), u)                                  # counter matters
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.std()) - 12 ** -0.5) < 0.01       # roughly uniform
    # Gumbel-max with it samples softmax(scores): 3 outcomes, 20,000 draws
    scores = torch.tensor([0.0, 1.0, 2.0]).expand(20_000, 3)
    picks = engine.gumbel_argmax(scores, engine.uniforms(torch.arange(20_000), 0, 3))
    freq = torch.bincount(picks, minlength=3).float() / 20_000
    torch.testing.assert_close(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), rtol=0, atol=0.015)


def test_sampled_dialogues_do_not_depend_on_the_batch_split(models, tok):
    """Sampling with device-side noise: 8 dialogues played in one batch, and as two batches of 4 (as
    two ranks would play them), come out token for token the same."""
    expert_model, agent_model = models
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(8, offset=5000)]
    whole = rollout_lib.rollout((expert_model, tok), (agent_model, tok), scenarios, seed=4, max_reply_tokens=12)
    parts = [rollout_lib.ExpertDialogues((expert_model, tok), (agent_model, tok), scenarios[i::2], shop, seed=4,
                                         index=list(range(8))[i::2]).play(False, 0.7, 12) for i in (0, 1)]
    for i, tr in enumerate(whole):
        other = parts[i % 2][i // 2]
        assert tr["record"]["turns"] == other["record"]["turns"] and tr["agent_ids"] == other["agent_ids"]


def test_context_never_samples_past_the_tokenizer(models, tok):
    """A model whose embedding matrix is padded past the tokenizer (Qwen2.5: 151,936 rows, 151,665
    tokens): the padded ids get no logits, so they are never sampled."""
    _, agent_model = models
    padded = copy.deepcopy(agent_model)
    padded.resize_token_embeddings(len(tok) + 64, mean_resizing=False)
    with torch.no_grad():
        padded.get_output_embeddings().weight[len(tok):] = 100.0     # they would win every draw
    ctx = engine.Context(padded, [[tok.bos_token_id]] * 16, tok.pad_token_id, n_vocab=len(tok))
    out = ctx.sample(tok.eos_token_id, 8, 1.0, torch.arange(16))
    assert all(t < len(tok) for row in out for t in row)


def test_bf16_on_cpu_takes_the_math_attention_kernel_and_fp32_keeps_the_fused_one(models):
    """lm.autocast on CPU, seen through the aten ops one forward calls: fp32 keeps torch's fused
    attention kernel (its numbers unchanged); bf16, in one process or under FSDP's own bf16
    (fsdp=True: no autocast), takes the math kernel, because the fused one dies under
    ATEN_CPU_CAPABILITY=default on an AMX CPU (lm.autocast says why). A CPU without AMX cannot
    show that crash, so this checks the rule itself, on every machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = models[0]
    ids = torch.arange(3, 23).reshape(2, 10)
    fused = "_scaled_dot_product_flash_attention_for_cpu"
    seen = {}
    for enabled, fsdp in ((False, False), (True, False), (True, True)):
        with lm.autocast(torch.device("cpu"), enabled, fsdp), torch.no_grad(), Ops() as ops:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            seen[enabled, fsdp] = (ops.names, logits.dtype, torch.is_autocast_enabled("cpu"))
    assert fused in seen[False, False][0] and seen[False, False][1:] == (torch.float32, False)
    assert fused not in seen[True, False][0] and seen[True, False][1:] == (torch.bfloat16, True)
    assert fused not in seen[True, True][0] and seen[True, True][1:] == (torch.float32, False)   # FSDP casts, not autocast


def test_bf16_rollout_log_probs_match_scoring_and_the_first_margin_is_zero(models, tok, values, strategy_ids):
    """Under bf16 autocast (--bf16 in one process): the log-probs recorded while sampling (cached,
    left-padded forwards) equal the scoring forward's (one right-padded pass) within bf16 rounding,
    and GOPO's reference is that scoring forward, so before any step the DPO margin of every pair is
    exactly 0: the first preference loss is log 2 to the last bit."""
    expert_model, agent_model = models
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(6, offset=7300)]
    with lm.autocast(torch.device("cpu"), True):
        trajs = rollout_lib.rollout((expert_model, tok), (agent_model, tok), [s for s in scenarios for _ in range(4)],
                                    seed=2, max_reply_tokens=12)
        batch = expert_lib.collate(trajs, tok.pad_token_id, Z)
        with torch.no_grad():
            step = expert_lib.decision_logps(expert_model, batch, strategy_ids)
        rewards = [gopo.joint_reward(t["record"], values, shop.HORIZON)["R"] for t in trajs]
        groups = [list(range(i * 4, i * 4 + 4)) for i in range(len(scenarios))]
        pairs = gopo.build_pairs(rewards, groups, 0.0, 4)
        args = SimpleNamespace(listwise=False, beta=0.5, nll_coef=0.0, segment=0)
        S_ref = gopo.reference_logps(expert_model, tok, trajs, pairs, shop.STRATEGIES)
        model = copy.deepcopy(expert_model)
        loss, stats = gopo.expert_update((model, tok), torch.optim.SGD(model.parameters(), lr=0.0), trajs, pairs, S_ref,
                                         torch.tensor(rewards), shop.STRATEGIES, args)
    for b, tr in enumerate(trajs):
        n = len(tr["ref_logps"])
        torch.testing.assert_close(step[b, :n], torch.tensor(tr["ref_logps"]), rtol=0, atol=0.05)
    assert pairs and loss == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margins"] == 0 and stats["rewards/chosen"] == 0 and stats["rewards/accuracies"] == 0


def test_bf16_rollout_copy_follows_every_step_and_is_used_only_on_a_gpu(models, tok, strategy_ids, monkeypatch):
    """lm.rollout_model: under --bf16 in one process on CUDA the rollouts play a bf16 copy of each
    model (lm.bf16_copy), equal to the model cast to bf16 after every optimizer step, refreshed in
    place and only when the weights moved; tied rows stay tied, buffers keep their dtype. Everywhere
    else (CPU, fp32, --fsdp) the model itself. The copy's rollouts record decision log-probs within
    the bf16 tolerance above of the fp32 model's scoring forward."""
    model = copy.deepcopy(models[0])
    copy_ = lm.bf16_copy(model)

    def assert_follows():
        for (name, c), p in zip(copy_.named_parameters(), model.parameters()):
            assert c.dtype == torch.bfloat16 and not c.requires_grad and torch.equal(c, p.detach().to(torch.bfloat16)), name
        for c, b in zip(copy_.buffers(), model.buffers()):
            assert c.dtype == b.dtype and torch.equal(c, b)
    assert_follows()
    assert copy_.get_input_embeddings().weight is copy_.get_output_embeddings().weight      # tied, as the model
    versions = [c._version for c in copy_.parameters()]
    assert lm.bf16_copy(model) is copy_ and [c._version for c in copy_.parameters()] == versions   # no step: no copy
    ids = torch.tensor([[tok.bos_token_id, 7, 9, 11]])
    assert lm.guarded_step(model, torch.optim.SGD(model.parameters(), lr=1.0), model(input_ids=ids).logits.pow(2).mean())
    assert lm.bf16_copy(model) is copy_
    assert_follows()
    on = SimpleNamespace(bf16=True, fsdp=False)
    assert lm.rollout_model(model, on) is model                                               # CPU: autocast as before
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))   # as if on a GPU
    assert lm.rollout_model(model, on) is copy_
    assert lm.rollout_model(model, SimpleNamespace(bf16=False, fsdp=False)) is model
    assert lm.rollout_model(model, SimpleNamespace(bf16=True, fsdp=True)) is model          # FSDP casts itself
    monkeypatch.undo()
    scenarios = [shop.make_scenario(s) for s in data.train_seeds(6, offset=7400)]
    with lm.autocast(torch.device("cpu"), True):
        trajs = rollout_lib.rollout((copy_, tok), (lm.bf16_copy(models[1]), tok), scenarios, seed=2, max_reply_tokens=12)
    batch = expert_lib.collate(trajs, tok.pad_token_id, Z)
    with torch.no_grad():
        step = expert_lib.decision_logps(model, batch, strategy_ids)
    for b, tr in enumerate(trajs):
        torch.testing.assert_close(step[b, :len(tr["ref_logps"])], torch.tensor(tr["ref_logps"]), rtol=0, atol=0.05)


def test_gpu_check_dry_run(tmp_path):
    """tools/gpu_check.sh with DRY_RUN=1: every stage of the prepared GPU check, on CPU, with a tiny
    stand-in for the 1.5B model, so the script cannot rot between the rare GPU sessions. PYTHON is
    this test's own interpreter: `python` on PATH may be one without torch (no venv activated)."""
    env = hf_env()
    env.update(DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    for stage in ("(a)", "(b)", "(c)", "(d)", "(e)", "(l)"):
        assert f"== {stage}" in p.stdout, stage
    # (e): versions and packed GQA, cold and warm, a rollout line per batch (both arms, sampled generate,
    # ratio), the targets' verdicts, the time split with live rows per turn, the decode arms, a profile
    assert re.search(r"transformers 5\.\d+.*packed GQA for one-token queries: (yes|no)", p.stdout)
    assert re.search(r"cold: .* tokens/s\nwarm: .* tokens/s", p.stdout)
    assert len(re.findall(r"dialogues: rollout \d+ reply tokens, tokens/s: fp32\+autocast \d+, bf16 copy \d+; "
                          r"sampled generate .* tokens/s; ratio \d", p.stdout)) == 2, p.stdout[-3000:]
    assert re.search(r"target at \d+ dialogues, warm, bf16 copy: ratio .* >= 0.85: (met|missed); .* >= 2000: (met|missed)",
                     p.stdout)
    assert re.search(r"done check at \d+ dialogues .*every 1 steps \d+, every 4 steps \d+, every 8 steps \d+", p.stdout)
    assert len(re.findall(r"split at \d+ dialogues, .* = prefill .* decode .* turns \(live rows", p.stdout)) == 2
    decode = re.findall(r"decode B= *\d+, .*ms/step: (.*)", p.stdout)
    assert len(decode) == 2 and all(len(line.split("; ")) == 7 for line in decode), decode
    assert len(re.findall(r"profile, one decode step, .* wall .* ms", p.stdout)) == 4
    assert "skipped" not in p.stdout
    assert "GOPO --rollouts branch: iteration" in p.stdout      # (c): a branched iteration on the device too
    assert re.search(r"LoRA r=16: [\d.]+M trainable of .* GOPO iteration .* peak .* GB against 4N \+ 32 n_lora", p.stdout)
    assert "GPU CHECK PASSED" in p.stdout


def test_turns_end_at_the_templates_end_of_turn_not_at_eos(tmp_path):
    """A base model whose eos (<|endoftext|>) is not its chat template's end of turn (<|im_end|>),
    as Qwen2.5's: from_pretrained makes the template's marker the token every turn ends with."""
    t = lm.train_tokenizer(["C: hello there", "A: welcome"] * 20, [], vocab_size=300)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    t.eos_token = "<|endoftext|>"
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}")
    model = lm.build_tiny_model(t, d_model=32, n_layer=1, n_head=2)
    model.save_pretrained(tmp_path)
    t.save_pretrained(tmp_path)
    _, tok = lm.from_pretrained(str(tmp_path), shop.STRATEGIES)
    assert tok.eos_token == "<|im_end|>"
    assert serialize.chat_parts(tok) == ("", "\n<|im_start|>user\n", "\n<|im_start|>assistant\n")
    assert tok.decode(serialize.customer_ids(tok, "Hi.")) == "\n<|im_start|>user\nC: Hi.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(serialize.reply_ids(tok, "Hello.")).endswith("<|im_end|>")


def test_untied_output_rows_of_strategy_tokens_start_at_their_names(tok):
    """An untied model (docs/scaling.md's 14B recipe): the new strategy tokens' output rows, which the
    Expert's decisions read, start at the mean of their names' output rows, like the input rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    t = lm.train_tokenizer(["C: hello there", "A: welcome"] * 20, [], vocab_size=300)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(t), hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=2, tie_word_embeddings=False))
    ids = lm.add_strategy_tokens(model, t, shop.STRATEGIES)
    out, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert out.data_ptr() != emb.data_ptr()
    for z, i in zip(shop.STRATEGIES, ids):
        name_ids = t.encode(" " + z.replace("_", " "), add_special_tokens=False)
        torch.testing.assert_close(out[i], out[name_ids].mean(0))
        torch.testing.assert_close(emb[i], emb[name_ids].mean(0))
