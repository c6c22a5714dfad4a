"""Policy objectives over trained edges, looked up by name (``objective.name``).

An objective maps per-edge tensors to a scalar loss plus statistics. The clipped-ratio objective of ALGORITHMS.md
section 5 is the default; GRPO-Guard ratio normalisation and the KL to a frozen reference are options of it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

_OBJECTIVES: Dict[str, Callable[..., "ObjectiveOut"]] = {}


def register_objective(name: str):
    def deco(fn):
        if name in _OBJECTIVES:
            raise ValueError(f"objective '{name}' is registered twice")
        _OBJECTIVES[name] = fn
        return fn

    return deco


def get_objective(name: str):
    if name not in _OBJECTIVES:
        close = difflib.get_close_matches(name, list(_OBJECTIVES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"config key 'objective.name': unknown objective '{name}'{hint}. Accepted: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name]


@dataclass
class ObjectiveOut:
    loss: torch.Tensor  # scalar, mean over the edges of the micro-batch
    ratio: torch.Tensor  # [E] detached
    clipped_frac: torch.Tensor  # scalar, detached
    kl: torch.Tensor  # scalar, detached (0 without a reference)


def guard_log_ratio(log_ratio: torch.Tensor, mean_new: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor):
    """GRPO-Guard: ``sd * (log rho + ||mu_theta - mu_old||^2 / (2 sd^2))`` per edge.

    log_ratio [E]; mean_new, mean_old [E, ...]; std [E] or [E, 1, ...] (the edge's transition std).
    The squared distance is averaged over elements, matching the mean-reduced log-prob.
    """
    sd = std.reshape(std.shape[0], -1)[:, 0].to(torch.float32)
    d2 = (mean_new.float() - mean_old.float()).pow(2).flatten(1).mean(1)
    return sd * (log_ratio + d2 / (2 * sd.pow(2)))


@register_objective("clipped")
def clipped_ratio(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float = 0.0,
    mean_new: Optional[torch.Tensor] = None,
    mean_old: Optional[torch.Tensor] = None,
    mean_ref: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    ratio_norm: bool = False,
) -> ObjectiveOut:
    """``L_e = -min(rho A, clip(rho, 1-eps, 1+eps) A)`` averaged over edges, plus ``kl_coef * KL``.

    logp_new, logp_old, advantages: [E]. ``mean_*``: [E, C, F, H, W] transition means (new policy, rollout
    policy, frozen reference); ``std``: [E] transition std. KL to the reference is
    ``||mu_theta - mu_ref||^2 / (2 sd^2)`` averaged over elements.
    """
    log_ratio = logp_new.float() - logp_old.float()
    if ratio_norm:
        if mean_new is None or mean_old is None or std is None:
            raise ValueError("objective.ratio_norm needs the new and old transition means and the std")
        log_ratio = guard_log_ratio(log_ratio, mean_new, mean_old, std)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    kl = torch.zeros((), dtype=torch.float32, device=loss.device)
    if kl_coef > 0:
        if mean_new is None or mean_ref is None or std is None:
            raise ValueError("objective.kl_coef > 0 needs the reference transition means and the std")
        sd = std.reshape(std.shape[0], -1)[:, 0].float()
        kl = ((mean_new.float() - mean_ref.float()).pow(2).flatten(1).mean(1) / (2 * sd.pow(2))).mean()
        loss = loss + kl_coef * kl
    frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return ObjectiveOut(loss=loss, ratio=ratio.detach(), clipped_frac=frac.detach(), kl=kl.detach())
