import math

import numpy as np
import pytest
import torch

from video_branch.core.schedule import flow_sigmas
from video_branch.core.sde import (
    SDE_FORMS,
    StepResult,
    cfg_combine,
    gaussian_log_prob,
    get_sde_form,
    ode_step,
    predict_x0,
    register_sde_form,
    sde_mean_std,
    sde_step,
    split_noise,
    transition_log_prob,
)

SHAPE = (3, 4, 2, 4, 4)  # [B, C, F, H, W]


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------ independent references


def _dance_ref(x, v, s, sn, eta):
    """DanceGRPO's step, literally, in numpy float64."""
    x0 = x - s * v
    g = -(x - (1 - s) * x0) / s**2
    ds = sn - s
    return x + ds * (v - 0.5 * eta**2 * g), eta * np.sqrt(s - sn)


def _flow_ref(x, v, s, sn, a, s1):
    """Flow-GRPO's step as its released code arranges it, in numpy float64."""
    sig = np.sqrt(s / (1 - (s1 if s == 1 else s))) * a
    dt = sn - s
    mean = x * (1 + sig**2 / (2 * s) * dt) + v * (1 + sig**2 * (1 - s) / (2 * s)) * dt
    return mean, sig * np.sqrt(-dt)


# ------------------------------------------------------------------------------------------ deterministic pieces


def test_predict_x0_and_ode_step_match_hand_computation():
    x, v = _randn(*SHAPE, seed=1, dtype=torch.float64), _randn(*SHAPE, seed=2, dtype=torch.float64)
    xn, vn = x.numpy(), v.numpy()
    np.testing.assert_allclose(predict_x0(x, v, 0.7).numpy(), xn - 0.7 * vn, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(ode_step(x, v, 0.7, 0.55).numpy(), xn + (0.55 - 0.7) * vn, rtol=1e-14, atol=1e-14)


def test_ode_step_keeps_bf16_dtype_and_resolves_small_steps():
    x, v = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    s, sn = flow_sigmas(20)[0:2].tolist()
    out = ode_step(x.bfloat16(), v.bfloat16(), s, sn)
    assert out.dtype == torch.bfloat16
    ref = x.bfloat16().double() + (sn - s) * v.bfloat16().double()
    # only the final rounding to bf16 is lost, not the step size (which bf16 alone would get 10% wrong)
    assert torch.allclose(out.double(), ref, rtol=2 ** -8, atol=2 ** -8)


def test_cfg_combine():
    vu, vc = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    assert torch.equal(cfg_combine(vu, vc, 1.0), vc)
    assert torch.allclose(cfg_combine(vu, vc, 4.0), vu + 4.0 * (vc - vu))
    assert torch.equal(cfg_combine(vu, vc, 0.0), vu)
    w = torch.tensor([1.0, 4.0, 1.0])
    out = cfg_combine(vu, vc, w)
    assert torch.equal(out[0], vc[0]) and torch.equal(out[2], vc[2])
    assert torch.allclose(out[1], vu[1] + 4.0 * (vc[1] - vu[1]))


# ------------------------------------------------------------------------------------------ registry


def test_registry_has_builtin_forms_and_rejects_unknown_names():
    assert {"dance", "flow"} <= set(SDE_FORMS)
    assert get_sde_form("dance") is SDE_FORMS["dance"]
    with pytest.raises(ValueError, match=r"unknown SDE form 'nope'.*dance.*flow"):
        get_sde_form("nope")
    x = _randn(*SHAPE)
    with pytest.raises(ValueError, match="unknown SDE form"):
        sde_step("nope", x, x, 0.5, 0.4, 0.3)


def test_register_custom_form_is_used_by_sde_step():
    name = "test_constant_std"

    def form(x, v, s, s_next, eta, s_cap=None):
        return x + (s_next - s) * v, torch.tensor(eta, dtype=x.dtype)

    try:
        assert register_sde_form(name)(form) is form
        with pytest.raises(ValueError, match="already registered"):
            register_sde_form(name)(lambda *a: a)
        x, v, n = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
        res = sde_step(name, x, v, 0.5, 0.25, 0.1, noise=n)
        assert torch.allclose(res.latent, x - 0.25 * v + 0.1 * n)
        assert torch.equal(res.std, torch.tensor(0.1))
    finally:
        SDE_FORMS.pop(name, None)


# ------------------------------------------------------------------------------------------ SDE forms vs hand


@pytest.mark.parametrize("i", [0, 1, 4, 9])
@pytest.mark.parametrize("eta", [0.3, 1.2])
def test_dance_form_matches_hand_computation(i, eta):
    s_all = flow_sigmas(10, 3.0).double()
    s, sn = s_all[i].item(), s_all[i + 1].item()
    x, v = _randn(*SHAPE, seed=5, dtype=torch.float64), _randn(*SHAPE, seed=6, dtype=torch.float64)
    mean, std = get_sde_form("dance")(x, v, s, sn, eta)
    ref_mean, ref_std = _dance_ref(x.numpy(), v.numpy(), s, sn, eta)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    assert std.ndim == 0
    assert std.item() == pytest.approx(ref_std, rel=1e-14)


@pytest.mark.parametrize("i", [0, 1, 5, 9])
@pytest.mark.parametrize("a", [0.7, 0.3])
def test_flow_form_matches_hand_computation(i, a):
    s_all = flow_sigmas(10, 3.0).double()
    s, sn, s1 = s_all[i].item(), s_all[i + 1].item(), s_all[1].item()
    x, v = _randn(*SHAPE, seed=7, dtype=torch.float64), _randn(*SHAPE, seed=8, dtype=torch.float64)
    mean, std = get_sde_form("flow")(x, v, s, sn, a, s1)
    ref_mean, ref_std = _flow_ref(x.numpy(), v.numpy(), s, sn, a, s1)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    assert std.item() == pytest.approx(ref_std, rel=1e-13)


def test_flow_form_caps_std_at_s_one():
    s1 = flow_sigmas(10, 3.0)[1].item()
    x, v = _randn(*SHAPE, seed=7, dtype=torch.float64), _randn(*SHAPE, seed=8, dtype=torch.float64)
    _, std = get_sde_form("flow")(x, v, 1.0, s1, 0.7, s1)
    # Flow-GRPO: sqrt(s / (1 - s_1)) with s = 1 kept in the numerator
    assert std.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1.0 - s1)) * math.sqrt(1.0 - s1), rel=1e-14)
    assert math.isfinite(std.item())
    with pytest.raises(ValueError, match="s_cap"):
        get_sde_form("flow")(x, v, 1.0, s1, 0.7)
    with pytest.raises(ValueError, match="s_cap"):
        get_sde_form("flow")(x, v, 1.0, s1, 0.7, 1.0)


