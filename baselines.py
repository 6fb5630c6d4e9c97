"""Baselines (work in progress for the baselines issue): the PPO pieces as pure functions.

Only the math is here so far, each tested against an independent formula in tests/test_baselines.py;
`train.py --algo ppo|memento|gopo-noexpert` is not wired yet.

PPO choices (the flat single-agent baseline of the paper): token-level PPO with a value head,
GAE(gamma, lambda) over the reply tokens of a dialogue, the clipped surrogate of Schulman et al.
(2017), and a per-token KL penalty to the SFT model folded into the reward (as in Ouyang et al. 2022).
"""
import torch


def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalised advantage estimation along one sequence.

    rewards (T,), values (T + 1,) with values[T] the bootstrap value after the last step (0 at the end
    of a dialogue). delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages (T,), returns (T,) = advantages + values[:T]).
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + values[:T]


def ppo_clip_loss(logp_new, logp_old, advantages, clip=0.2):
    """Clipped surrogate, per token (all (N,)): -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(new - old)."""
    ratio = torch.exp(logp_new - logp_old)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


def kl_shaped_rewards(rewards, logp_policy, logp_ref, beta):
    """Per-token rewards minus beta times the sampled KL estimate log pi(a) - log pi_ref(a) (all (T,)):
    tokens the policy likes more than the SFT model pay a penalty, tokens it likes less earn a bonus."""
    return rewards - beta * (logp_policy - logp_ref)
