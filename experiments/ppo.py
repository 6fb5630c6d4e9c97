"""PPO, the paper's flat baseline: token-level PPO on the flat agent (experiments/flat.py).

One causal LM (the *flat agent*: SFT on the same logged
  replies, but its prompt has no strategy token and no instruction, serialize.flat_prompt_ids) writes each
  reply from the history, and token-level PPO trains it. Our choices, where the paper is silent:
    * the policy is the sampling distribution of the rollouts, softmax(logits / T) with T =
      --agent-temperature, so the importance ratios are exact (on-policy up to the epochs);
    * a linear value head on the LM's last hidden state (shared trunk), V(s) before each reply token;
    * rewards on the last token of each reply: r_t = gamma^(t-1) v(e_t) / D, and at the last reply
      also the outcome's share of the padded horizon (`turn_rewards`), so that the undiscounted
      return of a dialogue is exactly its TSE (tse.tse), the metric it is evaluated on;
    * minus a per-token KL penalty to the frozen SFT flat agent folded into the rewards
      (kl_shaped_rewards, as in Ouyang et al. 2022); GAE(gamma=1, lambda) over the reply tokens of a
      dialogue (customer tokens are the environment), lambda = 1 by default (the Monte Carlo
      return minus V): the outcome sits 100+ tokens after the decisive words of a dialogue, and
      lambda = 0.95 let almost none of it reach them (0.95^100 < 0.01) before V had learned;
      advantages whitened over the batch;
    * the clipped surrogate (Schulman et al. 2017) + 0.5 x squared value error, a few epochs of
      minibatches per iteration, gradient norm clipped at 1.
"""
import random
import time

import torch

import gopo
import lm
import tse
from experiments import flat


# ----------------------------------------------------------------------------- PPO math (pure functions)
def gae(rewards, state_values, gamma=1.0, lam=0.95):
    """Generalised advantage estimation along one sequence.

    rewards (T,), state_values (T + 1,) with state_values[T] the bootstrap value after the last step (0 at the end
    of a dialogue). delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages (T,), returns (T,) = advantages + state_values[:T]).
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * state_values[t + 1] - state_values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + state_values[:T]


def ppo_clip_loss(logp_new, logp_old, advantages, clip=0.2):
    """Clipped surrogate, per token (all (N,)): -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(new - old)."""
    ratio = torch.exp(logp_new - logp_old)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


def kl_shaped_rewards(rewards, logp_policy, logp_ref, beta):
    """Per-token rewards minus beta times the sampled KL estimate log pi(a) - log pi_ref(a) (all (T,)):
    tokens the policy likes more than the SFT model pay a penalty, tokens it likes less earn a bonus."""
    return rewards - beta * (logp_policy - logp_ref)


# ----------------------------------------------------------------------------- rewards of one dialogue
def turn_rewards(rec, event_values, horizon, gamma=0.9):
    """PPO's per-turn rewards (T,), whose sum is exactly TSE(tau):
    r_t = gamma^(t-1) v_t / D for t = 1..T, plus at t = T the outcome's share of the horizon,
    sum_{t=T+1..H} gamma^(t-1) v_t / D, with D = sum_{t=1..H} gamma^(t-1)."""
    v, T = tse.turn_values(rec, event_values, horizon)
    D = sum(gamma ** t for t in range(horizon))
    r = [gamma ** t * v[t] / D for t in range(T)]
    if T:
        r[-1] += sum(gamma ** t * v[t] for t in range(T, horizon)) / D
    return r


def token_rewards(trajs, event_values, horizon, L):
    """(B, L-1) rewards aligned with token_logps_values' targets: each turn's `turn_rewards` on the
    target index of its reply's last token (<|eot|>, at position end - 1), 0 elsewhere."""
    rewards = torch.zeros(len(trajs), L - 1)
    for b, tr in enumerate(trajs):
        for (_, end), r in zip(tr["replies"], turn_rewards(tr["record"], event_values, horizon)):
            rewards[b, end - 2] = r
    return rewards


