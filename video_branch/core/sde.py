"""Denoising steps of a flow-matching model: ODE (Euler) and SDE transitions with their log-probabilities.

Shapes: latents ``x`` are ``[B, C, F, H, W]`` (any ``[B, ...]`` works). Every sigma-like argument (``s``, ``s_next``,
``eta``, ``s_cap``) is either a Python float / 0-d tensor shared by the batch, or a tensor of shape ``[B]`` with one
value per sample, broadcast as ``[B, 1, 1, 1, 1]``: a training micro-batch mixes edges from different steps.

SDE forms live in a small registry (:data:`SDE_FORMS`); each maps ``(x, v, s, s_next, eta, s_cap)`` to the Gaussian
transition ``(mean, std)`` of ``x' = mean + std * xi``, ``xi ~ N(0, I)``. The rollout (:func:`sde_step`) and the
trainer (:func:`transition_log_prob`) share one code path, so recomputing a stored transition's log-probability with
unchanged inputs reproduces the rollout's value bit for bit (the on-policy check, ratio exactly 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .errors import CoreError

__all__ = [
    "SDE_FORMS",
    "StepResult",
    "cfg_combine",
    "gaussian_log_prob",
    "get_sde_form",
    "ode_step",
    "predict_x0",
    "register_sde_form",
    "sde_mean_std",
    "sde_step",
    "split_noise",
    "transition_log_prob",
]

Scalar = float | torch.Tensor
SDEForm = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Flow-GRPO's std ~ sqrt(s / (1 - s)) is infinite at s = 1; sigmas this close to 1 take the cap.
_S_CAP_TOL = 1e-6
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------- helpers


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: bf16 cannot resolve s_next - s near s = 1 nor hold the log-density terms."""
    return torch.promote_types(x.dtype, torch.float32)


def _coef(value: Scalar, x: torch.Tensor, name: str) -> torch.Tensor:
    """A per-batch coefficient as a tensor broadcastable to ``x``: 0-d, or ``[B, 1, ..., 1]`` for a ``[B]`` input."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            return t
        if t.ndim == 1:
            if x.ndim < 1 or t.shape[0] != x.shape[0]:
                raise CoreError(
                    f"{name} has {t.shape[0]} per-sample values but the latents have batch size "
                    f"{x.shape[0] if x.ndim else 'none'} (shape {tuple(x.shape)}); expected a scalar or shape [B]"
                )
            return t.view(-1, *([1] * (x.ndim - 1)))
        raise CoreError(f"{name} must be a scalar or a tensor of shape [B], got shape {tuple(t.shape)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__} {value!r}")
    return torch.tensor(float(value), dtype=x.dtype, device=x.device)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise CoreError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def _check_step(s: torch.Tensor, s_next: torch.Tensor) -> None:
    """An SDE step needs 0 <= s_next < s <= 1 (s > 0 because the score divides by s)."""
    ok = (s_next >= 0) & (s_next < s) & (s <= 1)
    if not bool(ok.all()):
        raise CoreError(
            f"an SDE step needs 0 <= s_next < s <= 1, got s={s.flatten().tolist()} s_next={s_next.flatten().tolist()}"
        )


def _check_eta(eta: torch.Tensor) -> None:
    if not bool(((eta >= 0) & torch.isfinite(eta)).all()):
        raise CoreError(f"eta (the SDE noise level) must be finite and >= 0, got {eta.flatten().tolist()}")


def _batch_reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    if values.ndim <= 1:
        return values
    dims = tuple(range(1, values.ndim))
    return values.mean(dim=dims) if reduce == "mean" else values.sum(dim=dims)


# ----------------------------------------------------------------------------------------------- deterministic


def predict_x0(x: torch.Tensor, v: torch.Tensor, s: Scalar) -> torch.Tensor:
    """Predicted clean sample ``x0_hat = x - s * v``.

    Args:
        x: latents ``[B, ...]`` at noise level ``s``.
        v: velocity, same shape as ``x``.
        s: scalar or ``[B]``.

    Returns:
        ``[B, ...]`` in ``x``'s dtype (computed in at least float32).
    """
    _check_same_shape(x, v, "x", "v")
    ct = _compute_dtype(x)
    xf, vf = x.to(ct), v.to(ct)
    return (xf - _coef(s, xf, "s") * vf).to(x.dtype)


def ode_step(x: torch.Tensor, v: torch.Tensor, s: Scalar, s_next: Scalar) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x' = x + (s_next - s) * v``.

    Args:
        x: latents ``[B, ...]`` at noise level ``s``.
        v: velocity, same shape as ``x``.
        s, s_next: scalars or ``[B]``.

    Returns:
        ``[B, ...]`` in ``x``'s dtype (computed in at least float32, so ``s_next - s`` is resolved even for bf16).
    """
    _check_same_shape(x, v, "x", "v")
    ct = _compute_dtype(x)
    xf, vf = x.to(ct), v.to(ct)
    ds = _coef(s_next, xf, "s_next") - _coef(s, xf, "s")
    return (xf + ds * vf).to(x.dtype)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: Scalar) -> torch.Tensor:
    """Classifier-free guidance ``v = v_u + scale * (v_c - v_u)``.

    Args:
        v_uncond, v_cond: velocities ``[B, ...]`` of the same shape.
        scale: guidance weight, scalar or ``[B]``. Where it is 1, ``v_cond`` is returned exactly (no rounding).

    Returns:
        ``[B, ...]``.
    """
    _check_same_shape(v_cond, v_uncond, "v_cond", "v_uncond")
    if isinstance(scale, torch.Tensor):
        w = _coef(scale, v_cond, "scale")
        return torch.where(w == 1, v_cond, v_uncond + w * (v_cond - v_uncond))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__} {scale!r}")
    if float(scale) == 1.0:
        return v_cond
    return v_uncond + float(scale) * (v_cond - v_uncond)


