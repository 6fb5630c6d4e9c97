"""The prepared GPU check: what this repo claims about GPUs, run on one. tools/gpu_check.sh calls it.

    python tools/gpu_check.py STAGE            # STAGE: a (device checks), c (a 1.5B-shaped model) or e (throughput)
    DRY_RUN=1 python tools/gpu_check.py STAGE  # the same code on CPU with a tiny stand-in (the test suite)

(a) device checks on CUDA: the memory-light scoring paths equal the plain ones there, sampled
    dialogues do not depend on the batch split, and greedy dialogues on CUDA equal those on CPU.
(c) a Qwen2.5-1.5B-shaped model built from its config (random weights, nothing downloaded; the
    output layer has Qwen's 151,936 rows, the tokenizer is the run's own BPE, and logits past it are
    cut off as for a real Qwen tokenizer), used as both agents: one GOPO iteration, one PPO step and
    a greedy eval, single-process bf16 (autocast over fp32 weights and AdamW states), with and
    without activation checkpointing. Prints rollout tokens/s, the preference-step time and peak
    GPU memory beside what docs/scaling.md's formulas predict.
(e) the same 1.5B-shaped pair's rollout tokens/s at 8, 64 and 256 dialogues, single-process bf16,
    beside a bare HF `model.generate` at the same batch and the same final lengths on the same
    device, and their ratio (target: >= 0.85 at 64 dialogues; stage_e says what is counted).
"""
import copy
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from experiments import flat, ppo  # noqa: E402
import data  # noqa: E402
import expert as expert_lib  # noqa: E402
import gopo  # noqa: E402
import lm  # noqa: E402
import rollout as rollout_lib  # noqa: E402
import serialize  # noqa: E402
import tse  # noqa: E402
from worlds import shop  # noqa: E402

DRY = os.environ.get("DRY_RUN") == "1"
DEV = torch.device("cpu" if DRY else "cuda")
# Qwen2.5-1.5B (its config.json); the dry run keeps the shape's proportions at a toy size
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32_768, rms_norm_eps=1e-6)
TOY = dict(QWEN_1_5B, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=2048)
SHAPE = TOY if DRY else QWEN_1_5B
# stage (e): dialogues per rollout, and the batch whose ratio has a target (the dry run: toy sizes)
THROUGHPUT_BATCHES, TARGET_BATCH, TARGET_RATIO = ((2, 4, 8), 4, 0.85) if DRY else ((8, 64, 256), 64, 0.85)


def world_and_tokenizer(n_logs=64):
    logs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(n_logs)]
    texts = [t["text"] for r in logs for t in r["turns"]] + list(shop.INSTRUCTIONS.values())
    tok = lm.train_tokenizer(texts, shop.STRATEGIES, 1024)
    return logs, tse.event_values(logs, shop.SUCCESS_EVENTS), tok


def tiny_pair(tok, seed=0):
    models = []
    for s in (seed, seed + 1):
        m = lm.build_tiny_model(tok, 64, 2, 2, seed=s)
        lm.add_strategy_tokens(m, tok, shop.STRATEGIES)
        models.append(m.eval())
    return models


