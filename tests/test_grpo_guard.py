"""GRPO-Guard ratio normalisation (ALGORITHMS.md section 5), an option of the clipped objective."""

from __future__ import annotations

import torch

from video_branch.core.objectives import get_objective, guard_log_ratio
from video_branch.core.sde import gaussian_log_prob


def test_guard_matches_the_formula_by_hand():
    log_ratio = torch.tensor([0.2, -0.1])
    mean_new = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean_old = torch.tensor([[0.0, 2.0], [0.0, 3.0]])
    std = torch.tensor([0.5, 2.0])
    # d2 (mean over elements): 0.5 and 4.5
    expected = torch.tensor([0.5 * (0.2 + 0.5 / (2 * 0.25)), 2.0 * (-0.1 + 4.5 / (2 * 4.0))])
    assert torch.allclose(guard_log_ratio(log_ratio, mean_new, mean_old, std), expected)


def test_guard_removes_the_negative_bias_of_the_log_ratio_at_low_noise():
    g = torch.Generator().manual_seed(0)
    d, n, sd = 64, 4000, 0.02
    mean_old = torch.randn(1, d, generator=g).expand(n, d)
    mean_new = mean_old + 0.01 * torch.randn(1, d, generator=g)
    x = mean_old + sd * torch.randn(n, d, generator=g)  # samples of the old policy
    std = torch.full((n,), sd)
    log_ratio = gaussian_log_prob(x, mean_new, std.view(n, 1)) - gaussian_log_prob(x, mean_old, std.view(n, 1))
    d2 = (mean_new - mean_old).pow(2).mean(1)
    raw = log_ratio.mean()
    assert torch.isclose(raw, -(d2 / (2 * sd ** 2)).mean(), rtol=0.05)  # biased: E[log rho] = -d2 / (2 sd^2)
    guarded = guard_log_ratio(log_ratio, mean_new, mean_old, std)
    assert guarded.mean().abs() < 0.05 * raw.abs() * sd  # centred


def test_clipped_objective_uses_the_normalised_ratio():
    obj = get_objective("clipped")
    logp_old = torch.zeros(2)
    logp_new = torch.tensor([-0.3, 0.1])
    mean_old = torch.zeros(2, 3)
    mean_new = torch.full((2, 3), 0.1)
    std = torch.tensor([0.1, 0.1])
    adv = torch.tensor([1.0, -1.0])
    out = obj(logp_new, logp_old, adv, clip_eps=10.0, mean_new=mean_new, mean_old=mean_old, std=std, ratio_norm=True)
    rho = torch.exp(guard_log_ratio(logp_new - logp_old, mean_new, mean_old, std))
    assert torch.allclose(out.ratio, rho)
    assert torch.isclose(out.loss, -(rho * adv).mean())
