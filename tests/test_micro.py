"""--device-batch-size: every update in micro-batches with gradient accumulation gives the whole
batch's loss and gradient (up to float rounding), and every rank runs the same number of them."""
import copy
from types import SimpleNamespace

import pytest
import torch

import agent as agent_lib
import expert as expert_lib
import gopo
import lm
from worlds import shop


class Recorder:
    """An optimizer that keeps the (clipped) gradient of each step instead of stepping."""

    def __init__(self, model):
        self.params, self.grads = list(model.parameters()), []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                     for p in self.params]))


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("listwise", [False, True])
def test_gopo_loss_and_gradient_equal_the_whole_batch(models, tok, logs, listwise):
    model = copy.deepcopy(models[0])
    trajs = [expert_lib.trajectory_from_record(tok, r, shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS)
             for r in logs[:9]]
    units = [[0, 1, 2], [3, 4, 5], [6, 7, 8]] if listwise else [(0, 1), (2, 3), (4, 1), (5, 6), (7, 0), (8, 2)]
    rewards = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4, 0.8])
    shift = 0.3 * torch.arange(9.0) % 1.0                                          # margins away from 0
    S_ref = gopo.reference_logps(model, tok, trajs, units, shop.STRATEGIES) - shift
    got = {}
    for size in (None, 1, 2, 5):          # 1 and 2: one unit per micro-batch (a unit is never split)
        args = SimpleNamespace(segment=0, beta=0.5, nll_coef=0.1, listwise=listwise, device_batch_size=size)
        opt = Recorder(model)
        loss, stats = gopo.expert_update((model, tok), opt, trajs, units, S_ref, rewards, shop.STRATEGIES, args)
        got[size] = (loss, opt.grads[0], stats)
        if size:
            assert gopo.reference_logps(model, tok, trajs, units, shop.STRATEGIES, size=size) - shift == \
                pytest.approx(S_ref.tolist(), abs=1e-5)
    loss, grad, stats = got[None]
    assert grad.abs().max() > 0
    for size in (1, 2, 5):
        assert got[size][0] == pytest.approx(loss, rel=1e-5)
        assert close(grad, got[size][1])
        assert got[size][2] == pytest.approx(stats, rel=1e-5, abs=1e-6)


def test_cs_alignment_gradient_equals_the_whole_batch(models, tok, logs):
    model = copy.deepcopy(models[1])
    ids = [serialize_ids for serialize_ids in agent_lib.sft_examples(tok, logs[:5], shop.INSTRUCTIONS)[1][:15]]
    pairs = [(w[:10], w[10:14], w[14:19]) for w, _ in ids]        # (prompt, chosen, rejected) token lists
    got = {}
    for size in (None, 1, 4):
        opt = Recorder(model)
        model.train()
        got[size] = (gopo.agent_update(model, opt, pairs, tok.pad_token_id, 0.1, size), opt.grads[0])
    for size in (1, 4):
        assert got[size][0] == pytest.approx(got[None][0], rel=1e-5)
        assert close(got[None][1], got[size][1])


@pytest.mark.parametrize("who", ["agent", "expert"])
def test_sft_equals_the_whole_batch(models, tok, logs, monkeypatch, who):
    """Two SFT steps (SGD in place of AdamW, so the weights move by the gradient itself): the same
    losses and the same weights with micro-batches of 3 as with the whole batch (4 length buckets)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    out = {}
    for micro in (None, 3):
        model = copy.deepcopy(models[0 if who == "expert" else 1])
        if who == "agent":
            losses = agent_lib.sft(model, tok, logs[:20], shop.INSTRUCTIONS, 2, batch_size=8, lr=0.5,
                                   window_steps=1, micro=micro)
        else:
            losses = expert_lib.sft(model, tok, logs[:20], shop.STRATEGIES, shop.allowed, shop.INSTRUCTIONS, 2,
                                    batch_size=8, lr=0.5, micro=micro)
        out[micro] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert out[3][0] == pytest.approx(out[None][0], rel=1e-5)
    start = torch.cat([p.detach().flatten() for p in models[0 if who == "expert" else 1].parameters()])
    assert close(out[None][1] - start, out[3][1] - start)
    assert not torch.equal(out[None][1], start)


def test_every_rank_runs_the_same_number_of_micro_batches(monkeypatch):
    monkeypatch.setattr(lm.parallel, "n_ranks", lambda: 3)     # 16 items: shares of 6, 5, 5
    for share in (list(range(6)), list(range(5))):
        runs = lm.micro_batches(share, 4, 16)
        assert len(runs) == 2 and sorted(x for run, w in runs if w for x in run) == share
    runs = lm.micro_batches([0], 1, 4)        # shares of 2, 1, 1: the short rank's second run is a dummy
    assert runs == [([0], 1.0), ([0], 0.0)]