# ----------------------------------------------------------------------------------------------- SDE registry

SDE_FORMS: dict[str, SDEForm] = {}


def register_sde_form(name: str) -> Callable[[SDEForm], SDEForm]:
    """Decorator adding ``fn(x, v, s, s_next, eta, s_cap) -> (mean, std)`` to :data:`SDE_FORMS` under ``name``.

    ``mean`` has ``x``'s shape; ``std`` broadcasts to it (0-d or ``[B, 1, ..., 1]``).
    """
    if not isinstance(name, str) or not name:
        raise CoreError(f"an SDE form name must be a non-empty string, got {name!r}")

    def add(fn: SDEForm) -> SDEForm:
        if name in SDE_FORMS and SDE_FORMS[name] is not fn:
            raise CoreError(f"SDE form {name!r} is already registered")
        SDE_FORMS[name] = fn
        return fn

    return add


def get_sde_form(name: str) -> SDEForm:
    """The registered SDE form called ``name``; a clear error listing the known names otherwise."""
    try:
        return SDE_FORMS[name]
    except (KeyError, TypeError):
        raise CoreError(f"unknown SDE form {name!r}; known forms: {', '.join(sorted(SDE_FORMS))}") from None


def _resolve_form(form: str | SDEForm) -> SDEForm:
    return form if callable(form) else get_sde_form(form)


