"""The prepared GPU check: what this repo claims about GPUs, run on one. tools/gpu_check.sh calls it.

    python tools/gpu_check.py STAGE            # STAGE: a (device checks), c (a 1.5B-shaped model), l (LoRA) or e (throughput)
    DRY_RUN=1 python tools/gpu_check.py STAGE  # the same code on CPU with a tiny stand-in (the test suite)

(a) device checks on CUDA: the memory-light scoring paths equal the plain ones there, sampled
    dialogues do not depend on the batch split, and greedy dialogues on CUDA equal those on CPU.
(c) a Qwen2.5-1.5B-shaped model built from its config (random weights, nothing downloaded; the
    output layer has Qwen's 151,936 rows, the tokenizer is the run's own BPE, and logits past it are
    cut off as for a real Qwen tokenizer), used as both agents: one GOPO iteration, one PPO step and
    a greedy eval, single-process bf16 (autocast over fp32 weights and AdamW states), with and
    without activation checkpointing. Prints rollout tokens/s, the preference-step time and peak
    GPU memory beside what docs/scaling.md's formulas predict.
(l) LoRA r = 16 on both agents of the same 1.5B-shaped pair, the frozen base in bf16, --grad-ckpt: a
    GOPO iteration's peak GPU memory beside docs/scaling.md's LoRA row (4N + 32 n_lora, activations and
    the output layer on top), and the rollout playing the model itself (no bf16 copy of a LoRA model).
(e) where a rollout's time goes, on the same 1.5B-shaped pair (stage_e lists its sections):
    versions and packed GQA, cold and warm rollouts, warm rollouts at 8/64/256 dialogues (fp32 +
    autocast against the bf16 copy) beside a sampled `generate`, the time split and live rows per
    turn, a decode micro-benchmark with one arm per cost, and a profile of one step.
"""
import contextlib
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
# stage (e): dialogues per rollout and decode batch, the batch with targets, the cold/warm batch; the
# micro-benchmark's prompt length, steps and repeats; the stage's time budget (the dry run: toy sizes)
E_BATCHES, TARGET_BATCH, TARGET_RATIO, COLD_BATCH = ((1, 2), 2, 0.85, 1) if DRY else ((8, 64, 256), 64, 0.85, 8)
E_PROMPT, E_STEPS, E_REPEATS, E_REPLY, E_BUDGET_S = (12, 3, 1, 4, 120) if DRY else (300, 32, 3, 32, 420)
E_COMPILE = not DRY          # torch.compile of the sampler: minutes of CPU compiling, so not in the dry run


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
    being updated (4P, freed after its step), the bf16 rollout copies of both (4P): 32P; plus the activations of the largest training
    forward, about 34 d bytes per token and layer without checkpointing (bf16, Korthikanti et al.
    2022, SDPA attention) and 4 d (the fp32 block input) with it; plus the chunked output layer's
    fp32 (1024, V) logits, their softmax and gradient."""
    states = 32 * n_params
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


def run_args(**more):
    """The settings stages (c) and (l) train with: train.py's GOPO defaults at 8 dialogues, bf16."""
    return SimpleNamespace(k=4, alpha=0.5, beta=0.5, nll_coef=0.1, delta=0.0, max_pairs=4, listwise=False,
                           gopo_epochs=1, agent_temperature=0.7, cs_samples=8, beta_cs=0.1, max_reply_tokens=32,
                           ref="rollout", rollouts="independent", branch_at="entropy", segment=0, bf16=True,
                           fsdp=False, **more)


