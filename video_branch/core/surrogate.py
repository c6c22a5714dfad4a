"""V-GRPO: the ELBO surrogate log-likelihood of a final ODE sample, and its clipped-ratio objective.

ALGORITHMS.md section 8. A whole generation is one action; its log-likelihood is replaced by ``-L(x0)`` with

    L(x0) = mean over M (t, eps) pairs of  w * mean_elements (v_theta(x_t, t) - (eps - x0))^2,  x_t = (1 - t) x0 + t eps

Variance reduction: the M pairs are shared by every sample of a group (one prompt), the M times are stratified
(one per equal sub-interval of [0, 1)), and each pair's weight is ``1 / mean|error|`` (detached).

All functions are pure; tensors carry their shapes in the docstrings. Latents are ``[B, C, F, H, W]`` (any trailing
shape works: reductions are over every dimension after the first).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .errors import CoreError

SOFT_CLIP = 3.0  # advantages are soft-clipped to (-3, 3) by 3 tanh(A / 3)
WEIGHT_FLOOR = 1e-5  # the adaptive weight's mean-absolute error is floored so a perfect prediction stays finite
_PAIR_TAG = 0xE1B0


def pair_generator(seed: int, iteration: int, dp_rank: int, tree: int) -> torch.Generator:
    """The generator of one group's (t, eps) pairs: deterministic in its arguments, so the ranks of a
    sequence-parallel group (same dp_rank) draw the same pairs."""
    s = int(np.random.default_rng([int(seed) % (1 << 64), int(iteration), int(dp_rank), int(tree), _PAIR_TAG])
            .integers(0, 2**62))
    return torch.Generator().manual_seed(s)


def stratified_times(m: int, generator: torch.Generator) -> torch.Tensor:
    """``[M]`` float32 times, the j-th uniform in ``[j / M, (j + 1) / M)``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise CoreError(f"stratified_times: expected a number of pairs >= 1, got {m!r}")
    u = torch.rand(m, generator=generator, dtype=torch.float64)
    return ((torch.arange(m, dtype=torch.float64) + u) / m).to(torch.float32)


def draw_pairs(m: int, latent_shape, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One group's pairs: ``t [M]`` stratified, ``eps [M, *latent_shape]`` standard normal (CPU, float32)."""
    t = stratified_times(m, generator)
    eps = torch.randn((m, *latent_shape), generator=generator, dtype=torch.float32)
    return t, eps


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like).reshape(t.shape[0], *([1] * (like.dim() - 1)))


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``; x0, eps ``[B, ...]``, t ``[B]``."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x_t - t v``; x_t, v ``[B, ...]``, t ``[B]``."""
    return x_t - _bcast(t, x_t) * v


def adaptive_weight(error: torch.Tensor) -> torch.Tensor:
    """``[B]`` detached ``1 / mean|error|`` per item (floored at WEIGHT_FLOOR); error ``[B, ...]``."""
    return 1.0 / error.detach().float().abs().flatten(1).mean(1).clamp_min(WEIGHT_FLOOR)


def pair_errors(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted flow-matching error of each (sample, pair) item: ``w * mean (v - (eps - x0))^2``.

    v, x0, eps: ``[B, ...]``. weight: ``[B]``, or None for the adaptive weight of this error.
    Returns ``(errors [B] float32, weight [B] float32 detached)``.
    """
    err = v.float() - (eps.float() - x0.float())
    w = adaptive_weight(err) if weight is None else weight.detach().to(err)
    return w * err.pow(2).flatten(1).mean(1), w


def surrogate_loss(errors: torch.Tensor, pairs: int) -> torch.Tensor:
    """``L [S]``: the mean over each sample's ``pairs`` consecutive items of ``errors [S * pairs]``."""
    if errors.dim() != 1 or errors.shape[0] % pairs:
        raise CoreError(f"surrogate_loss: expected [S * {pairs}] errors, got shape {tuple(errors.shape)}")
    return errors.view(-1, pairs).mean(1)


def soft_clip(adv: torch.Tensor, bound: float = SOFT_CLIP) -> torch.Tensor:
    """``bound * tanh(A / bound)``: near the identity for small A, never beyond ``(-bound, bound)``."""
    return bound * torch.tanh(adv / bound)


def vgrpo_loss(loss_new: torch.Tensor, loss_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped GRPO objective with ``rho = exp(L_old - L_theta)`` and soft-clipped advantages.

    loss_new, loss_old, advantages: ``[S]``. Returns ``(loss scalar, ratio [S] detached, clipped fraction detached)``.
    """
    ratio = torch.exp(loss_old.detach().float() - loss_new.float())
    adv = soft_clip(advantages.to(ratio))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return loss, ratio.detach(), frac.detach()


def x0_kl(x_t: torch.Tensor, t: torch.Tensor, v_new: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """``mean ||x0_hat_theta - x0_hat_old||^2`` over items and elements (scalar); all ``[B, ...]`` but t ``[B]``."""
    d = x0_from_velocity(x_t, t, v_new.float()) - x0_from_velocity(x_t, t, v_old.float().to(v_new.device))
    return d.pow(2).flatten(1).mean(1).mean()
