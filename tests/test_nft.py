"""DiffusionNFT's maths (video_branch.core.nft) and its sample objective, against direct computations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from video_branch.core.nft import ema_update_, implicit_velocities, nft_loss, optimality_probability
from video_branch.core.objectives import SampleBatch, get_objective, objective_info
from video_branch.core.surrogate import draw_pairs, noised


def test_optimality_probability_maps_advantages_linearly_and_clamps():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    assert torch.allclose(optimality_probability(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    with pytest.raises(ValueError, match="adv_max > 0"):
        optimality_probability(a, 0.0)


def test_implicit_velocities_are_the_stated_combinations():
    v, vo = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    pos, neg = implicit_velocities(v, vo, 0.5)
    assert torch.allclose(pos, torch.tensor([1.5, 0.0]))  # 0.5 v + 0.5 v_old
    assert torch.allclose(neg, torch.tensor([0.5, 2.0]))  # 1.5 v_old - 0.5 v
    # Mirror images about v_old.
    assert torch.allclose(pos + neg, 2 * vo)
    same = implicit_velocities(vo, vo, 0.7)
    assert torch.equal(same[0], vo) and torch.equal(same[1], vo)


def test_nft_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    v, vo = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t, r, b = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.5, 1.0]), 0.8
    got = nft_loss(x_t, t, x0, v, vo, r, b)
    want = []
    for i in range(3):
        pred_pos = x_t[i] - t[i] * (b * v[i] + (1 - b) * vo[i])
        pred_neg = x_t[i] - t[i] * ((1 + b) * vo[i] - b * v[i])
        pos = ((pred_pos - x0[i]) ** 2).mean() / (pred_pos - x0[i]).abs().mean()
        neg = ((pred_neg - x0[i]) ** 2).mean() / (pred_neg - x0[i]).abs().mean()
        want.append(r[i] * pos + (1 - r[i]) * neg)
    assert torch.allclose(got, torch.stack(want), rtol=1e-5)


def test_nft_weights_are_detached_and_a_zero_advantage_gives_no_gradient_on_policy():
    g = torch.Generator().manual_seed(1)
    x0, x_t, vo = (torch.randn(2, 6, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.7])
    v = vo.clone().requires_grad_(True)
    nft_loss(x_t, t, x0, v, vo, torch.full((2,), 0.5), 1.0).sum().backward()
    assert torch.allclose(v.grad, torch.zeros_like(v), atol=1e-6)
    # With r = 1 only the positive term remains; its gradient treats w+ as a constant:
    # d/dv mean((x_t - t v - x0)^2) / w = -2 t (x_t - t v - x0) / (n w).
    v = vo.clone().requires_grad_(True)
    nft_loss(x_t, t, x0, v, vo, torch.ones(2), 1.0).sum().backward()
    e = x_t - t[:, None] * vo - x0
    want = -2 * t[:, None] * e / (6 * e.abs().mean(1, keepdim=True))
    assert torch.allclose(v.grad, want, atol=1e-6)


def test_ema_update_moves_each_tensor_by_one_minus_decay():
    ema, cur = [torch.zeros(3), torch.ones(2)], [torch.full((3,), 10.0), torch.zeros(2)]
    ema_update_(ema, cur, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 1.0)) and torch.allclose(ema[1], torch.full((2,), 0.9))
    ema_update_(ema, cur, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 1.9))
    ema_update_(ema, cur, 0.0)  # decay 0 copies the current weights
    assert torch.equal(ema[0], cur[0])
    with pytest.raises(ValueError, match="ema_decay"):
        ema_update_(ema, cur, 1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_nft_objective_is_sample_level_with_an_ema_copy_and_matches_nft_loss():
    info = objective_info("nft")
    assert info.unit == "samples" and info.copies == ("ema",)
    obj = get_objective("nft")
    assert obj.old_policy == "ema"
    g = torch.Generator().manual_seed(2)
    m, shape = 2, (2, 3)
    x0 = torch.randn(2, *shape, generator=g).repeat_interleave(m, 0)
    t, eps = draw_pairs(m, shape, g)
    t, eps = t.repeat(2), eps.repeat(2, 1, 1)
    adv = torch.tensor([2.5, -1.0]).repeat_interleave(m)
    b = SampleBatch(x0=x0, eps=eps, t=t, x_t=noised(x0, eps, t), adv=adv, pairs=m)
    cfg = SimpleNamespace(objective=SimpleNamespace(nft_beta=1.0, kl_coef=0.0), credit=SimpleNamespace(adv_clip=5.0))
    vo = torch.randn(x0.shape, generator=g)
    v = vo + 0.1 * torch.randn(x0.shape, generator=g)
    out = obj(v, b, obj.old(vo, b, cfg), cfg)
    r = torch.tensor([0.75, 0.75, 0.4, 0.4])
    assert out.loss.item() == pytest.approx(nft_loss(b.x_t, t, x0, v, vo, r, 1.0).mean().item(), rel=1e-6)
    assert out.ratio.numel() == 0  # no likelihood ratio to report


def test_ema_step_moves_the_kept_copy_towards_the_trained_weights():
    import copy

    from video_branch.engine.phases import ema_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.bias.requires_grad_(False)  # a frozen parameter (LoRA's base weights) is left alone
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
    policy = SimpleNamespace(engine=SimpleNamespace(module=model), copies={"ema": ema},
                             cfg=SimpleNamespace(parallel=SimpleNamespace(zero_stage=0)))
    ema_step(policy, "ema", 0.75)
    assert torch.allclose(ema.weight, 0.75 * before + 0.25 * model.weight)
    assert not torch.allclose(ema.bias, model.bias)


def test_nft_objective_rejects_a_kl_coefficient():
    obj = get_objective("nft")
    cfg = SimpleNamespace(objective=SimpleNamespace(nft_beta=1.0, kl_coef=0.1), credit=SimpleNamespace(adv_clip=5.0))
    with pytest.raises(ValueError, match="objective.kl_coef"):
        obj.old(torch.zeros(2, 3), None, cfg)
    assert objective_info("nft").reference is False and objective_info("vgrpo").reference is False
    assert objective_info("clipped").reference is True