@pytest.mark.parametrize("form", ["dance", "flow"])
def test_invalid_step_arguments_raise(form):
    x = _randn(*SHAPE)
    with pytest.raises(ValueError, match="s_next < s"):
        sde_step(form, x, x, 0.4, 0.5, 0.3, s_cap=0.9)
    with pytest.raises(ValueError, match="s_next < s"):
        sde_step(form, x, x, 0.4, 0.4, 0.3, s_cap=0.9)
    with pytest.raises(ValueError, match="eta"):
        sde_step(form, x, x, 0.5, 0.4, -0.1, s_cap=0.9)
    with pytest.raises(ValueError, match="batch size 3"):
        sde_step(form, x, x, torch.tensor([0.5, 0.5]), 0.4, 0.3, s_cap=0.9)
    with pytest.raises(ValueError, match="shape of x"):
        sde_step(form, x, x[:, :2], 0.5, 0.4, 0.3, s_cap=0.9)


# ------------------------------------------------------------------------------------------ log-probability


def test_gaussian_log_prob_equals_torch_normal():
    x, mean = _randn(*SHAPE, seed=9), _randn(*SHAPE, seed=10)
    dims = tuple(range(1, len(SHAPE)))
    for std in [
        torch.tensor(0.37),
        torch.tensor([0.1, 0.5, 2.0]).view(-1, 1, 1, 1, 1),
        torch.rand(SHAPE, generator=torch.Generator().manual_seed(11)) + 0.05,
    ]:
        normal = torch.distributions.Normal(mean, std.expand(SHAPE))
        ref = normal.log_prob(x)
        torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref.mean(dims), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduce="sum"), ref.sum(dims), rtol=1e-6, atol=1e-5)
    out = gaussian_log_prob(x, mean, 0.37)
    assert out.shape == (SHAPE[0],) and out.dtype == torch.float32


def test_gaussian_log_prob_validates_inputs_and_degenerate_std():
    x, mean = _randn(*SHAPE, seed=9), _randn(*SHAPE, seed=10)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, 0.3, reduce="max")
    with pytest.raises(ValueError, match="std must be >= 0"):
        gaussian_log_prob(x, mean, -0.3)
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_log_prob(x, mean[:, :2], 0.3)
    std = torch.tensor([0.0, 0.5, 0.0]).view(-1, 1, 1, 1, 1)
    out = gaussian_log_prob(x, mean, std)
    assert torch.isnan(out[0]) and torch.isnan(out[2]) and torch.isfinite(out[1])


