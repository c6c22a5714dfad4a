"""DiffusionNFT: forward-process fine-tuning on clean samples with implicit positive and negative policies.

ALGORITHMS.md section 8. For a clean sample ``x0`` with advantage ``A``, a noised ``x_t = (1 - t) x0 + t eps`` and the
old policy's velocity ``v_old`` (an exponential moving average of the trained weights):

    r  = clamp(1/2 + A / (2 A_max), 0, 1)
    v+ = b v_theta + (1 - b) v_old,     v- = (1 + b) v_old - b v_theta
    loss = r ||x0_hat(v+) - x0||^2 / w+ + (1 - r) ||x0_hat(v-) - x0||^2 / w-,    x0_hat(v) = x_t - t v

with ``w`` the detached mean-absolute error of the same prediction. At ``theta == old`` the two predictions coincide,
so an advantage of 0 (``r = 1/2``) gives no gradient. Pure functions; shapes in the docstrings.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

from .errors import CoreError
from .surrogate import WEIGHT_FLOOR, x0_from_velocity


def optimality_probability(adv: torch.Tensor, adv_max: float) -> torch.Tensor:
    """``r = clamp(1/2 + A / (2 A_max), 0, 1)``, elementwise."""
    if not adv_max > 0:
        raise CoreError(f"optimality_probability: expected adv_max > 0 (credit.adv_clip), got {adv_max!r}")
    return (0.5 + adv.float() / (2.0 * adv_max)).clamp(0.0, 1.0)


def implicit_velocities(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(v+, v-)`` = ``(b v_theta + (1 - b) v_old, (1 + b) v_old - b v_theta)``; all ``[B, ...]``."""
    v_old = v_old.to(v_theta)
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


def _normalised_error(pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``mean (pred - x0)^2 / w`` with ``w`` the detached ``mean |pred - x0|`` (floored)."""
    err = pred.float() - x0.float()
    w = err.detach().abs().flatten(1).mean(1).clamp_min(WEIGHT_FLOOR)
    return err.pow(2).flatten(1).mean(1) / w


def nft_loss(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, v_theta: torch.Tensor, v_old: torch.Tensor,
             r: torch.Tensor, beta: float) -> torch.Tensor:
    """``[B]`` per-item DiffusionNFT loss; x_t, x0, v_theta, v_old ``[B, ...]``, t and r ``[B]``."""
    v_pos, v_neg = implicit_velocities(v_theta.float(), v_old.float(), beta)
    x_t = x_t.float()
    pos = _normalised_error(x0_from_velocity(x_t, t, v_pos), x0)
    neg = _normalised_error(x0_from_velocity(x_t, t, v_neg), x0)
    r = r.to(pos)
    return r * pos + (1 - r) * neg


@torch.no_grad()
def ema_update_(ema: Iterable[torch.Tensor], current: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * current`` for each pair of tensors (same shapes)."""
    if not 0.0 <= decay <= 1.0:
        raise CoreError(f"ema_update_: expected a decay in [0, 1] (objective.ema_decay), got {decay!r}")
    for e, c in zip(ema, current, strict=True):
        if e.shape != c.shape:
            raise CoreError(f"ema_update_: shapes differ, {tuple(e.shape)} and {tuple(c.shape)}")
        e.mul_(decay).add_(c.detach().to(e), alpha=1.0 - decay)
