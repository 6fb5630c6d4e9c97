"""The dialogue loop: Expert + CS Agent against simulated customers, all dialogues in lockstep.

At agent turn t, for every dialogue still running: the Expert picks z_t from one forward over its
context (SOP-masked), the CS Agent writes y_t for (h_t, z_t), the customer reads y_t and answers
with an utterance and an event. Finished dialogues leave the batch. Each model keeps its own
token context (the two may use different tokenizers); the Expert's context is exactly what
`expert.decision_logps` later scores, and the log-prob of each sampled decision is recorded here:
these are the reference log-probs of GOPO's loss (DESIGN §4), so no reference model is kept.
"""
import torch

import expert as expert_lib
import agent as agent_lib
import lm
import shop


def rollout(expert_model, agent_model, tok_e, tok_a, scenarios, world=shop, greedy=False, seed=0,
            agent_temperature=0.7, horizon=None, max_reply_tokens=32):
    """Play one dialogue per scenario. Returns a list of trajectories (dicts):

      record: the dialogue in the common schema (plus order_value),
      ids: the Expert's token ids, decisions: [(strategy-token position, strategy index)],
      allowed: (T, Z) SOP masks, ref_logps: [log pi_E(z_t|h_t) at sampling time],
      agent_ids: the CS Agent's token ids, replies: [(start, end)] reply spans in agent_ids.
    """
    horizon = horizon or world.HORIZON
    strategies = world.STRATEGIES
    strategy_ids = [tok_e.convert_tokens_to_ids(lm.strategy_token(z)) for z in strategies]
    gen = torch.Generator().manual_seed(seed)
    n = len(scenarios)
    customers = [world.Customer(s, seed=seed * 1_000_003 + i) for i, s in enumerate(scenarios)]
    opening = [c.opening() for c in customers]
    trajs = [{"turns": [{"role": "customer", "text": o, "strategy": None, "event": None}],
              "ids": [tok_e.bos_token_id] + lm.customer_ids(tok_e, o),
              "agent_ids": [tok_a.bos_token_id] + lm.customer_ids(tok_a, o),
              "decisions": [], "ref_logps": [], "replies": []} for o in opening]
    live = list(range(n))
    for t in range(horizon):
        if not live:
            break
        prevs = [strategies[trajs[i]["decisions"][-1][1]] if t > 0 else None for i in live]
        z, logp = expert_lib.decide(expert_model, [trajs[i]["ids"] for i in live], prevs, strategies,
                                    world.SOP, strategy_ids, tok_e.pad_token_id, greedy, gen)
        names = [strategies[k] for k in z.tolist()]
        prompts, replies, texts = agent_lib.write(
            agent_model, tok_a, [trajs[i]["agent_ids"] for i in live], names, world.INSTRUCTIONS,
            max_reply_tokens, 0.0 if greedy else agent_temperature, gen)
        still = []
        for j, i in enumerate(live):
            tr = trajs[i]
            tr["decisions"].append((len(tr["ids"]), z[j].item()))
            tr["ref_logps"].append(logp[j].item())
            tr["ids"] += lm.agent_prompt_ids(tok_e, names[j], world.INSTRUCTIONS[names[j]]) + \
                lm.reply_ids(tok_e, texts[j])
            tr["replies"].append((len(prompts[j]), len(prompts[j]) + len(replies[j])))
            tr["agent_ids"] = prompts[j] + replies[j]
            utterance, event, done = customers[i].reply(texts[j], t)
            tr["turns"].append({"role": "agent", "text": texts[j], "strategy": names[j], "event": None})
            tr["turns"].append({"role": "customer", "text": utterance, "strategy": None, "event": event})
            tr["ids"] += lm.customer_ids(tok_e, utterance)
            tr["agent_ids"] += lm.customer_ids(tok_a, utterance)
            if not done and world.SOP[names[j]]:  # nothing may follow `close`: the dialogue ends
                still.append(i)
        live = still
    out = []
    for s, c, tr in zip(scenarios, customers, trajs):
        zs = [strategies[k] for _, k in tr["decisions"]]
        tr["allowed"] = expert_lib.sop_mask([None] + zs[:-1], strategies, world.SOP)
        tr["record"] = world.record(s, tr.pop("turns"), c, source="rollout")
        out.append(tr)
    return out
