"""The Expert Agent: pi_E(z_t | h_t), a causal LM whose next token is one of the strategy tokens.

The decision distribution is the LM's next-token distribution restricted to the strategy tokens,
with every strategy the SOP forbids after the previous one set to -inf before the softmax
(docs/design.md). One forward over the serialized dialogue gives every decision of a trajectory, so
scoring a whole dialogue is one pass, not one per turn. The SOP mask is applied in sampling, in
greedy decoding, in SFT and in scoring alike: a forbidden strategy has probability exactly 0.
"""
import random

import torch
import torch.nn.functional as F

import engine
import lm
import parallel
import serialize


def strategy_ids(tok, strategies):
    """The token id of each strategy (serialize.strategy_token), in STRATEGIES order: the Z rows of
    the output layer the Expert reads."""
    return [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in strategies]


def sop_mask(histories, strategies, allowed):
    """Allowed-set mask for each decision: histories, one list of the strategies chosen before it
    per decision; allowed, the world's SOP automaton (strategies so far -> allowed strategies).

    Returns a bool tensor (N, Z): True where allowed.
    """
    index = {z: i for i, z in enumerate(strategies)}
    mask = torch.zeros(len(histories), len(strategies), dtype=torch.bool)
    for n, history in enumerate(histories):
        mask[n, [index[z] for z in allowed(history)]] = True
    return mask


def prefixes(zs):
    """The history before each decision of a strategy sequence: [[], [z1], [z1, z2], ...]."""
    return [zs[:t] for t in range(len(zs))]


def masked_logps(logits, strategy_ids, allowed):
    """log pi_E(. | h) over strategies: logits (..., V), allowed (..., Z) -> (..., Z), -inf if forbidden."""
    return mask_and_normalise(logits[..., strategy_ids].float(), allowed.to(logits.device))


def mask_and_normalise(z_logits, allowed):
    """Strategy logits (..., Z) -> log-probs (..., Z) over the SOP-allowed set, -inf elsewhere."""
    return F.log_softmax(z_logits.masked_fill(~allowed, float("-inf")), -1)