def test_bf16_inputs_give_finite_fp32_log_prob():
    s, sn = flow_sigmas(20)[17:19].tolist()
    x = (_randn(*SHAPE, seed=12) * 30).bfloat16()
    v = (_randn(*SHAPE, seed=13) * 30).bfloat16()
    res = sde_step("dance", x, v, s, sn, 0.3, generator=torch.Generator().manual_seed(0))
    assert res.latent.dtype == torch.bfloat16
    assert res.log_prob.dtype == torch.float32 and res.mean.dtype == torch.float32
    assert torch.isfinite(res.log_prob).all()
    # the log-prob is the fp32 computation on the upcast inputs
    mean32, std32 = sde_mean_std("dance", x.float(), v.float(), s, sn, 0.3)
    assert torch.equal(res.log_prob, gaussian_log_prob(res.latent.float(), mean32, std32))
    assert torch.equal(gaussian_log_prob(res.latent, mean32.bfloat16(), std32),
                       gaussian_log_prob(res.latent.float(), mean32.bfloat16().float(), std32))


# ------------------------------------------------------------------------------------------ steps


def test_sde_step_latent_is_mean_plus_std_noise_and_reproducible():
    x, v, n = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
    res = sde_step("dance", x, v, 0.8, 0.7, 0.3, noise=n)
    assert isinstance(res, StepResult)
    assert torch.equal(res.latent, res.mean + res.std * n)
    assert res.std.item() == pytest.approx(0.3 * math.sqrt(0.1), rel=1e-6)
    a = sde_step("dance", x, v, 0.8, 0.7, 0.3, generator=torch.Generator().manual_seed(5))
    b = sde_step("dance", x, v, 0.8, 0.7, 0.3, generator=torch.Generator().manual_seed(5))
    c = sde_step("dance", x, v, 0.8, 0.7, 0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)
    assert torch.equal(a.mean, c.mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dance_step_with_vanishing_eta_is_the_ode_step(dtype):
    x, v = _randn(*SHAPE, seed=14, dtype=dtype), _randn(*SHAPE, seed=15, dtype=dtype)
    for s, sn in [(1.0, 0.9827586), (0.5, 0.4), (0.2, 0.0)]:
        ode = ode_step(x, v, s, sn)
        mean, std = get_sde_form("dance")(x, v, s, sn, 0.0)
        assert torch.equal(mean, ode) and std.item() == 0.0
        res = sde_step("dance", x, v, s, sn, 0.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(res.latent, ode)
        assert torch.isnan(res.log_prob).all()  # a deterministic step has no density
        mean, std = get_sde_form("dance")(x, v, s, sn, 1e-8)
        torch.testing.assert_close(mean, ode, rtol=1e-12, atol=1e-12)
        assert 0.0 < std.item() <= 1e-8


@pytest.mark.parametrize("form", ["dance", "flow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_log_prob_gives_ratio_exactly_one(form, dtype):
    sig = flow_sigmas(20, 3.0)
    idx = torch.tensor([0, 3, 11])
    s, sn, s1 = sig[idx], sig[idx + 1], sig[1]
    eta = torch.tensor([0.3, 1.2, 0.3]) if form == "dance" else 0.7
    x, v = _randn(*SHAPE, seed=16, dtype=dtype), _randn(*SHAPE, seed=17, dtype=dtype)
    res = sde_step(form, x, v, s, sn, eta, s_cap=s1, generator=torch.Generator().manual_seed(1))
    new = transition_log_prob(form, x, v, res.latent, s, sn, eta, s_cap=s1)
    assert new.dtype == torch.float32 and torch.isfinite(new).all()
    assert torch.equal(torch.exp(new - res.log_prob), torch.ones(SHAPE[0]))
    # a different velocity must move it (the check above is not vacuous)
    moved = transition_log_prob(form, x, (v.float() + 0.05).to(dtype), res.latent, s, sn, eta, s_cap=s1)
    assert (moved != res.log_prob).all()


@pytest.mark.parametrize("form", ["dance", "flow"])
def test_per_sample_sigmas_equal_per_sample_scalar_calls(form):
    sig = flow_sigmas(20, 3.0)
    idx = torch.tensor([0, 5, 19])
    s, sn, s1 = sig[idx], sig[idx + 1], sig[1].item()
    eta = torch.tensor([0.3, 0.9, 0.5])
    x, v, n = _randn(*SHAPE, seed=18), _randn(*SHAPE, seed=19), _randn(*SHAPE, seed=20)
    batched = sde_step(form, x, v, s, sn, eta, s_cap=s1, noise=n)
    assert batched.std.shape == (SHAPE[0], 1, 1, 1, 1)
    x0_b = predict_x0(x, v, s)
    ode_b = ode_step(x, v, s, sn)
    for b in range(SHAPE[0]):
        one = sde_step(form, x[b : b + 1], v[b : b + 1], s[b].item(), sn[b].item(), eta[b].item(), s_cap=s1,
                       noise=n[b : b + 1])
        assert one.std.ndim == 0
        assert torch.equal(batched.mean[b : b + 1], one.mean)
        assert torch.equal(batched.std[b].reshape(()), one.std)
        assert torch.equal(batched.latent[b : b + 1], one.latent)
        torch.testing.assert_close(batched.log_prob[b : b + 1], one.log_prob, rtol=1e-6, atol=1e-6)
        assert torch.equal(x0_b[b : b + 1], predict_x0(x[b : b + 1], v[b : b + 1], s[b].item()))
        assert torch.equal(ode_b[b : b + 1], ode_step(x[b : b + 1], v[b : b + 1], s[b].item(), sn[b].item()))


def test_transition_log_prob_gradient_in_velocity():
    x = _randn(2, 2, 1, 2, 2, seed=21, dtype=torch.float64)
    x_next = _randn(2, 2, 1, 2, 2, seed=22, dtype=torch.float64)
    v = _randn(2, 2, 1, 2, 2, seed=23, dtype=torch.float64).requires_grad_(True)
    for form in ["dance", "flow"]:
        def fn(vv, form=form):
            s, s_next = torch.tensor([1.0, 0.6]), torch.tensor([0.9, 0.5])
            return transition_log_prob(form, x, vv, x_next, s, s_next, 0.5, s_cap=0.9)

        assert torch.autograd.gradcheck(fn, (v,))


# ------------------------------------------------------------------------------------------ split noise


N_SPLIT = 200_000


def _pairwise_corr(xi: torch.Tensor) -> list[float]:
    k = xi.shape[0]
    flat = xi.reshape(k, -1).double().numpy()
    c = np.corrcoef(flat)
    return [c[a, b] for a in range(k) for b in range(a + 1, k)]


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0, 4.0])
def test_split_noise_marginals_and_sibling_correlation(c):
    k = 3
    xi = split_noise((N_SPLIT,), k, c, generator=torch.Generator().manual_seed(int(c * 10)))
    assert xi.shape == (k, N_SPLIT) and xi.dtype == torch.float32
    flat = xi.double()
    tol_mean = 5 / math.sqrt(N_SPLIT)
    tol_var = 5 * math.sqrt(2 / N_SPLIT)
    for b in range(k):
        assert abs(flat[b].mean().item()) < tol_mean
        assert abs(flat[b].var().item() - 1.0) < tol_var
    rho = 1.0 / (1.0 + c * c)
    tol_rho = 5 * (1 - rho**2) / math.sqrt(N_SPLIT)
    for r in _pairwise_corr(xi):
        assert abs(r - rho) < tol_rho, (c, r, rho)


def test_split_noise_independent_and_limits():
    xi = split_noise((N_SPLIT,), 2, 4.0, generator=torch.Generator().manual_seed(0), independent=True)
    assert abs(_pairwise_corr(xi)[0]) < 5 / math.sqrt(N_SPLIT)
    assert abs(xi[0].double().var().item() - 1.0) < 5 * math.sqrt(2 / N_SPLIT)
    inf = split_noise((64,), 2, math.inf, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inf, split_noise((64,), 2, 4.0, generator=torch.Generator().manual_seed(0), independent=True))
    same = split_noise((2, 3, 4), 3, 0.0, generator=torch.Generator().manual_seed(1))
    assert same.shape == (3, 2, 3, 4)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])


def test_split_noise_formula_reproducibility_and_dtype():
    g = torch.Generator().manual_seed(3)
    xi0 = torch.randn((2, 5), generator=g)
    z = torch.randn((4, 2, 5), generator=g)
    out = split_noise((2, 5), 4, 4.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, (xi0 + 4.0 * z) / math.sqrt(17.0), rtol=0, atol=1e-6)
    bf = split_noise((2, 5), 4, 4.0, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, out.bfloat16())


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k"), ({"k": 2.0}, "k"), ({"correlation": -1.0}, "correlation"),
                                          ({"correlation": math.nan}, "correlation")])
def test_split_noise_rejects_bad_arguments(kwargs, match):
    args = {"shape": (4,), "k": 2, "correlation": 4.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        split_noise(**args)