class ValueHead(torch.nn.Module):
    """V(s) = w . h + b on the LM's last hidden state h (d,), zero-initialised (V = 0 at the start)."""

    def __init__(self, d):
        super().__init__()
        self.linear = torch.nn.Linear(d, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return self.linear(h)


# ----------------------------------------------------------------------------- one iteration
def ppo_iteration(model, value_head, ref_model, tok, opt, scenarios, event_values, world, args, it, seed):
    """Rollout -> per-token rewards, KL shaping, GAE -> a few epochs of clipped PPO. One metrics line."""
    t0 = time.time()
    trajs = flat.flat_rollout((model, tok), scenarios, world, args, seed)
    ids, attn, mask = (x.to(model.device) for x in flat.flat_batch(trajs, tok.pad_token_id))
    act = mask[:, 1:].bool()                                       # (B, L-1): target index j predicts ids[:, j+1]
    T = args.agent_temperature
    size = getattr(args, "device_batch_size", None)      # --device-batch-size: at most this many rows per forward
    with torch.no_grad():
        if size:
            parts = [flat.token_logps_values(model, value_head, ids[i:i + size], attn[i:i + size], mask[i:i + size], T)
                     for i in range(0, len(trajs), size)]
            old_logps, old_values = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            ref_logps = torch.cat([flat.token_logps_values(ref_model, None, ids[i:i + size], attn[i:i + size],
                                                           mask[i:i + size], T)[0] for i in range(0, len(trajs), size)])
        else:
            old_logps, old_values = flat.token_logps_values(model, value_head, ids, attn, mask, T)   # (B, L-1) each
            ref_logps, _ = flat.token_logps_values(ref_model, None, ids, attn, mask, T)
    rewards = token_rewards(trajs, event_values, world.HORIZON, ids.shape[1]).to(model.device)  # (B, L-1)
    shaped = kl_shaped_rewards(rewards, old_logps, ref_logps, args.kl_coef)
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(len(trajs)):      # GAE over this dialogue's reply tokens only; V = 0 after the end
        j = act[b].nonzero().squeeze(1)
        a, g = gae(shaped[b, j], torch.cat([old_values[b, j], old_values.new_zeros(1)]), 1.0, args.gae_lambda)
        adv[b, j], ret[b, j] = a, g
    adv = torch.where(act, (adv - adv[act].mean()) / (adv[act].std() + 1e-8), adv)     # whitened
    both = torch.nn.ModuleList([model, value_head])
    rng = random.Random(seed)
    model.train()
    pg_losses, v_losses, skipped = [], [], 0
    for _ in range(args.ppo_epochs):
        order = list(range(len(trajs)))
        rng.shuffle(order)
        for i in range(0, len(order), args.ppo_minibatch):
            mb = torch.tensor(order[i:i + args.ppo_minibatch], device=model.device)
            m = act[mb]
            if size:
                ok, pg, vf = micro_step(both, opt, model, value_head, ids, attn, mask, act, old_logps, adv, ret, mb,
                                        size, args)
                if ok:
                    pg_losses.append(pg)
                    v_losses.append(vf)
                else:
                    skipped += 1
                continue
            new_logps, new_values = flat.token_logps_values(model, value_head, ids[mb], attn[mb], mask[mb], T)
            pg = ppo_clip_loss(new_logps[m], old_logps[mb][m], adv[mb][m], args.clip).mean()
            vf = 0.5 * (new_values[m] - ret[mb][m]).pow(2).mean()
            if lm.guarded_step(both, opt, pg + args.vf_coef * vf):
                pg_losses.append(pg.item())
                v_losses.append(vf.item())
            else:
                skipped += 1
    model.eval()
    kl = ((old_logps - ref_logps)[act]).mean().item()
    scores = [gopo.joint_reward(tr["record"], event_values, world.HORIZON, args.alpha) for tr in trajs]
    return {"iter": it, **flat.rollout_metrics(trajs, scores, world, t0, loss=tse.mean(pg_losses) if pg_losses else None,
                                               value_loss=tse.mean(v_losses) if v_losses else None, kl=kl,
                                               nonfinite_steps=skipped)}


def micro_step(both, opt, model, value_head, ids, attn, mask, act, old_logps, adv, ret, mb, size, args):
    """One PPO minibatch step in micro-batches of `size` dialogues (--device-batch-size): each one's
    token losses summed and divided by the minibatch's token count, so that the parts add up to the
    minibatch's mean losses. Returns (stepped, policy loss, value loss)."""
    n = act[mb].sum()
    pgs, vfs = [], []

    def losses():
        for i in range(0, len(mb), size):
            c = mb[i:i + size]
            m = act[c]
            new_logps, new_values = flat.token_logps_values(model, value_head, ids[c], attn[c], mask[c],
                                                            args.agent_temperature)
            pg = ppo_clip_loss(new_logps[m], old_logps[c][m], adv[c][m], args.clip).sum() / n
            vf = 0.5 * (new_values[m] - ret[c][m]).pow(2).sum() / n
            pgs.append(pg.item())
            vfs.append(vf.item())
            yield pg + args.vf_coef * vf
    ok = lm.guarded_step(both, opt, losses())
    return ok, sum(pgs), sum(vfs)
