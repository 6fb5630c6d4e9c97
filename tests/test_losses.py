"""GOPO's losses against formulas written here independently, at margins away from 0.

The older tests met expert_loss only where S_ref == S (the loss is log 2 whichever way a pair
points), so a winner swapped with its loser passed them. These use a perturbed policy, pairs that
are not (0, 1), a nonzero NLL weight, and compare the gradient too; with the winner and the loser
swapped in gopo.expert_loss, test_expert_loss_matches_a_per_decision_formula fails (shown in the
commit that added this file).
"""
import math
import statistics

import pytest
import torch

import gopo
import tse


def per_decision_loss(steps, ref_steps, n_steps, units, rewards, beta, nll_coef):
    """Eq. (4) written from the decision log-probs up, one pair at a time, with nothing from gopo.py:
    steps, ref_steps: lists of per-decision log-prob lists."""
    total = 0.0
    for w, l in units:
        margin = (sum(steps[w]) - sum(ref_steps[w])) - (sum(steps[l]) - sum(ref_steps[l]))
        total += math.log1p(math.exp(-beta * margin)) + nll_coef * -sum(steps[w]) / n_steps[w]
        assert rewards[w] > rewards[l]
    return total


def plackett_luce(r, R):
    """-log P(the ranking by R) under Plackett-Luce with scores r; tied rewards share a rank (each
    term's denominator holds the item and those strictly below it)."""
    loss = 0.0
    for i in range(len(r)):
        below = [j for j in range(len(r)) if R[j] < R[i]]
        if below:
            loss -= r[i] - math.log(math.exp(r[i]) + sum(math.exp(r[j]) for j in below))
    return loss


def synthetic(seed=0, N=5, T=4):
    g = torch.Generator().manual_seed(seed)
    steps = -2 * torch.rand(N, T, generator=g)                          # log-probs of each decision
    ref = steps + 0.3 * torch.randn(N, T, generator=g)                  # the policy has moved
    mask = torch.ones(N, T)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    return steps, ref, mask


@pytest.mark.parametrize("listwise", [False, True])
def test_expert_loss_matches_a_per_decision_formula(listwise):
    steps, ref, mask = synthetic()
    steps.requires_grad_(True)
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.1])
    units = [[3, 0], [1, 4], [2, 4]] if not listwise else [[0, 1, 2], [3, 4, 2]]
    beta, nll = 0.7, 0.3
    S = gopo.trajectory_logps(steps, mask)
    S_ref = gopo.trajectory_logps(ref, mask)
    losses, terms = gopo.expert_loss(S, S_ref, mask.sum(-1), units, rewards, beta, nll, listwise)
    losses.sum().backward()
    as_lists = lambda x: [[float(v) for v, m in zip(row, mrow) if m] for row, mrow in zip(x, mask)]   # noqa: E731
    st, rf, n = as_lists(steps.detach()), as_lists(ref), mask.sum(-1).tolist()

    def formula(s):   # the summed loss from per-decision log-probs s, written out here
        if not listwise:
            return per_decision_loss(s, rf, n, units, rewards.tolist(), beta, nll)
        out = 0.0
        for u in units:
            r = [beta * (sum(s[i]) - sum(rf[i])) for i in u]
            best = max(u, key=lambda i: float(rewards[i]))
            out += plackett_luce(r, [float(rewards[i]) for i in u]) + nll * -sum(s[best]) / n[best]
        return out
    assert float(losses.detach().sum()) == pytest.approx(formula(st), rel=1e-5)
    # the gradient, by central differences of the independent formula on each decision's log-prob
    eps = 1e-3
    for b, t in [(3, 0), (0, 2), (1, 1), (4, 3), (2, 0), (1, 3)]:
        def f(delta):
            s = [row[:] for row in st]
            if mask[b, t]:
                s[b][t] += delta
            return formula(s)
        numeric = (f(eps) - f(-eps)) / (2 * eps)
        assert float(steps.grad[b, t]) == pytest.approx(numeric, abs=2e-4), (b, t)
    if not listwise:
        w, l = torch.tensor([u[0] for u in units]), torch.tensor([u[1] for u in units])
        torch.testing.assert_close(terms["rewards/chosen"], beta * (S[w] - S_ref[w]).detach())
        torch.testing.assert_close(terms["rewards/rejected"], beta * (S[l] - S_ref[l]).detach())


def test_preference_gradient_at_margin_zero_is_minus_beta_over_2P():
    """With the NLL off, a learning test can only pass through the preference term: at margin 0,
    dL/dS_w = -beta / (2P) and dL/dS_l = +beta / (2P) for the mean over P pairs."""
    S = torch.tensor([-3.0, -5.0, -2.0, -4.0], requires_grad=True)
    beta, units = 0.5, [[0, 1], [2, 3]]
    losses, _ = gopo.expert_loss(S, S.detach(), torch.ones(4), units, torch.tensor([1.0, 0.0, 1.0, 0.0]), beta, 0.0)
    losses.mean().backward()
    torch.testing.assert_close(S.grad, torch.tensor([-1, 1, -1, 1]) * beta / (2 * len(units)))


