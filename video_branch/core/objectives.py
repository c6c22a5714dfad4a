"""Policy objectives, looked up by name (``objective.name``), each with the unit it trains on.

An edge objective (unit ``"edges"``) maps per-edge tensors to a scalar loss plus statistics. The clipped-ratio
objective of ALGORITHMS.md section 5 is the default; GRPO-Guard ratio normalisation and the KL to a frozen reference
are options of it. A sample objective (unit ``"samples"``, ALGORITHMS.md section 8: V-GRPO, DiffusionNFT) trains on
the final samples of the rollout through noised (t, eps) pairs; the trainer's training phase of that unit
(``video_branch.engine.phases``) drives it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .errors import CoreError
from .nft import nft_loss, optimality_probability
from .surrogate import pair_errors, surrogate_loss, vgrpo_loss, x0_kl

_OBJECTIVES: Dict[str, Callable[..., "ObjectiveOut"]] = {}
_INFO: Dict[str, "ObjectiveInfo"] = {}
UNITS = ("edges", "samples")


@dataclass(frozen=True)
class ObjectiveInfo:
    unit: str  # what the objective trains on: "edges" (SDE transitions) or "samples" (final latents)
    copies: Tuple[str, ...] = ()  # frozen full copies of the policy the trainer keeps for it (e.g. "ema")
    reference: bool = True  # objective.kl_coef > 0 pulls towards the frozen reference policy (the trainer loads it)


def register_objective(name: str, unit: str = "edges", copies: Tuple[str, ...] = (), reference: bool = True):
    """Register a function (or a class, registered as its instance) under ``name``."""
    if unit not in UNITS:
        raise CoreError(f"objective '{name}': unit must be one of {UNITS}, got {unit!r}")

    def deco(fn):
        if name in _OBJECTIVES:
            raise CoreError(f"objective '{name}' is registered twice")
        _OBJECTIVES[name] = fn() if isinstance(fn, type) else fn
        _INFO[name] = ObjectiveInfo(unit, tuple(copies), bool(reference))
        return fn

    return deco


def get_objective(name: str):
    if name not in _OBJECTIVES:
        close = difflib.get_close_matches(name, list(_OBJECTIVES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"config key 'objective.name': unknown objective '{name}'{hint}. "
                       f"Accepted: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def objective_info(name: str) -> ObjectiveInfo:
    get_objective(name)
    return _INFO[name]


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


KL_FORMS = ("transition", "flow_grpo")


def kl_std(form: str, std: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """[E]: the std the KL term of :func:`clipped_ratio` divides by, per edge.

    ``"transition"``: the transition std ``sd``. ``"flow_grpo"``: Flow-GRPO's ``std_dev_t = sd / sqrt(|ds|)`` (for
    its SDE form ``a * sqrt(s / (1 - s))``), which makes the KL ``|ds|`` times the transition form's.
    std: [E] or [E, 1, ...]; s, s_next: [E].
    """
    sd = std.reshape(std.shape[0], -1)[:, 0].float()
    if form == "transition":
        return sd
    if form == "flow_grpo":
        return sd / (s.float() - s_next.float()).abs().sqrt().to(sd)
    raise CoreError(f"objective.kl_form: expected one of {KL_FORMS}, got {form!r}")


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
    kl_std: Optional[torch.Tensor] = None,
) -> ObjectiveOut:
    """``L_e = -min(rho A, clip(rho, 1-eps, 1+eps) A)`` averaged over edges, plus ``kl_coef * KL``.

    logp_new, logp_old, advantages: [E]. ``mean_*``: [E, C, F, H, W] transition means (new policy, rollout
    policy, frozen reference); ``std``: [E] transition std. KL to the reference is
    ``||mu_theta - mu_ref||^2 / (2 sd^2)`` averaged over elements, with ``sd = kl_std`` when given (see
    :func:`kl_std`), else the transition std.
    """
    log_ratio = logp_new.float() - logp_old.float()
    if ratio_norm:
        if mean_new is None or mean_old is None or std is None:
            raise CoreError("objective.ratio_norm needs the new and old transition means and the std")
        log_ratio = guard_log_ratio(log_ratio, mean_new, mean_old, std)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    kl = torch.zeros((), dtype=torch.float32, device=loss.device)
    if kl_coef > 0:
        if mean_new is None or mean_ref is None or std is None:
            raise CoreError("objective.kl_coef > 0 needs the reference transition means and the std")
        sd = (std if kl_std is None else kl_std).reshape(std.shape[0], -1)[:, 0].float()
        kl = ((mean_new.float() - mean_ref.float()).pow(2).flatten(1).mean(1) / (2 * sd.pow(2))).mean()
        loss = loss + kl_coef * kl
    frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return ObjectiveOut(loss=loss, ratio=ratio.detach(), clipped_frac=frac.detach(), kl=kl.detach())


# ------------------------------------------------------------------------------------------------ sample objectives
@dataclass
class SampleBatch:
    """One micro-batch of (sample, pair) items, sample-major: the ``pairs`` items of a sample are consecutive.

    x0, eps, x_t: ``[B, ...]`` (B = samples x pairs); t, adv: ``[B]`` (the sample's advantage on each of its items).
    """

    x0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    adv: torch.Tensor
    pairs: int


class SampleObjective:
    """A sample-level objective: what to keep from the old policy, and the loss against it.

    ``old_policy`` names the module of the old quantities: ``"rollout"`` (the weights the samples were drawn with) or
    one of the registered ``copies``.
    """

    old_policy = "rollout"

    def old(self, v_old: torch.Tensor, batch: SampleBatch, cfg: Any) -> Dict[str, torch.Tensor]:
        """Per-item tensors (first dimension B) computed once, before the first update, without grad."""
        raise NotImplementedError

    def __call__(self, v: torch.Tensor, batch: SampleBatch, old: Dict[str, torch.Tensor], cfg: Any) -> ObjectiveOut:
        raise NotImplementedError

    def after_step(self, ema, cfg: Any) -> None:
        """Called after each optimizer step; ``ema(copy_name, decay)`` moves a kept copy towards the trained
        weights (the engine implements it: under ZeRO-3 it gathers the parameters)."""


@register_objective("vgrpo", unit="samples", reference=False)
class VGRPOObjective(SampleObjective):
    """V-GRPO (ALGORITHMS.md section 8): ``rho = exp(L_old - L_theta)`` of the ELBO surrogate, clipped GRPO objective
    on soft-clipped advantages, optional ``kl_coef * ||x0_hat_theta - x0_hat_old||^2``.

    The adaptive weight of each pair is taken from the old policy's error and reused for ``L_theta``, so both
    surrogates weight a pair the same and the ratio compares likelihoods only.
    """

    def old(self, v_old, batch, cfg):
        err, w = pair_errors(v_old, batch.x0.to(v_old.device), batch.eps.to(v_old.device))
        out = {"error": err, "weight": w}
        if cfg.objective.kl_coef > 0:
            out["v"] = v_old
        return out

    def __call__(self, v, batch, old, cfg):
        dev = v.device
        err, _ = pair_errors(v, batch.x0.to(dev), batch.eps.to(dev), weight=old["weight"].to(dev))
        m = batch.pairs
        loss, ratio, frac = vgrpo_loss(surrogate_loss(err, m), surrogate_loss(old["error"].to(dev), m),
                                       batch.adv.to(dev).view(-1, m)[:, 0], cfg.objective.clip_eps)
        kl = torch.zeros((), dtype=torch.float32, device=dev)
        if cfg.objective.kl_coef > 0:
            kl = x0_kl(batch.x_t.to(dev), batch.t.to(dev), v, old["v"])
            loss = loss + cfg.objective.kl_coef * kl
        return ObjectiveOut(loss=loss, ratio=ratio, clipped_frac=frac, kl=kl.detach())


@register_objective("nft", unit="samples", copies=("ema",), reference=False)
class NFTObjective(SampleObjective):
    """DiffusionNFT (ALGORITHMS.md section 8) against an exponential moving average of the policy.

    It has no likelihood ratio: ``ratio`` is empty and ``clipped_frac`` 0.
    """

    old_policy = "ema"

    def old(self, v_old, batch, cfg):
        if cfg.objective.kl_coef > 0:
            raise CoreError(f"config key 'objective.kl_coef': the nft objective has no KL term (its old policy is "
                             f"the EMA); expected 0, got {cfg.objective.kl_coef}")
        return {"v": v_old}

    def __call__(self, v, batch, old, cfg):
        dev = v.device
        r = optimality_probability(batch.adv.to(dev), cfg.credit.adv_clip)
        loss = nft_loss(batch.x_t.to(dev), batch.t.to(dev), batch.x0.to(dev), v, old["v"].to(dev), r,
                        cfg.objective.nft_beta).mean()
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        return ObjectiveOut(loss=loss, ratio=torch.zeros(0, device=dev), clipped_frac=zero, kl=zero)

    def after_step(self, ema, cfg) -> None:
        ema("ema", cfg.objective.ema_decay)
