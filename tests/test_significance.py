import pytest
import torch

from dynamoq.significance import (channel_dynamics, channel_significance, column_energy, expert_significance,
                                  loss_significance, synthesize, top_share)


def test_column_energy_by_hand():
    w = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # [E=1, N=2, K=2]
    assert column_energy(w).tolist() == [[10.0, 4.0]]


def test_channel_significance_by_hand():
    x2 = torch.tensor([[8.0, 2.0], [0.0, 0.0]])   # expert 0 saw 4 tokens, expert 1 none
    n = torch.tensor([4, 0])
    col2 = torch.tensor([[10.0, 4.0], [1.0, 1.0]])
    s = channel_significance(x2, n, col2)
    assert s.tolist() == [[20.0, 2.0], [0.0, 0.0]]


def test_expert_significance_is_a_share_of_the_layer():
    # expert 0: 1*1*2 + 3*1 = 5 ; expert 1: 0 ; expert 2: 5 -> shares 0.5, 0, 0.5 (two projections)
    wx2 = [torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[3.0], [0.0], [1.0]])]
    col2 = [torch.tensor([[2.0], [7.0], [1.0]]), torch.tensor([[1.0], [7.0], [3.0]])]
    s = expert_significance(wx2, col2)
    assert s.tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert float(s.sum()) == pytest.approx(1.0)


def test_expert_significance_of_a_silent_layer_is_uniform():
    s = expert_significance([torch.zeros(4, 3)], [torch.ones(4, 3)])
    assert s.tolist() == pytest.approx([0.25] * 4)


def test_synthesis_mean_plus_lambda_std():
    per = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    assert synthesize(per, lam=0.0).tolist() == pytest.approx([0.4, 0.6])
    # std over the two datasets is 0.2 for both experts
    assert synthesize(per, lam=1.0).tolist() == pytest.approx([0.6, 0.8])
    # weights: all on the first dataset -> that dataset, no spread
    assert synthesize(per, torch.tensor([1.0, 0.0]), lam=1.0).tolist() == pytest.approx([0.2, 0.8])


def test_channel_dynamics_is_the_spread_of_each_channels_share():
    # [D=2, E=1, K=3]: shares (0.5, 0.25, 0.25) and (0.1, 0.45, 0.45); the second dataset's scale does not count
    s = torch.tensor([[[2.0, 1.0, 1.0]], [[10.0, 45.0, 45.0]]])
    d = channel_dynamics(s)
    assert d[0].tolist() == pytest.approx([0.2, 0.1, 0.1], abs=1e-6)
    assert torch.equal(channel_dynamics(s * torch.tensor([3.0, 7.0])[:, None, None]), d)
    # a channel that varies a thousandfold but holds almost nothing is less dynamic than a big one that moves
    tiny = torch.tensor([[[1e-6, 1.0, 1.0]], [[1e-3, 1.3, 0.7]]])
    assert channel_dynamics(tiny)[0, 0] < channel_dynamics(tiny)[0, 1]
    assert channel_dynamics(s[:1]).abs().sum() == 0


def test_top_share():
    dyn = torch.tensor([9.0] + [0.1] * 99)
    assert top_share(dyn, 0.01) == pytest.approx(9.0 / (9.0 + 9.9))


def test_loss_significance_by_hand_and_not_normalised():
    gx2 = [torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.5], [3.0]])]
    col2 = [torch.tensor([[4.0, 1.0], [9.0, 9.0]]), torch.tensor([[2.0], [1.0]])]
    s = loss_significance(gx2, col2, tokens=2)
    assert torch.allclose(s, torch.tensor([(4 + 2 + 1) / 2, 3 / 2], dtype=torch.float64))
    assert torch.allclose(loss_significance([g * 10 for g in gx2], col2, 2), 10 * s)