def stage_a():
    """Device checks, each against the CPU or the plain reference."""
    logs, values, tok = world_and_tokenizer()
    cpu_e, cpu_a = tiny_pair(tok)
    dev_e, dev_a = copy.deepcopy(cpu_e).to(DEV), copy.deepcopy(cpu_a).to(DEV)
    ids_z = [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in shop.STRATEGIES]
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS) for r in logs[:8]]
    batch = expert_lib.collate(trajs, tok.pad_token_id, len(shop.STRATEGIES))
    with torch.no_grad():
        fast = expert_lib.decision_logps(dev_e, batch, ids_z).cpu()
        slow = expert_lib.decision_logps(cpu_e, batch, ids_z)
    check("strategy-row scoring on the device equals CPU", (fast - slow).abs().max() < 1e-3)
    recs = [{"agent_ids": serialize.encode_dialogue(tok, r["turns"], shop.INSTRUCTIONS)[0],
             "replies": serialize.encode_dialogue(tok, r["turns"], shop.INSTRUCTIONS)[2]} for r in logs[:8]]
    ids, attn, mask = flat.flat_batch(recs, tok.pad_token_id)
    with torch.no_grad():
        chunked = lm.target_logps(dev_a, ids, attn, mask, chunk=64).cpu()
        full = lm.token_logps(lm.forward_logits(cpu_a, ids, attn), ids) * mask[:, 1:]
    check("chunked reply log-probs on the device equal the full logits on CPU", (chunked - full).abs().max() < 1e-3)
    scen = [shop.make_scenario(s) for s in data.train_seeds(8, offset=5000)]
    whole = rollout_lib.rollout((dev_e, tok), (dev_a, tok), scen, seed=4, max_reply_tokens=12)
    halves = [rollout_lib.ExpertDialogues((dev_e, tok), (dev_a, tok), scen[i::2], shop, seed=4,
                                          index=list(range(8))[i::2]).play(False, 0.7, 12) for i in (0, 1)]
    check("sampled dialogues do not depend on the batch split",
          all(t["record"]["turns"] == halves[i % 2][i // 2]["record"]["turns"] for i, t in enumerate(whole)))
    greedy_dev = rollout_lib.rollout((dev_e, tok), (dev_a, tok), scen, greedy=True, max_reply_tokens=12)
    greedy_cpu = rollout_lib.rollout((cpu_e, tok), (cpu_a, tok), scen, greedy=True, max_reply_tokens=12)
    same = sum(a["record"]["turns"] == b["record"]["turns"] for a, b in zip(greedy_dev, greedy_cpu))
    print(f"greedy dialogues identical on {DEV.type} and CPU: {same}/8 (float rounding may flip a near-tie)")
    check("most greedy dialogues are the same on the device as on CPU", same >= 6)


def predicted_gb(n_params, tokens, layers, d, grad_ckpt):
    """docs/scaling.md, one process, bf16 autocast, both agents of P parameters on one GPU: fp32
    weights of both (8P bytes), fp32 AdamW moments of both (16P), the fp32 gradients of the one
    being updated (4P, freed after its step): 28P; plus the activations of the largest training
    forward, about 34 d bytes per token and layer without checkpointing (bf16, Korthikanti et al.
    2022, SDPA attention) and 4 d (the fp32 block input) with it; plus the chunked output layer's
    fp32 (1024, V) logits, their softmax and gradient."""
    states = 28 * n_params
    acts = tokens * layers * d * (4 if grad_ckpt else 34)
    head = 3 * 1024 * 151_936 * 4
    return (states + acts + head) / 1e9


def qwen_pair(tok, grad_ckpt=False):
    """(expert, agent): the Qwen2.5-1.5B shape (TOY in the dry run) from its config, random fp32
    weights on the device, the strategy tokens added; the agent a copy of the expert."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    expert_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(DEV)
    lm.add_strategy_tokens(expert_model, tok, shop.STRATEGIES)
    agent_model = copy.deepcopy(expert_model)
    for m in (expert_model, agent_model):
        if grad_ckpt:
            lm.activation_checkpointing(m)
        m.eval()
    return expert_model, agent_model


def stage_c(grad_ckpt):
    """A Qwen2.5-1.5B-shaped model as both agents: GOPO iteration, PPO step, greedy eval."""
    torch.manual_seed(0)
    logs, values, tok = world_and_tokenizer()
    expert_model, agent_model = qwen_pair(tok, grad_ckpt)
    n = lm.n_params(expert_model)
    args = SimpleNamespace(k=4, alpha=0.5, beta=0.5, nll_coef=0.1, delta=0.0, max_pairs=4, listwise=False,
                           gopo_epochs=1, agent_temperature=0.7, cs_samples=8, beta_cs=0.1, max_reply_tokens=32,
                           kl_coef=0.02, clip=0.2, gae_lambda=1.0, vf_coef=0.5, ppo_epochs=1, ppo_minibatch=4, ref="rollout",
                           rollouts="independent", branch_at="entropy", segment=0)
    scen = [shop.make_scenario(s) for s in data.train_seeds(2, offset=3000)]     # 8 dialogues: fits 80 GB
    opt_e = torch.optim.AdamW(expert_model.parameters(), lr=1e-6, weight_decay=0.0)
    opt_a = torch.optim.AdamW(agent_model.parameters(), lr=1e-7, weight_decay=0.0)
    reset_peak()
    with lm.autocast(DEV, True):
        t0 = time.time()
        trajs = rollout_lib.rollout((expert_model, tok), (agent_model, tok), [s for s in scen for _ in range(args.k)],
                                    seed=1, max_reply_tokens=32)
        sync()
        t_roll = time.time() - t0
        emitted = sum(e - s for t in trajs for s, e in t["replies"])
        models, opts = {"expert": (expert_model, tok), "agent": (agent_model, tok)}, {"expert": opt_e, "agent": opt_a}
        m = gopo.iteration(models, opts, scen, values, shop, args, 0, seed=0)
        sync()
    tokens = max(len(t["ids"]) for t in trajs) * len(trajs)
    peak_gopo = peak_gb()
    check("GOPO iteration ran with finite losses", m["loss"] is not None and m["loss"] == m["loss"])
    reset_peak()
    with lm.autocast(DEV, True):   # --rollouts branch: K - 1 continuations from copied contexts, prefilled on the device
        mb = gopo.iteration(models, opts, scen, values, shop, SimpleNamespace(**{**vars(args), "rollouts": "branch"}),
                            1, seed=1)
        sync()
    check("GOPO iteration with --rollouts branch ran with finite losses",
          mb["pairs"] == 0 or (mb["loss"] is not None and mb["loss"] == mb["loss"]))
    print(f"GOPO --rollouts branch: iteration {mb['seconds']:.1f} s (pairs {mb['pairs']}) against {m['seconds']:.1f} s "
          f"independent, peak {peak_gb():.1f} GB")
    print(f"GOPO: rollout {emitted} reply tokens in {t_roll:.1f} s = {emitted / t_roll:.0f} tokens/s "
          f"({len(trajs)} dialogues, {DEV.type}); iteration {m['seconds']:.1f} s (pairs {m['pairs']}, cs_pairs {m['cs_pairs']}); "
          f"peak {peak_gopo:.1f} GB, predicted {predicted_gb(n, tokens, SHAPE['num_hidden_layers'], SHAPE['hidden_size'], grad_ckpt):.1f} GB "
          f"({n / 1e9:.2f}B parameters per model, ~{tokens} padded training tokens)")
    # the PPO step on the CS Agent as the flat agent (its reference a frozen copy, as train.py does)
    del opt_e, expert_model, models, opts
    ref = copy.deepcopy(agent_model).eval()
    head = ppo.ValueHead(agent_model.config.hidden_size).to(DEV)
    opt = torch.optim.AdamW([*agent_model.parameters(), *head.parameters()], lr=1e-7, weight_decay=0.0)
    reset_peak()
    with lm.autocast(DEV, True):
        m = ppo.ppo_iteration(agent_model, head, ref, tok, opt, scen, values, shop, args, 0, seed=0)
        sync()
    check("PPO step ran with finite losses", m["loss"] is not None and m["loss"] == m["loss"])
    print(f"PPO: one iteration ({len(scen) * args.k} dialogues, 1 epoch) {m['seconds']:.1f} s, peak {peak_gb():.1f} GB")
    del ref, opt, head
    with lm.autocast(DEV, True):
        t0 = time.time()
        evals = rollout_lib.rollout((agent_model, tok), (agent_model, tok), scen, greedy=True, max_reply_tokens=32)
        sync()
    check("greedy eval dialogues ran", len(evals) == len(scen))
    print(f"eval: {len(scen)} greedy dialogues in {time.time() - t0:.1f} s")


def stage_e():
    """Rollout throughput against its floor: at each batch of THROUGHPUT_BATCHES dialogues, the
    repo's sampled rollout (rollout.rollout, as in stage (c): Expert decisions, CS Agent replies,
    the simulated customer, the KV cache kept across turns), then a bare HF `model.generate` of the
    CS Agent alone at the same batch, from the same first prompts (each dialogue's opening up to its
    first reply), to the same final lengths (as many new tokens per row as the dialogues grew on
    average: min_new_tokens = max_new_tokens, so no row stops early), greedy (the cheapest decode).
    Both in single-process bf16 autocast over fp32 weights, on the same device. Prints each one's
    tokens/s (the rollout's: the reply tokens it sampled; generate's: every token it decoded) and
    their ratio; the target is a ratio >= TARGET_RATIO at TARGET_BATCH dialogues (a measure, so a
    miss is printed, not failed)."""
    torch.manual_seed(0)
    _, _, tok = world_and_tokenizer()
    expert_model, agent_model = qwen_pair(tok)

    def play(n, offset=4000):
        scen = [shop.make_scenario(s) for s in data.train_seeds(n, offset=offset)]
        sync()
        t0 = time.time()
        with lm.autocast(DEV, True), torch.no_grad():
            trajs = rollout_lib.rollout((expert_model, tok), (agent_model, tok), scen, seed=1, max_reply_tokens=32)
        sync()
        return trajs, time.time() - t0

    def generate(prompts, new):
        width = max(len(p) for p in prompts)      # left-padded, as generate expects for a decoder
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=DEV)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEV)
        sync()
        t0 = time.time()
        with lm.autocast(DEV, True), torch.no_grad():
            out = agent_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        sync()
        return out.shape[1] - width, time.time() - t0

    trajs, _ = play(2, offset=3900)             # warm-up: kernels, allocator, first-call overheads
    generate([t["agent_ids"][:t["replies"][0][0]] for t in trajs], 4)
    ratio_at_target = None
    for n in THROUGHPUT_BATCHES:
        trajs, t_roll = play(n)
        emitted = sum(e - s for t in trajs for s, e in t["replies"])
        prompts = [t["agent_ids"][:t["replies"][0][0]] for t in trajs]     # start, opening, first strategy prompt
        final = [len(t["agent_ids"]) for t in trajs]
        new = round(sum(f - len(p) for f, p in zip(final, prompts)) / n)
        made, t_gen = generate(prompts, new)
        check(f"model.generate decoded all {new} tokens per row at {n} dialogues", made == new)
        roll_tps, gen_tps = emitted / t_roll, n * new / t_gen
        ratio = roll_tps / gen_tps
        if n == TARGET_BATCH:
            ratio_at_target = ratio
        print(f"{n:4d} dialogues: rollout {emitted} reply tokens in {t_roll:.1f} s = {roll_tps:.0f} tokens/s; "
              f"model.generate {n} x {new} tokens (first prompts {sum(map(len, prompts)) / n:.0f}, final lengths "
              f"{sum(final) / n:.0f} tokens on average) in {t_gen:.1f} s = {gen_tps:.0f} tokens/s; ratio {ratio:.2f}")
    print(f"target (rollout / generate tokens/s >= {TARGET_RATIO} at {TARGET_BATCH} dialogues): "
          f"{'met' if ratio_at_target >= TARGET_RATIO else 'missed'} ({ratio_at_target:.2f})"
          + (" [dry run: toy model on CPU, not a measurement]" if DRY else ""))


def check(what, ok):
    print(("ok    " if ok else "FAILED ") + what, flush=True)
    if not ok:
        sys.exit(1)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else float("nan")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stage = sys.argv[1]
    if stage == "a":
        stage_a()
    elif stage == "c":
        stage_c(grad_ckpt=len(sys.argv) > 2 and sys.argv[2] == "--grad-ckpt")
    elif stage == "e":
        stage_e()
    else:
        sys.exit(f"gpu_check.py: unknown stage {stage!r}")