@register_sde_form("dance")
def dance_form(
    x: torch.Tensor, v: torch.Tensor, s: Scalar, s_next: Scalar, eta: Scalar, s_cap: Scalar | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DanceGRPO / BranchGRPO SDE step.

    score ``g = -(x - (1 - s) * x0_hat) / s^2``, ``x0_hat = x - s * v``; ``ds = s_next - s``;
    ``mean = x + ds * (v - 0.5 * eta^2 * g)``; ``std = eta * sqrt(s - s_next)``. ``s_cap`` is unused.

    Args:
        x, v: ``[B, ...]`` latents and velocity (the arithmetic runs in their dtype).
        s, s_next, eta: scalars or ``[B]``.

    Returns:
        ``mean [B, ...]``, ``std`` 0-d or ``[B, 1, ..., 1]``.
    """
    _check_same_shape(x, v, "x", "v")
    sc, snc, ec = _coef(s, x, "s"), _coef(s_next, x, "s_next"), _coef(eta, x, "eta")
    _check_step(sc, snc)
    _check_eta(ec)
    ds = snc - sc
    # Same score, rearranged: x - (1 - s)(x - s v) = s (x + (1 - s) v), which avoids cancelling two O(1) terms.
    g = -(x + (1 - sc) * v) / sc
    mean = x + ds * (v - 0.5 * ec**2 * g)
    std = ec * torch.sqrt(sc - snc)
    return mean, std


@register_sde_form("flow")
def flow_form(
    x: torch.Tensor, v: torch.Tensor, s: Scalar, s_next: Scalar, eta: Scalar, s_cap: Scalar | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO SDE step (noise level ``eta``, Flow-GRPO's ``a``, default 0.7 there).

    ``sig = eta * sqrt(s / (1 - s))``; ``ds = s_next - s``;
    ``mean = x + ds * (v + sig^2 / (2 s) * (x + (1 - s) * v))``; ``std = sig * sqrt(|ds|)``.
    At ``s = 1`` (within 1e-6) the ``s`` under the square root's denominator is replaced by ``s_cap``, the
    schedule's ``s_1``, exactly as Flow-GRPO's released code does (``sqrt(s / (1 - where(s == 1, s_1, s)))``);
    the numerator and the mean keep ``s``.

    Args:
        x, v: ``[B, ...]`` latents and velocity (the arithmetic runs in their dtype).
        s, s_next, eta: scalars or ``[B]``.
        s_cap: scalar or ``[B]`` in (0, 1); required only when some ``s`` is 1.

    Returns:
        ``mean [B, ...]``, ``std`` 0-d or ``[B, 1, ..., 1]``.
    """
    _check_same_shape(x, v, "x", "v")
    sc, snc, ec = _coef(s, x, "s"), _coef(s_next, x, "s_next"), _coef(eta, x, "eta")
    _check_step(sc, snc)
    _check_eta(ec)
    at_top = sc >= 1 - _S_CAP_TOL
    s_denom = sc
    if bool(at_top.any()):
        if s_cap is None:
            raise CoreError("the flow SDE form at s = 1 needs s_cap (the schedule's s_1, in (0, 1)); got None")
        cap = _coef(s_cap, x, "s_cap")
        if not bool(((cap > 0) & (cap < 1)).all()):
            raise CoreError(f"s_cap must lie in (0, 1), got {cap.flatten().tolist()}")
        s_denom = torch.where(at_top, cap, sc)
    sig = ec * torch.sqrt(sc / (1 - s_denom))
    ds = snc - sc
    mean = x + ds * (v + sig**2 / (2 * sc) * (x + (1 - sc) * v))
    std = sig * torch.sqrt(ds.abs())
    return mean, std


# ----------------------------------------------------------------------------------------------- log-probability


def gaussian_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, std: Scalar, reduce: str = "mean"
) -> torch.Tensor:
    """``log N(x_next; mean, std^2 I)`` per sample.

    All inputs are cast to (at least) float32 first: bf16 cannot hold the squared residual over a tiny variance.

    Args:
        x_next: ``[B, ...]``.
        mean: broadcastable to ``x_next`` (normally the same shape).
        std: float, 0-d, or broadcastable to ``x_next`` (e.g. ``[B, 1, ..., 1]``); must be >= 0.
            Where it is 0 the density is degenerate and the result is NaN (a deterministic step has no log-prob).
        reduce: ``"mean"`` (default, as the references do: keeps ratios near 1) or ``"sum"`` over all non-batch
            elements.

    Returns:
        float32 (float64 for float64 inputs) tensor ``[B]``.
    """
    if reduce not in ("mean", "sum"):
        raise CoreError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if x_next.ndim < 1:
        raise CoreError("x_next must have a batch dimension, got a 0-d tensor")
    ct = torch.promote_types(torch.promote_types(x_next.dtype, mean.dtype), torch.float32)
    if isinstance(std, torch.Tensor):
        sd = std.to(device=x_next.device, dtype=ct)
    else:
        sd = torch.tensor(float(std), dtype=ct, device=x_next.device)
    xn, mu = x_next.to(ct), mean.to(ct)
    try:
        full = torch.broadcast_shapes(xn.shape, mu.shape, sd.shape)
    except RuntimeError:
        full = None
    if full != xn.shape:
        raise CoreError(
            f"mean {tuple(mu.shape)} and std {tuple(sd.shape)} must broadcast to x_next {tuple(xn.shape)}"
        )
    if bool((sd < 0).any()):
        raise CoreError(f"std must be >= 0, got min {sd.min().item()}")
    lp = -((xn - mu) ** 2) / (2 * sd * sd) - torch.log(sd) - _HALF_LOG_2PI
    lp = torch.where(sd > 0, lp, torch.full_like(lp, float("nan")))
    return _batch_reduce(lp, reduce)