def stage_c(grad_ckpt):
    """A Qwen2.5-1.5B-shaped model as both agents: GOPO iteration, PPO step, greedy eval."""
    torch.manual_seed(0)
    logs, values, tok = world_and_tokenizer()
    expert_model, agent_model = qwen_pair(tok, grad_ckpt)
    n = lm.n_params(expert_model)
    args = run_args(kl_coef=0.02, clip=0.2, gae_lambda=1.0, vf_coef=0.5, ppo_epochs=1, ppo_minibatch=4)
    scen = [shop.make_scenario(s) for s in data.train_seeds(2, offset=3000)]     # 8 dialogues: fits 80 GB
    opt_e = torch.optim.AdamW(expert_model.parameters(), lr=1e-6, weight_decay=0.0)
    opt_a = torch.optim.AdamW(agent_model.parameters(), lr=1e-7, weight_decay=0.0)
    reset_peak()
    with lm.autocast(DEV, True):
        t_roll = []     # the first rollout of the process pays CUDA's start (the 40-89 tokens/s record); the second is warm
        for _ in range(2):       # the models gopo.iteration plays: --bf16 on a GPU, a bf16 copy of each (lm.rollout_model)
            t0 = time.time()
            trajs = rollout_lib.rollout((lm.rollout_model(expert_model, args), tok), (lm.rollout_model(agent_model, args), tok),
                                        [s for s in scen for _ in range(args.k)], seed=1, max_reply_tokens=32)
            sync()
            t_roll.append(time.time() - t0)
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
    print(f"GOPO: rollout {emitted} reply tokens in {t_roll[0]:.1f} s cold = {emitted / t_roll[0]:.0f} tokens/s, "
          f"{t_roll[1]:.1f} s warm = {emitted / t_roll[1]:.0f} tokens/s ({len(trajs)} dialogues, {DEV.type}, bf16 copies); iteration {m['seconds']:.1f} s (pairs {m['pairs']}, cs_pairs {m['cs_pairs']}); "
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


def stage_l():
    """LoRA r = 16 (all linear layers, the strategy rows) on both agents of the 1.5B shape, the frozen
    base bf16 (lm.place with --bf16), --grad-ckpt: one GOPO iteration, its peak against the formula."""
    import lora
    torch.manual_seed(0)
    logs, values, tok = world_and_tokenizer()
    args = run_args(grad_ckpt=True, lora_r=16, lora_alpha=None, lora_dropout=0.0, lora_targets="all-linear",
                    lora_only=None)
    models = {name: (lm.place(lora.add(m, tok, shop.STRATEGIES, args), args, DEV), tok)
              for name, m in zip(("expert", "agent"), qwen_pair(tok))}
    n = lm.n_params(models["expert"][0])
    n_lora = sum(p.numel() for p in lm.trainable(models["expert"][0]))
    check("only adapters and strategy rows train, the frozen base is bf16",
          all((p.dtype == torch.float32) == p.requires_grad for m, _ in models.values() for p in m.parameters()))
    check("a LoRA model's rollout plays the model itself (no bf16 copy)",
          all(lm.rollout_model(m, args) is m for m, _ in models.values()))
    opts = {name: torch.optim.AdamW(lm.trainable(m), lr=1e-5, weight_decay=0.0) for name, (m, _) in models.items()}
    scen = [shop.make_scenario(s) for s in data.train_seeds(2, offset=3000)]     # 8 dialogues, as stage (c)
    reset_peak()
    with lm.autocast(DEV, True):
        m = gopo.iteration(models, opts, scen, values, shop, args, 0, seed=0)
        sync()
    check("GOPO iteration with LoRA ran with finite losses", m["loss"] is not None and m["loss"] == m["loss"])
    states = (2 * 2 * n + 2 * 16 * n_lora) / 1e9                 # docs/scaling.md: 4N + 16 * 2 * n_lora
    print(f"LoRA r=16: {n_lora / 1e6:.1f}M trainable of {n / 1e9:.2f}B parameters per model; GOPO iteration "
          f"{m['seconds']:.1f} s (pairs {m['pairs']}, cs_pairs {m['cs_pairs']}); peak {peak_gb():.1f} GB against "
          f"4N + 32 n_lora = {states:.1f} GB of weights and states (activations and the output layer on top)")


def stage_e():
    """Where a rollout's time goes on the device (docs/scaling.md, "GPU evidence"; the plan it follows:
    one short script, every section timed, the rest skipped if it runs past E_BUDGET_S). Sections:
      versions  torch, transformers, the GPU; whether transformers packs GQA for one-token queries
      cold/warm the same 8-dialogue rollout twice in this fresh process: the first pays CUDA's start
      rollout  warm rollouts at each of E_BATCHES dialogues, fp32 weights under autocast (the path
               before issue 31) and the bf16 copy (lm.bf16_copy, what --bf16 plays now), beside a bare
               sampled HF `generate` (bf16 weights) at the same batch, from each dialogue's first
               prompt to the same final lengths; the targets: ratio >= TARGET_RATIO and >= 2,000
               reply tokens/s at TARGET_BATCH
      split    at TARGET_BATCH: prefill forwards, decode forwards and the rest (sampler, host work,
               customers), and the live rows and decode steps of each turn (the lockstep tail)
      decode   ms per decode step at each batch, prompts of E_PROMPT tokens, E_STEPS steps, median of
               E_REPEATS after a warm pass: A a bare HF loop (DynamicCache), bf16, greedy; A' sampled
               (softmax + multinomial, as generate); B = A with fp32 weights + autocast; C
               Context.sample bf16 greedy; D the same sampled; E = D with fp32 + autocast; F the
               sampler alone; F' F under torch.compile (where it compiles). B-A: the weight casts;
               D-C: the sampler; C-A: the engine (mask, positions, GrowingLayer)
      profile  torch.profiler over one decode step of E and of A at the smallest and largest batch:
               the top ops, and the device time against the host time (host >= device: launch-bound)"""
    import statistics
    import transformers
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache
    import engine
    t_start = time.time()

    def left(section):
        if time.time() - t_start < E_BUDGET_S:
            return True
        print(f"skipped ({section}): past the {E_BUDGET_S} s budget of this stage")
        return False

    # versions, and packed GQA (transformers >= 5.24 reshapes a one-token query onto the KV heads)
    from transformers.integrations import sdpa_attention
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
          f"device {torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu'}; packed GQA for one-token "
          f"queries: {'yes' if hasattr(sdpa_attention, 'pack_gqa') else 'no (repeat_kv copies K and V)'}; "
          f"done asked every {engine.DONE_CHECK.get(DEV.type, 8)} decode steps")
    torch.manual_seed(0)
    _, _, tok = world_and_tokenizer()
    expert_model, agent_model = qwen_pair(tok)
    fast = {"fp32+autocast": (expert_model, agent_model), "bf16 copy": (lm.bf16_copy(expert_model), lm.bf16_copy(agent_model))}
    print(f"models built in {time.time() - t_start:.0f} s ({lm.n_params(agent_model) / 1e9:.2f}B parameters each)")

    def play(arm, n, offset=4000):
        scen = [shop.make_scenario(s) for s in data.train_seeds(n, offset=offset)]
        e, a = fast[arm]
        sync()
        t0 = time.time()
        with lm.autocast(DEV, True), torch.no_grad():
            trajs = rollout_lib.rollout((e, tok), (a, tok), scen, seed=1, max_reply_tokens=E_REPLY)
        sync()
        return trajs, time.time() - t0

    def replies(trajs):
        return sum(e - s for t in trajs for s, e in t["replies"])

    # cold, then warm: the first rollout of this process pays CUDA's context, kernels and allocator
    for what in ("cold", "warm"):
        trajs, t = play("bf16 copy", COLD_BATCH, offset=3000)
        print(f"{what}: {COLD_BATCH} dialogues (bf16 copy) {replies(trajs)} reply tokens in {t:.2f} s = "
              f"{replies(trajs) / t:.0f} tokens/s")

    def generate(prompts, new):
        width = max(len(p) for p in prompts)      # left-padded, as generate expects for a decoder
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=DEV)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEV)
        sync()
        t0 = time.time()
        with torch.no_grad():
            out = fast["bf16 copy"][1].generate(input_ids=ids, attention_mask=attn, max_new_tokens=new,
                                                min_new_tokens=new, do_sample=True, temperature=0.7, top_k=0,
                                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        sync()
        return out.shape[1] - width, time.time() - t0

    for n in E_BATCHES:
        if not left(f"rollout at {n}"):
            break
        line = []
        for arm in fast:
            trajs, t = play(arm, n)
            line.append(f"{arm} {replies(trajs) / t:.0f}")
        prompts = [t["agent_ids"][:t["replies"][0][0]] for t in trajs]     # start, opening, first strategy prompt
        new = round(sum(len(t["agent_ids"]) - len(p) for t, p in zip(trajs, prompts)) / n)
        generate(prompts, 2)
        made, t_gen = generate(prompts, new)
        check(f"generate decoded all {new} tokens per row at {n} dialogues", made == new)
        roll, gen = replies(trajs) / t, n * new / t_gen
        print(f"{n:4d} dialogues: rollout {replies(trajs)} reply tokens, tokens/s: {', '.join(line)}; sampled "
              f"generate (bf16) {n} x {new} tokens = {gen:.0f} tokens/s; ratio {roll / gen:.2f} (bf16 copy)")
        if n == TARGET_BATCH:
            print(f"target at {n} dialogues, warm, bf16 copy: ratio {roll / gen:.2f} >= {TARGET_RATIO}: "
                  f"{'met' if roll / gen >= TARGET_RATIO else 'missed'}; {roll:.0f} reply tokens/s >= 2000: "
                  f"{'met' if roll >= 2000 else 'missed'}" + (" [dry run: toy model on CPU, not a measurement]" if DRY else ""))

    # how often to ask whether every row is done: each ask is a host sync, each step past the end a wasted forward
    if left("done check"):
        rates = []
        for every in (1, 4, 8):
            with patched(engine.DONE_CHECK, DEV.type, every):
                trajs, t = play("bf16 copy", TARGET_BATCH)
            rates.append(f"every {every} steps {replies(trajs) / t:.0f}")
        print(f"done check at {TARGET_BATCH} dialogues (bf16 copy), reply tokens/s: {', '.join(rates)} "
              f"(engine.DONE_CHECK[{DEV.type!r}] = {engine.DONE_CHECK.get(DEV.type, 8)})")

    # where a rollout's time goes, and the live rows of each turn (a separate, synced pass)
    if left("split"):
        spent, turns = {"prefill": 0.0, "decode": 0.0}, []
        logits, sample = engine.Context.logits, engine.Context.sample

        def timed_logits(self, appended=None, rows=None):
            sync()
            t0 = time.time()
            out = logits(self, appended, rows)
            sync()
            spent["decode" if appended is not None else "prefill"] += time.time() - t0
            return out

        def counted_sample(self, *args, **kwargs):
            out = sample(self, *args, **kwargs)
            turns.append((len(out), max(map(len, out))))
            return out
        engine.Context.logits, engine.Context.sample = timed_logits, counted_sample
        try:
            for arm in fast:
                spent.update(prefill=0.0, decode=0.0)
                turns.clear()
                trajs, t = play(arm, TARGET_BATCH)
                rest = t - spent["prefill"] - spent["decode"]
                print(f"split at {TARGET_BATCH} dialogues, {arm}: {t:.2f} s = prefill {spent['prefill']:.2f} + decode "
                      f"{spent['decode']:.2f} + the rest {rest:.2f} (sampler, host, customers); turns (live rows, "
                      f"tokens of the longest reply): {' '.join(f'{b}x{s}' for b, s in turns)}")
        finally:
            engine.Context.logits, engine.Context.sample = logits, sample

    # decode micro-benchmark
    def prompts_for(b):
        g = torch.Generator().manual_seed(b)
        return torch.randint(5, len(tok), (b, E_PROMPT), generator=g).tolist()

    def hf_loop(model, b, sampled, autocast):
        ids = torch.tensor(prompts_for(b), device=DEV)

        def run():
            with lm.autocast(DEV, autocast), torch.no_grad():
                cache = {engine.cache_argument(model): DynamicCache()}   # past_key_values (5.17) or cache (5.24)
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
                nxt = out.logits[:, -1].argmax(-1)
                sync()
                t0 = time.time()
                for _ in range(E_STEPS):
                    out = model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1, **cache)
                    logits = out.logits[:, -1].float()
                    nxt = torch.multinomial(torch.softmax(logits / 0.7, -1), 1)[:, 0] if sampled else logits.argmax(-1)
                sync()
                return time.time() - t0
        return run

    def ctx_loop(model, b, temperature, autocast):
        def run():
            with lm.autocast(DEV, autocast), torch.no_grad():
                ctx = engine.Context(model, prompts_for(b), tok.pad_token_id, n_vocab=len(tok))
                ctx.logits()
                ctx.extend([[5]] * b)          # so that sample's first forward is a one-token step too
                sync()
                t0 = time.time()
                ctx.sample(-1, E_STEPS, temperature, torch.arange(b), 0)     # -1: no row ever stops
                sync()
                return time.time() - t0
        return run

    def sampler(x, rows, counter):     # one step of Context.sample's draw at T = 0.7
        return engine.gumbel_argmax(x / 0.7, engine.draw(rows, counter, x.shape[-1]))

    def sampler_alone(b, fn):
        logits = torch.randn(b, len(tok), device=DEV)
        rows = engine.row_keys(torch.arange(b, device=DEV))
        counters = [torch.tensor(c, device=DEV) for c in range(E_STEPS)]   # tensors: one graph for every step

        def run():
            sync()
            t0 = time.time()
            for c in counters:
                fn(logits, rows, c)
            sync()
            return time.time() - t0
        return run

    compiled = [None]

    def compiled_sampler(b):
        """The sampler under torch.compile (one graph, dynamic batch), or None where it does not compile."""
        try:
            compiled[0] = compiled[0] or torch.compile(sampler, dynamic=True)
            compiled[0](torch.randn(b, len(tok), device=DEV), engine.row_keys(torch.arange(b, device=DEV)),
                        torch.tensor(0, device=DEV))
            return compiled[0]
        except Exception as e:       # a compiler missing, an unsupported op: the plain sampler stays
            print(f"F' torch.compile of the sampler failed at batch {b}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return None

    bf16_a, fp32_a = fast["bf16 copy"][1], agent_model
    for b in E_BATCHES:
        if not left(f"decode at {b}"):
            break
        arms = {"A hf bf16 greedy": hf_loop(bf16_a, b, False, False), "A' hf bf16 sampled": hf_loop(bf16_a, b, True, False),
                "B hf fp32+autocast greedy": hf_loop(fp32_a, b, False, True),
                "C ctx bf16 greedy": ctx_loop(bf16_a, b, 0.0, False), "D ctx bf16 sampled": ctx_loop(bf16_a, b, 0.7, False),
                "E ctx fp32+autocast sampled": ctx_loop(fp32_a, b, 0.7, True), "F sampler": sampler_alone(b, sampler)}
        if E_COMPILE:
            fn = compiled_sampler(b)
            if fn is not None:
                arms["F' sampler compiled"] = sampler_alone(b, fn)
        ms = {}
        for name, run in arms.items():
            run()                                                   # warm: kernels, allocator, caches
            ms[name] = 1000 * statistics.median(run() for _ in range(E_REPEATS)) / E_STEPS
        print(f"decode B={b:3d}, {E_PROMPT}-token prompts, ms/step: " + "; ".join(f"{k} {v:.2f}" for k, v in ms.items()))

    # one decode step under the profiler: today's path (E) and the bare loop (A)
    for b in (E_BATCHES[0], E_BATCHES[-1]):
        if not left(f"profile at {b}"):
            break
        for name, model, autocast in (("E ctx fp32+autocast", fp32_a, True), ("A hf bf16", bf16_a, False)):
            with lm.autocast(DEV, autocast), torch.no_grad():
                ctx = engine.Context(model, prompts_for(b), tok.pad_token_id, n_vocab=len(tok))
                logits = ctx.logits()
                step = lambda: ctx.logits((logits.argmax(-1), torch.ones(b, dtype=torch.bool, device=DEV)))  # noqa: E731
                step()
                sync()
                t0 = time.time()
                step()
                t1 = time.time()
                sync()
                wall, enqueue = time.time() - t0, t1 - t0
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    step()
                    sync()
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == DeviceType.CUDA]
            print(f"profile, one decode step, {name}, B={b}: wall {1000 * wall:.2f} ms, enqueued in {1000 * enqueue:.2f} ms "
                  f"(launch-bound where the two are close); kernels {sum(e.count for e in kernels)} busy "
                  f"{sum(e.self_device_time_total for e in kernels) / 1000:.2f} ms; "
                  f"{sum(e.count for e in events if e.device_type == DeviceType.CPU)} host ops")
            print(events.table(sort_by="self_device_time_total" if DEV.type == "cuda" else "self_cpu_time_total",
                               row_limit=6))
    print(f"stage (e) took {time.time() - t_start:.0f} s")


@contextlib.contextmanager
def patched(table, key, value):
    old = table.get(key)
    table[key] = value
    try:
        yield
    finally:
        if old is None:
            table.pop(key)
        else:
            table[key] = old


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
    torch.set_num_threads(1 if DRY else max(1, os.cpu_count() or 1))   # the dry run: a shared CPU (the tests)
    stage = sys.argv[1]
    if stage == "a":
        stage_a()
    elif stage == "c":
        stage_c(grad_ckpt=len(sys.argv) > 2 and sys.argv[2] == "--grad-ckpt")
    elif stage == "l":
        stage_l()
    elif stage == "e":
        stage_e()
    else:
        sys.exit(f"gpu_check.py: unknown stage {stage!r}")