def decision_dists(model, batch, strategy_ids):
    """log pi(. | h_t) over the strategies at every decision of a batch of trajectories, from one forward.

    batch: dict with
      ids (B, L) right-padded token ids, attn (B, L),
      pos (B, T) position of each decision's strategy token (0 where padded),
      z (B, T) index of the taken strategy, allowed (B, T, Z) SOP masks, step_mask (B, T).
    Returns (B, T, Z) log-probs, -inf where the SOP forbids a strategy (padded steps: all allowed).

    The output layer runs only on the Z strategy rows at the T decision positions (lm.head_only):
    (B, T, Z) logits instead of (B, L, V), the same numbers (tested).
    """
    batch = {k: v.to(model.device) for k, v in batch.items()}
    prev = (batch["pos"] - 1).clamp(min=0)                                           # (B, T) predicting positions
    rows = torch.tensor(strategy_ids, device=model.device)

    def strategy_logits(hidden, head):                                               # hidden (B, L, d)
        h = torch.gather(hidden, 1, prev[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, d)
        return lm.head_rows(h, head, rows)                                           # (B, T, Z) fp32
    with lm.head_only(model, strategy_logits):
        z_logits = model(input_ids=batch["ids"], attention_mask=batch["attn"], use_cache=False).logits
    return mask_and_normalise(z_logits, batch["allowed"])                            # (B, T, Z)


def decision_logps(model, batch, strategy_ids):
    """Log-probs of the taken decisions (batch as in decision_dists): step_logps (B, T), zero at padded steps."""
    logps = decision_dists(model, batch, strategy_ids)                               # (B, T, Z)
    z, step_mask = batch["z"].to(logps.device), batch["step_mask"].to(logps.device)
    taken = torch.gather(logps, 2, z[..., None]).squeeze(2)                          # (B, T)
    return torch.where(step_mask, taken, torch.zeros_like(taken))


def entropy(logps):
    """H(pi(. | h)) in nats: logps (..., Z), -inf where the SOP forbids a strategy -> (...,).
    Forbidden strategies add nothing (0 log 0 = 0)."""
    return -torch.where(torch.isfinite(logps), logps.exp() * logps, torch.zeros_like(logps)).sum(-1)


def decision_kl(logps, ref_logps, allowed, step_mask):
    """sum_t KL(pi(. | h_t) || pi_ref(. | h_t)) per trajectory, exact over the Z strategies (Z is
    small, so no sampled estimate is needed): logps, ref_logps (B, T, Z), allowed (B, T, Z),
    step_mask (B, T) -> (B,). Forbidden strategies have probability 0 under both and add nothing."""
    terms = torch.where(allowed, logps.exp() * (logps - ref_logps), torch.zeros_like(logps))   # (B, T, Z)
    return (terms.sum(-1) * step_mask).sum(-1)                                       # (B,)


def collate(trajectories, pad_id, n_strategies):
    """Trajectories (dicts with ids, decisions [(pos, z_index)], allowed (T, Z)) -> a padded batch."""
    ids, attn = lm.pad([t["ids"] for t in trajectories], pad_id)
    T = max(len(t["decisions"]) for t in trajectories)
    B = len(trajectories)
    pos = torch.zeros(B, T, dtype=torch.long)
    z = torch.zeros(B, T, dtype=torch.long)
    allowed = torch.ones(B, T, n_strategies, dtype=torch.bool)
    step_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, t in enumerate(trajectories):
        n = len(t["decisions"])
        pos[b, :n] = torch.tensor([p for p, _ in t["decisions"]])
        z[b, :n] = torch.tensor([zi for _, zi in t["decisions"]])
        allowed[b, :n] = t["allowed"]
        step_mask[b, :n] = True
    return {"ids": ids, "attn": attn, "pos": pos, "z": z, "allowed": allowed, "step_mask": step_mask}


def trajectory_from_record(tok, rec, strategies, allowed, instructions):
    """A logged record -> the Expert's view of it: token ids, decisions, SOP masks. An agent turn
    with a "label" (worlds.relabel) is trained toward the label; its context and every SOP mask stay
    those of the logged strategies."""
    ids, decisions, _ = serialize.encode_dialogue(tok, rec["turns"], instructions)
    index = {z: i for i, z in enumerate(strategies)}
    zs = [z for _, z in decisions]
    targets = [t.get("label", t["strategy"]) for t in rec["turns"] if t["role"] == "agent"]
    return {"ids": ids, "decisions": [(p, index[z]) for (p, _), z in zip(decisions, targets, strict=True)],
            "allowed": sop_mask(prefixes(zs), strategies, allowed)}


@torch.no_grad()
def decide(z_logits, allowed, uniforms=None):
    """One decision per dialogue from the strategy logits at its end.

    z_logits (B, Z): the Z strategy tokens' logits where the strategy token goes (the output layer's
    strategy rows only: engine.Context.logits(rows=...)), allowed (B, Z) SOP masks, uniforms (B, Z)
    in (0, 1) for sampling (Gumbel-max), None for greedy.
    Returns (z indices (B,), log pi_E(z | h) (B,)).
    """
    logps = mask_and_normalise(z_logits.float(), allowed.to(z_logits.device))   # (B, Z)
    if uniforms is None:
        z = logps.argmax(-1)
    else:   # forbidden strategies stay at -inf, so they are never sampled
        z = engine.gumbel_argmax(logps, uniforms)
    return z, logps.gather(1, z[:, None]).squeeze(1)


def sft(model, tok, records, strategies, allowed, instructions, steps, batch_size=16, lr=3e-3, seed=0,
        cycle=100, desc="SFT expert", micro=None):
    """Supervised fine-tuning on logged strategies: minimise -sum_t log pi_E(z_t | h_t) (masked).
    micro: --device-batch-size, at most this many dialogues per forward (lm.micro_batches)."""
    ids = strategy_ids(tok, strategies)
    trajs = [trajectory_from_record(tok, r, strategies, allowed, instructions) for r in records]
    rng = random.Random(seed)

    def step_loss(step):
        sample = rng.sample(trajs, min(batch_size, len(trajs)))                  # the same on every rank
        mine, weight = parallel.share_or_dummy(sample)
        n_decisions = sum(len(t["decisions"]) for t in sample)
        if micro:   # one loss per micro-batch, each backpropagated before the next forward
            return (-weight * w * decision_logps(model, collate(run, tok.pad_token_id, len(strategies)), ids).sum()
                    / parallel.denominator(n_decisions)
                    for run, w in lm.micro_batches(mine, micro, len(sample), length=lambda t: len(t["ids"])))
        logp = sum(decision_logps(model, collate(group, tok.pad_token_id, len(strategies)), ids).sum()
                   for group in lm.length_buckets(mine, n_total=len(sample), length=lambda t: len(t["ids"])))
        return -weight * logp / parallel.denominator(n_decisions)   # mean NLL per decision
    return lm.sft_loop(model, step_loss, steps, lr, cycle, desc)