class StepResult(NamedTuple):
    """One SDE transition.

    latent: ``[B, ...]`` the child, in the parent's dtype.
    mean: ``[B, ...]`` transition mean, float32 (float64 for float64 parents).
    std: 0-d or ``[B, 1, ..., 1]``, same dtype as ``mean``.
    log_prob: ``[B]`` log-density of ``latent`` (as stored, i.e. after the cast to the parent's dtype).
    """

    latent: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def sde_mean_std(
    form: str | SDEForm,
    x: torch.Tensor,
    v: torch.Tensor,
    s: Scalar,
    s_next: Scalar,
    eta: Scalar,
    s_cap: Scalar | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transition ``(mean, std)`` of SDE ``form`` (a registered name or a form function), computed in at least float32.

    This is the single path used by :func:`sde_step` and :func:`transition_log_prob` (and by objectives that need
    ``mean`` and ``std``, e.g. a KL to a reference policy).

    Args:
        x, v: ``[B, ...]`` parent latents and velocity, same shape, any float dtype.
        s, s_next, eta, s_cap: scalars or ``[B]`` (see the form).

    Returns:
        ``mean [B, ...]``, ``std`` 0-d or ``[B, 1, ..., 1]``.
    """
    fn = _resolve_form(form)
    _check_same_shape(x, v, "x", "v")
    ct = _compute_dtype(x)
    return fn(x.to(ct), v.to(ct), s, s_next, eta, s_cap)


def sde_step(
    form: str | SDEForm,
    x: torch.Tensor,
    v: torch.Tensor,
    s: Scalar,
    s_next: Scalar,
    eta: Scalar,
    s_cap: Scalar | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
) -> StepResult:
    """Sample ``x' = mean + std * noise`` and its log-probability.

    Args:
        form: SDE form name (``"dance"``, ``"flow"``, ...) or form function.
        x, v: ``[B, ...]`` parent latents and velocity.
        s, s_next, eta, s_cap: scalars or ``[B]``.
        noise: ``[B, ...]`` standard normal noise (e.g. from :func:`split_noise`); drawn in float32 from
            ``generator`` on ``x``'s device when omitted.
        reduce: log-prob reduction, ``"mean"`` or ``"sum"``.

    Returns:
        :class:`StepResult`; ``latent`` keeps ``x``'s dtype and ``log_prob`` is that of the stored latent, so
        :func:`transition_log_prob` on the same inputs returns the identical value.
    """
    if reduce not in ("mean", "sum"):
        raise CoreError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    mean, std = sde_mean_std(form, x, v, s, s_next, eta, s_cap)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    else:
        _check_same_shape(x, noise, "x", "noise")
    latent = (mean + std * noise.to(device=mean.device, dtype=mean.dtype)).to(x.dtype)
    log_prob = gaussian_log_prob(latent.detach(), mean, std, reduce)
    return StepResult(latent=latent, mean=mean, std=std, log_prob=log_prob)


def transition_log_prob(
    form: str | SDEForm,
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    s: Scalar,
    s_next: Scalar,
    eta: Scalar,
    s_cap: Scalar | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Log-probability of a stored child ``x_next`` given the parent ``x`` and a (new) velocity ``v``.

    The trainer's ``logp_theta``: differentiable in ``v``; the child is held fixed (detached). Same code path as
    :func:`sde_step`, so unchanged inputs give the rollout's log-prob exactly.

    Args:
        x, v, x_next: ``[B, ...]``, same shape.
        s, s_next, eta, s_cap: scalars or ``[B]``.
        reduce: ``"mean"`` or ``"sum"`` over non-batch elements.

    Returns:
        ``[B]`` float32 (float64 for float64 inputs).
    """
    _check_same_shape(x, x_next, "x", "x_next")
    mean, std = sde_mean_std(form, x, v, s, s_next, eta, s_cap)
    return gaussian_log_prob(x_next.detach(), mean, std, reduce)


# ----------------------------------------------------------------------------------------------- branching noise


def split_noise(
    shape: Sequence[int],
    k: int,
    correlation: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    independent: bool = False,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Correlated noise for the ``k`` children of a split node (BranchGRPO).

    ``xi_b = (xi_0 + c * z_b) / sqrt(1 + c^2)`` with ``xi_0 ~ N(0, I)`` shared by the siblings and ``z_b ~ N(0, I)``
    per child, ``c = correlation``. Every ``xi_b`` is exactly ``N(0, I)`` (so each child has the marginal of a
    sequential SDE step), and two siblings have per-element correlation ``1 / (1 + c^2)``: ``c = 0`` gives identical
    siblings, ``c = 4`` (the default) 1/17. ``independent=True``, or ``c = inf``, is the limit ``c -> infinity``:
    ``k`` independent draws.

    Args:
        shape: the shape of one child's noise, e.g. ``(C, F, H, W)`` or ``(B, C, F, H, W)``.
        k: number of children, >= 1.
        correlation: ``c >= 0``.
        generator: drawn from in float32 (``xi_0`` first, then the ``z_b``); its device is used if ``device`` is None.
        dtype: dtype of the result.
        independent: draw independent noise instead.

    Returns:
        ``[k, *shape]`` tensor.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CoreError(f"k (the branching factor) must be an integer >= 1, got {k!r}")
    try:
        c = float(correlation)
    except (TypeError, ValueError):
        raise CoreError(f"correlation must be a number >= 0, got {correlation!r}") from None
    if math.isnan(c) or c < 0:
        raise CoreError(f"correlation must be a number >= 0, got {correlation!r}")
    shape = tuple(int(n) for n in shape)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if independent or math.isinf(c):
        return torch.randn((k, *shape), generator=generator, device=device, dtype=torch.float32).to(dtype)
    xi0 = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    z = torch.randn((k, *shape), generator=generator, device=device, dtype=torch.float32)
    return ((xi0 + c * z) / math.sqrt(1.0 + c * c)).to(dtype)
