"""The PPO pieces of baselines.py against independent formulas."""
import pytest
import torch

import baselines


def test_gae_equals_discounted_sum_of_td_errors():
    """A_t = sum_l (gamma lam)^l delta_{t+l}, written out by hand for 3 steps."""
    r = torch.tensor([0.0, 1.0, 2.0])
    v = torch.tensor([0.5, 0.25, 1.0, 0.0])           # V_3 = 0: the dialogue ends
    g, lam = 0.9, 0.8
    d = [r[0] + g * v[1] - v[0], r[1] + g * v[2] - v[1], r[2] + g * v[3] - v[2]]
    expected = torch.tensor([d[0] + g * lam * d[1] + (g * lam) ** 2 * d[2], d[1] + g * lam * d[2], d[2]])
    adv, ret = baselines.gae(r, v, g, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v[:3])


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    r = torch.tensor([1.0, 0.0, 3.0])
    v = torch.tensor([0.2, 0.4, 0.6, 0.0])
    adv, ret = baselines.gae(r, v, gamma=0.5, lam=1.0)
    mc = torch.tensor([1.0 + 0.5 * 0.0 + 0.25 * 3.0, 0.0 + 0.5 * 3.0, 3.0])
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - v[:3])


@pytest.mark.parametrize("ratio,adv,expected", [
    (1.1, 2.0, -2.2),     # inside the clip range: the plain surrogate
    (1.5, 2.0, -2.4),     # positive advantage, ratio above 1 + eps: clipped at 1.2
    (0.5, 2.0, -1.0),     # positive advantage, ratio below 1 - eps: min keeps the unclipped 0.5 * 2
    (1.5, -2.0, 3.0),     # negative advantage, ratio above: min keeps the unclipped (pessimistic) -3
    (0.5, -2.0, 1.6),     # negative advantage, ratio below 1 - eps: clipped at 0.8
])
def test_ppo_clip_inside_and_outside_the_range(ratio, adv, expected):
    old = torch.tensor([-1.0])
    new = old + torch.log(torch.tensor([ratio]))
    loss = baselines.ppo_clip_loss(new, old, torch.tensor([adv]), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([expected]))


def test_clipped_ratio_has_no_gradient():
    new = torch.tensor([0.5], requires_grad=True)      # ratio e^0.5 = 1.65 > 1.2, advantage > 0
    baselines.ppo_clip_loss(new, torch.tensor([0.0]), torch.tensor([1.0])).sum().backward()
    assert new.grad.item() == 0.0


def test_kl_penalty_sign():
    r = torch.tensor([1.0, 1.0])
    shaped = baselines.kl_shaped_rewards(r, logp_policy=torch.tensor([-1.0, -3.0]),
                                         logp_ref=torch.tensor([-2.0, -2.0]), beta=0.5)
    assert shaped[0] < 1.0 < shaped[1]                 # drifting up is penalised, down is rewarded
    torch.testing.assert_close(shaped, torch.tensor([0.5, 1.5]))
