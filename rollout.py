"""The dialogue loop: Expert + CS Agent against simulated customers, all dialogues in lockstep.

At agent turn t, for every dialogue still running: the Expert picks z_t from the next-token logits
at the end of its context (SOP-masked), the CS Agent writes y_t for (h_t, z_t), the customer reads
y_t and answers with an utterance and an event. Finished dialogues leave the batch.

Each model keeps its own `engine.Context` (the two may use different tokenizers) with its KV cache
kept across turns: the forward that encodes the last turn (reply + customer utterance) is the one
whose final logits give the next decision, and the CS Agent encodes only the customer's utterance
and the strategy prompt before writing. A turn costs its new tokens, not the history again.

The Expert's context is exactly what `expert.decision_logps` later scores, and the log-prob of
each sampled decision is recorded here (`ref_logps`). GOPO's reference S_ref is that scoring
forward itself, taken before the first step (gopo.expert_loss), so no reference model is kept;
the recorded values equal it up to float rounding (tested, in bf16 too).
"""
import torch

import engine
import expert as expert_lib
import lm
import parallel
import shop


def rollout(expert_model, agent_model, tok_e, tok_a, scenarios, world=shop, greedy=False, seed=0,
            agent_temperature=0.7, horizon=None, max_reply_tokens=32, cache=True, index=None, choose=None):
    """Play one dialogue per scenario. Returns a list of trajectories (dicts):

      record: the dialogue in the common schema (plus order_value),
      ids: the Expert's token ids, decisions: [(strategy-token position, strategy index)],
      allowed: (T, Z) SOP masks, ref_logps: [log pi_E(z_t|h_t) at sampling time],
      agent_ids: the CS Agent's token ids, replies: [(start, end)] reply spans in agent_ids.
    cache=False re-encodes every history each turn (the reference path; same dialogues).
    index: each dialogue's number in the whole batch (default 0..n-1). Its customer and its random
    stream are seeded by (seed, index) alone, so a dialogue comes out the same whatever batch it is
    played in: one process, or a share of the batch on each of several ranks.
    Baselines (experiments/baselines.py):
      expert_model=None: a flat agent, the CS Agent model writing each reply straight from the
        history (lm.flat_prompt_ids, no strategy); a turn's strategy in the record is the act the
        world recognises in the reply, and there are no decisions, ids or SOP masks;
      choose(turns, allowed, logps, uniforms) -> (B,) strategy indices: decisions made by something
        else than the Expert's argmax/sample (Memento's case bank), given each live dialogue's turns
        so far, the SOP masks (B, Z), the Expert's masked log-probs (B, Z) and the turn's uniforms
        (B, Z), None when greedy. ref_logps still records the Expert's log-prob of the choice.
    """
    flat = expert_model is None
    horizon = horizon or world.HORIZON
    strategies = world.STRATEGIES
    strategy_ids = None if flat else [tok_e.convert_tokens_to_ids(lm.strategy_token(z)) for z in strategies]
    eot = tok_a.eos_token_id
    index = list(range(len(scenarios))) if index is None else index
    customers = [world.Customer(s, seed=seed * 1_000_003 + i) for i, s in zip(index, scenarios)]
    keys = torch.tensor([seed * 1_000_003 + i for i in index], dtype=torch.int64)   # each dialogue's dice
    assert max_reply_tokens < 1 << 12
    opening = [c.opening() for c in customers]
    expert_ctx = None if flat else engine.Context(
        expert_model, [lm.start_ids(tok_e) + lm.customer_ids(tok_e, o) for o in opening], tok_e.pad_token_id, cache)
    agent_ctx = engine.Context(agent_model, [lm.start_ids(tok_a) + lm.customer_ids(tok_a, o) for o in opening],
                               tok_a.pad_token_id, cache, n_vocab=len(tok_a))
    # the contexts' id lists grow in place, so each trajectory holds its own rows
    trajs = [{"turns": [{"role": "customer", "text": o, "strategy": None, "event": None}],
              "ids": e, "agent_ids": a, "decisions": [], "ref_logps": [], "replies": []}
             for o, e, a in zip(opening, [[] for _ in opening] if flat else expert_ctx.ids, agent_ctx.ids)]
    live = list(range(len(scenarios)))         # dialogue index of each batch row
    for t in range(horizon):
        if not live and parallel.world() == 1:
            break      # distributed: a rank with no dialogue left still joins each turn's gathers
        if flat:
            agent_ctx.extend([lm.flat_prompt_ids(tok_a)] * len(live))
        else:
            histories = [[strategies[k] for _, k in trajs[i]["decisions"]] for i in live]
            with parallel.gathered(expert_model):      # FSDP: one model's full weights at a time
                logits = expert_ctx.logits() if live else None                         # (B, V)
            if live:   # counter (2t) << 12: turn t's decision; (2t + 1) << 12 + s: token s of its reply
                uniforms = None if greedy else engine.uniforms(keys[live].to(logits.device), (2 * t) << 12,
                                                               len(strategies))        # (B, Z)
                allowed = expert_lib.sop_mask(histories, strategies, world.allowed)     # (B, Z)
                if choose is None:
                    z, logp = expert_lib.decide(logits, strategy_ids, allowed, uniforms)
                else:   # one masked distribution, for the chooser and for the recorded log-prob
                    logps = expert_lib.masked_logps(logits, strategy_ids, allowed)      # (B, Z)
                    z = choose([trajs[i]["turns"] for i in live], allowed, logps.cpu(),
                               None if uniforms is None else uniforms.cpu()).to(logps.device)
                    logp = logps.gather(1, z[:, None]).squeeze(1)
                names = [strategies[k] for k in z.tolist()]
                agent_ctx.extend([lm.agent_prompt_ids(tok_a, name, world.INSTRUCTIONS[name]) for name in names])
        starts = [len(ids) for ids in agent_ctx.ids]
        with parallel.gathered(agent_model):
            replies = agent_ctx.sample(eot, max_reply_tokens, 0.0 if greedy else agent_temperature,
                                       keys[live], (2 * t + 1) << 12) if live else []
        keep = []
        for j, i in enumerate(live):
            tr = trajs[i]
            if not replies[j] or replies[j][-1] != eot:   # cut at max_reply_tokens: close the turn
                tr["agent_ids"].append(eot)
            text = tok_a.decode(tr["agent_ids"][starts[j]:-1], skip_special_tokens=True).strip()
            tr["replies"].append((starts[j], len(tr["agent_ids"])))
            utterance, event, done = customers[i].reply(text, t)
            name = world.recognise(text) if flat else names[j]
            tr["turns"].append({"role": "agent", "text": text, "strategy": name, "event": None})
            tr["turns"].append({"role": "customer", "text": utterance, "strategy": None, "event": event})
            tr["agent_ids"] += lm.customer_ids(tok_a, utterance)
            if flat:
                if not done:
                    keep.append(j)
                continue
            tr["decisions"].append((len(tr["ids"]), z[j].item()))
            tr["ref_logps"].append(logp[j].item())
            tr["ids"] += lm.agent_prompt_ids(tok_e, name, world.INSTRUCTIONS[name]) + \
                lm.reply_ids(tok_e, text) + lm.customer_ids(tok_e, utterance)
            if not done and world.allowed(histories[j] + [name]):   # nothing may follow: the dialogue ends
                keep.append(j)
        live = [live[j] for j in keep]
        if not flat:
            expert_ctx.keep(keep)
        agent_ctx.keep(keep)
    out = []
    for s, c, tr in zip(scenarios, customers, trajs):
        zs = [strategies[k] for _, k in tr["decisions"]]
        tr["allowed"] = expert_lib.sop_mask(expert_lib.prefixes(zs), strategies, world.allowed) if not flat else None
        tr["record"] = world.record(s, tr.pop("turns"), c, source="rollout")
        out.append(tr)
    return out
