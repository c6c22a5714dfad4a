"""V-GRPO's ELBO surrogate (video_branch.core.surrogate) and its sample objective, against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from video_branch.core.objectives import SampleBatch, get_objective, objective_info
from video_branch.core.surrogate import (
    adaptive_weight,
    draw_pairs,
    noised,
    pair_errors,
    pair_generator,
    soft_clip,
    stratified_times,
    surrogate_loss,
    vgrpo_loss,
    x0_from_velocity,
    x0_kl,
)


def test_stratified_times_put_one_time_in_each_equal_sub_interval():
    for m in (1, 3, 8):
        for seed in range(20):
            t = stratified_times(m, torch.Generator().manual_seed(seed)).double()
            assert t.shape == (m,)
            assert ((t >= torch.arange(m) / m) & (t < (torch.arange(m) + 1) / m)).all()
    with pytest.raises(ValueError, match="pairs >= 1"):
        stratified_times(0, torch.Generator())


def test_stratified_times_cover_each_stratum_uniformly():
    draws = torch.stack([stratified_times(4, torch.Generator().manual_seed(s)) for s in range(2000)])
    # Within stratum j the time is uniform on [j/4, (j+1)/4): mean (2j+1)/8, var (1/4)^2 / 12.
    assert torch.allclose(draws.mean(0).double(), (2 * torch.arange(4, dtype=torch.float64) + 1) / 8.0, atol=0.005)
    assert torch.allclose(draws.var(0).double(), torch.full((4,), 1 / 16 / 12, dtype=torch.float64), rtol=0.1)


def test_pairs_are_reproducible_per_group_and_differ_between_groups():
    shape = (2, 3, 4)
    a = draw_pairs(4, shape, pair_generator(7, 3, 1, 0))
    b = draw_pairs(4, shape, pair_generator(7, 3, 1, 0))  # another rank of the same SP group
    c = draw_pairs(4, shape, pair_generator(7, 3, 1, 1))  # another prompt
    d = draw_pairs(4, shape, pair_generator(7, 4, 1, 0))  # another iteration
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (4, *shape)
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])


def test_noised_and_x0_from_velocity_follow_the_forward_path():
    x0, eps = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = noised(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # The exact flow velocity eps - x0 recovers x0.
    assert torch.allclose(x0_from_velocity(xt, t, eps - x0), x0, atol=1e-6)


def test_pair_errors_weight_by_the_detached_inverse_mean_absolute_error():
    x0 = torch.zeros(2, 4)
    eps = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    v = torch.tensor([[1.0, 3.0, 1.0, -1.0], [0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    err, w = pair_errors(v, x0, eps)
    # item 0: errors 0, 2, 0, -2 -> mean|e| = 1, mean e^2 = 2; item 1: mean|e| = 0.5, mean e^2 = 0.25.
    assert torch.allclose(w, torch.tensor([1.0, 2.0]))
    assert torch.allclose(err, torch.tensor([2.0, 0.5]))
    err.sum().backward()
    # Detached weight: d/dv (w * mean e^2) = w * 2 e / n, with no term from w.
    assert torch.allclose(v.grad[0], torch.tensor([0.0, 1.0, 0.0, -1.0]))
    assert not w.requires_grad
    fixed, w2 = pair_errors(v.detach(), x0, eps, weight=torch.tensor([3.0, 3.0]))
    assert torch.allclose(fixed, torch.tensor([6.0, 0.75])) and torch.equal(w2, torch.tensor([3.0, 3.0]))
    assert torch.isfinite(adaptive_weight(torch.zeros(1, 4))).all()  # a perfect prediction does not divide by 0


def test_surrogate_loss_averages_each_samples_consecutive_pairs():
    e = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert torch.equal(surrogate_loss(e, 2), torch.tensor([2.0, 15.0]))
    with pytest.raises(ValueError, match="S \\* 3"):
        surrogate_loss(e, 3)


def test_soft_clip_is_three_tanh_a_over_three():
    a = torch.tensor([-100.0, -1.0, 0.0, 0.5, 100.0])
    assert torch.allclose(soft_clip(a), torch.tensor([3 * math.tanh(x / 3) for x in a.tolist()]))
    assert soft_clip(torch.tensor(1e6)) <= 3.0


def test_vgrpo_loss_matches_the_clipped_objective_by_hand():
    l_old = torch.tensor([1.0, 1.0, 2.0])
    l_new = torch.tensor([1.0, 0.9, 2.05], requires_grad=True)
    adv = torch.tensor([1.0, 2.0, -1.5])
    loss, ratio, frac = vgrpo_loss(l_new, l_old, adv, clip_eps=0.01)
    rho = [1.0, math.exp(0.1), math.exp(-0.05)]
    a = [3 * math.tanh(x / 3) for x in adv.tolist()]
    clip = [min(max(r, 0.99), 1.01) for r in rho]
    want = -np.mean([min(r * x, c * x) for r, c, x in zip(rho, clip, a)])
    assert torch.allclose(ratio, torch.tensor(rho), atol=1e-6)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert frac.item() == pytest.approx(2 / 3)
    loss.backward()
    # Only the unclipped first sample passes gradient: d/dL_new of -rho A / 3 is +rho A / 3.
    assert torch.allclose(l_new.grad, torch.tensor([a[0] / 3, 0.0, 0.0]), atol=1e-6)


def _cfg(kl=0.0):
    return SimpleNamespace(objective=SimpleNamespace(clip_eps=1e-3, kl_coef=kl), credit=SimpleNamespace(adv_clip=5.0))


def _batch(samples=3, m=2, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(samples, *shape, generator=g).repeat_interleave(m, 0)
    t, eps = draw_pairs(m, shape, g)
    t, eps = t.repeat(samples), eps.repeat(samples, *([1] * len(shape)))
    adv = torch.tensor([1.0, -2.0, 0.5][:samples]).repeat_interleave(m)
    return SampleBatch(x0=x0, eps=eps, t=t, x_t=noised(x0, eps, t), adv=adv, pairs=m)


def test_vgrpo_objective_ratio_is_exactly_one_before_an_update_and_moves_after():
    obj = get_objective("vgrpo")
    assert objective_info("vgrpo").unit == "samples"
    b = _batch()
    v_old = torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(1))
    old = obj.old(v_old, b, _cfg())
    out = obj(v_old.clone().requires_grad_(True), b, old, _cfg())
    assert torch.equal(out.ratio, torch.ones(3))
    # The loss on-policy is -mean soft_clip(A).
    assert out.loss.item() == pytest.approx(-float(soft_clip(torch.tensor([1.0, -2.0, 0.5])).mean()), rel=1e-6)
    moved = obj(v_old + 0.01, b, old, _cfg())
    assert (moved.ratio - 1).abs().max() > 0


def test_vgrpo_objective_surrogate_matches_a_direct_computation():
    obj = get_objective("vgrpo")
    b = _batch(samples=2, m=3)
    v_old = torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(2))
    v_new = v_old + 0.05 * torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(3))
    old = obj.old(v_old, b, _cfg())
    out = obj(v_new, b, old, _cfg())

    def surrogate(v):
        per_item = []
        for i in range(6):
            target = b.eps[i] - b.x0[i]
            w = 1.0 / (v_old[i] - target).abs().mean()  # the old policy's weight, for both surrogates
            per_item.append(w * ((v[i] - target) ** 2).mean())
        return torch.stack(per_item).view(2, 3).mean(1)

    assert torch.allclose(out.ratio, torch.exp(surrogate(v_old) - surrogate(v_new)), atol=1e-6)


def test_vgrpo_kl_is_the_squared_distance_of_x0_predictions():
    obj = get_objective("vgrpo")
    b = _batch(samples=1, m=2)
    v_old = torch.zeros(b.x0.shape)
    old = obj.old(v_old, b, _cfg(kl=0.5))
    v_new = torch.ones(b.x0.shape)
    out = obj(v_new, b, old, _cfg(kl=0.5))
    # x0_hat differs by t * (v_new - v_old) = t per element: mean over items of t^2.
    assert out.kl.item() == pytest.approx(float((b.t ** 2).mean()), rel=1e-6)
    assert out.kl.item() == pytest.approx(float(x0_kl(b.x_t, b.t, v_new, v_old)), rel=1e-6)
    no_kl = obj(v_new, b, obj.old(v_old, b, _cfg()), _cfg())
    assert out.loss.item() == pytest.approx(no_kl.loss.item() + 0.5 * out.kl.item(), rel=1e-6)


def test_sample_items_share_pairs_within_a_prompt_and_noise_the_leaves():
    from video_branch.core.tree import TreeSpec, build_structure
    from video_branch.engine.phases import _item_index, _Items

    spec = TreeSpec(num_steps=2, roots=3, kinds=("ode", "ode"))
    tree = build_structure(spec, 2)
    leaves = tree.leaves()
    res = SimpleNamespace(tree=tree, leaf_latents=torch.randn(len(leaves), 2, 3),
                          embeds=torch.arange(2, dtype=torch.float32)[:, None, None].expand(2, 4, 5))
    adv = np.zeros(tree.num_nodes)
    adv[leaves] = np.arange(len(leaves), dtype=float)
    trainer = SimpleNamespace(cfg=SimpleNamespace(objective=SimpleNamespace(pairs=2), train=SimpleNamespace(seed=5)),
                              dist=SimpleNamespace(dp_rank=0))
    items = _Items(trainer, 3, res, adv)
    b, emb = items(np.arange(len(leaves)), "cpu")
    m = 2
    t, eps = b.t.view(6, m), b.eps.view(6, m, 2, 3)
    trees = tree.tree[leaves]
    for i in range(6):
        same = trees == trees[i]
        assert all(torch.equal(t[j], t[i]) and torch.equal(eps[j], eps[i]) for j in np.nonzero(same)[0])
        assert all(not torch.equal(eps[j], eps[i]) for j in np.nonzero(~same)[0])
        assert torch.equal(emb[i * m, 0, 0], torch.tensor(float(trees[i])))
    assert torch.equal(b.adv, torch.arange(6, dtype=torch.float32).repeat_interleave(m))
    assert torch.allclose(b.x_t, noised(res.leaf_latents.repeat_interleave(m, 0), b.eps, b.t))
    # The group's times are stratified and reproducible from (seed, iteration, dp_rank, tree).
    t0, _ = draw_pairs(m, (2, 3), pair_generator(5, 3, 0, int(trees[0])))
    assert torch.equal(t[0], t0)
    assert _item_index(np.array([2, 0]), m).tolist() == [4, 5, 0, 1]