def test_preference_loss_matches_trls_sigmoid_loss():
    """TRL's DPO sigmoid loss (DPOTrainer, loss_type="sigmoid", label_smoothing 0), written out:
    logits = (pi_c - pi_r) - (ref_c - ref_r); loss = -logsigmoid(beta * logits); chosen_rewards =
    beta (pi_c - ref_c), rejected_rewards = beta (pi_r - ref_r). No TRL import: the formula is the
    contract, and metrics.jsonl logs those names."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-10 * torch.rand(7, generator=g) for _ in range(4))
    beta = 0.1
    losses, chosen, rejected = gopo.preference_loss(pc, pr, rc, rr, beta)
    logits = (pc - pr) - (rc - rr)
    want = [math.log1p(math.exp(-beta * float(x))) for x in logits]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


def test_listwise_ties_share_a_rank():
    """A group whose rollouts all score the same gets no loss and no gradient toward any order; a
    partial tie is scored by the shared-rank formula; distinct rewards are plain Plackett-Luce."""
    pol = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5], [-1.0, -1.2, -0.7]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    R = torch.tensor([[0.5, 0.5, 0.5], [0.7, 0.7, 0.1], [0.2, 0.9, 0.5]])
    beta = 0.7
    got = gopo.listwise_loss(pol, ref, R, beta)
    got[0].backward(retain_graph=True)
    got_ = got.detach()
    assert float(got_[0]) == 0.0 and torch.count_nonzero(pol.grad) == 0
    for n in (1, 2):
        r = [beta * float(pol[n, k] - ref[n, k]) for k in range(3)]
        assert float(got_[n]) == pytest.approx(plackett_luce(r, R[n].tolist()), rel=1e-5)
    # the swapped order of two tied rollouts gives the same loss: no order is preferred among ties
    swapped = gopo.listwise_loss(pol.detach()[[1]][:, [1, 0, 2]], ref[[1]][:, [1, 0, 2]], R[[1]], beta)
    assert float(swapped) == pytest.approx(float(got_[1]), rel=1e-6)


def test_wilson_z_follows_the_level():
    xs = [1] * 30 + [0] * 70
    for level in (0.8, 0.9, 0.95, 0.99):
        z = statistics.NormalDist().inv_cdf((1 + level) / 2)
        p, n = 0.3, 100
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        _, lo, hi = tse.rate_ci(xs, level)
        assert (lo, hi) == pytest.approx((centre - half, centre + half), rel=1e-12)


# ----------------------------------------------------------------------------- the pure loss functions at a glance
def sigmoid_dpo(pc, pr, rc, rr, beta):
    """Textbook DPO loss of one pair, written out with math (Rafailov et al. 2023, eq. 7)."""
    margin = beta * ((pc - rc) - (pr - rr))
    return -math.log(1.0 / (1.0 + math.exp(-margin)))


def test_preference_loss_is_textbook_dpo_on_single_turn_trajectories():
    g = torch.Generator().manual_seed(0)
    B, beta = 16, 0.3
    pc, pr, rc, rr = (-5 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4))
    losses, cr, rj = gopo.preference_loss(pc, pr, rc, rr, beta)
    assert losses.shape == cr.shape == rj.shape == (B,)
    expected = torch.tensor([sigmoid_dpo(*map(float, v), beta) for v in zip(pc, pr, rc, rr)],
                            dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    # the same through trajectory_logps with one decision per trajectory (T = 1, mask all ones)
    one = torch.ones(B, 1)
    S = [gopo.trajectory_logps(x[:, None].float(), one) for x in (pc, pr, rc, rr)]
    losses1, _, _ = gopo.preference_loss(*S, beta)
    torch.testing.assert_close(losses1, expected.float(), rtol=1e-5, atol=1e-6)
    # swapping chosen and rejected changes the loss (it is not symmetric)
    swapped, _, _ = gopo.preference_loss(pr, pc, rr, rc, beta)
    assert not torch.allclose(swapped, losses)


def test_preference_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = gopo.preference_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)


def test_trajectory_logps_sums_only_masked_steps():
    step_logps = torch.tensor([[-1.0, -2.0, -3.0],
                               [-0.5, 123.0, 7.0],      # padded steps hold garbage
                               [-4.0, -0.25, 55.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    expected = torch.tensor([-6.0, -0.5, -4.25])
    torch.testing.assert_close(gopo.trajectory_logps(step_logps, mask.float()), expected)
    torch.testing.assert_close(gopo.trajectory_logps(step_logps, mask.bool()), expected)


def test_listwise_loss_k2_equals_pairwise_and_k3_is_plackett_luce():
    beta = 0.7
    g = torch.Generator().manual_seed(1)
    # K = 2: rows with the better rollout in either column
    pol, ref = -3 * torch.rand(6, 2, generator=g), -3 * torch.rand(6, 2, generator=g)
    R = torch.rand(6, 2, generator=g)
    lw = gopo.listwise_loss(pol, ref, R, beta)
    w, l = R.argmax(-1), R.argmin(-1)
    ar = torch.arange(6)
    pw, _, _ = gopo.preference_loss(pol[ar, w], pol[ar, l], ref[ar, w], ref[ar, l], beta)
    torch.testing.assert_close(lw, pw, rtol=1e-5, atol=1e-6)
    # K = 3, hand-written Plackett-Luce with the rollouts deliberately out of reward order
    pol3 = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
    ref3 = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    R3 = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.1, 0.4]])
    got = gopo.listwise_loss(pol3, ref3, R3, beta)
    for n in range(2):
        order = sorted(range(3), key=lambda k: -float(R3[n, k]))       # best first
        r = [beta * float(pol3[n, k] - ref3[n, k]) for k in order]
        want = -sum(r[i] - math.log(sum(math.exp(x) for x in r[i:])) for i in range(2))
        assert float(got[n]) == pytest.approx(want, rel=1e-5)
