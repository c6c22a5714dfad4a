"""Reward registry: names to constructors.

Every reward is a callable ``rm(frames, prompts) -> dict[str, Tensor[B]]`` where ``frames`` is uint8
``[B, T, H, W, 3]`` (T = 1 for images) and ``prompts`` is a list of B strings. Scores are float tensors on the CPU;
a sample that could not be scored is NaN (never a made-up value).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, List, Protocol

import torch


class RewardModel(Protocol):
    def __call__(self, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]: ...


_REGISTRY: Dict[str, Callable[..., RewardModel]] = {}
_CHECKS: Dict[str, Callable[..., None]] = {}


def register(name: str):
    """Decorator: ``@register("temporal_consistency")`` on a constructor (class or function)."""

    def deco(ctor):
        if name in _REGISTRY and _REGISTRY[name] is not ctor:
            raise ValueError(f"reward '{name}' is registered twice")
        _REGISTRY[name] = ctor
        return ctor

    return deco


def register_check(name: str):
    """Decorator: ``@register_check("videoalign")`` on ``fn(**options)`` that validates a reward's options and files
    without loading weights (raising ``FileNotFoundError`` or ``ValueError`` naming the file or option)."""

    def deco(fn):
        _CHECKS[name] = fn
        return fn

    return deco


def check(name: str, **options) -> None:
    """Everything about ``build(name, **options)`` that can be known without building it: the name, the options
    against the constructor's signature, and the reward's registered file check (paths, configs, headers)."""
    _import_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown reward '{name}'. Available: {', '.join(sorted(_REGISTRY))}.{hint}")
    check_options(name, _REGISTRY[name], options)
    if name in _CHECKS:
        _CHECKS[name](**options)


def available() -> List[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build(name: str, **options) -> RewardModel:
    """Construct the reward registered as ``name`` with its options."""
    _import_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown reward '{name}'. Available: {', '.join(sorted(_REGISTRY))}.{hint}")
    ctor = _REGISTRY[name]
    check_options(name, ctor, options)
    return ctor(**options)


def check_options(name: str, ctor: Callable, options: Dict) -> None:
    """Raise ``TypeError`` naming the reward and the option when ``options`` do not fit ``ctor``'s signature."""
    try:
        sig = inspect.signature(ctor)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself complain
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise TypeError(f"reward '{name}': unknown option '{key}'. "
                            f"Accepted: {', '.join(accepted) or 'none'}.{hint}")
    missing = [k for k, p in params.items()
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and k not in options]
    if missing:
        raise TypeError(f"reward '{name}': missing required option(s) {', '.join(missing)}")


def _import_builtin() -> None:
    # Importing the modules registers their rewards; each is optional so a broken extra never hides the others.
    import importlib

    for mod in ("toyworld", "temporal", "videoalign", "image", "file_checks"):
        try:
            importlib.import_module(f"reward_models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"reward_models.{mod}":
                raise
