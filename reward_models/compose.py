"""Several rewards behind one call: weights, timing, retries, and per-sample NaN for failures.

``ComposedReward`` calls each component reward on the same batch. A component that raises is retried (``retries``
times, default once) on the whole batch; if it still raises, each sample is scored alone so that only the samples
that fail become NaN, and a warning names the reward and the error. Nothing is ever made up for a failed sample:
the trainer excludes NaN samples.

The output dict holds, for each component ``name``, its primary score under ``name`` and every score it returned
under ``name/<key>``. The primary score is the output ``key`` given in the component's config, or else the only
output, or the output named like the reward, or ``overall`` / ``Overall``. A reward that has failed on every sample
since it was built has no known outputs: it reports only ``name`` (all NaN), and callers that merge outputs from
several processes (the trainer's metrics, held-out evaluation) take the union of the keys. ``weighted_sum``
combines primary scores with the component weights (ALGORITHMS.md section 3, default mode); normalising each reward
first is the credit module's job.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .registry import build

log = logging.getLogger(__name__)


class RewardOutputError(TypeError):
    """A reward returned something that breaks the protocol (a bug, never retried)."""


def weighted_sum(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * scores[k]``.

    scores: name -> float Tensor[B]; weights: name -> float, every name must be in scores. Returns Tensor[B];
    a NaN in any weighted score makes that sample NaN (a sample one reward could not score has no total).
    A weight of 0 still propagates NaN: the reward was asked for, so its failure is not hidden.
    """
    if not weights:
        raise ValueError("weighted_sum: no weights given")
    missing = [k for k in weights if k not in scores]
    if missing:
        raise KeyError(f"weighted_sum: no scores for {missing}; have {sorted(scores)}")
    total = None
    for name, w in weights.items():
        term = float(w) * scores[name].float()
        total = term if total is None else total + term
    return total


def _primary_key(name: str, keys: List[str], key: Optional[str]) -> str:
    if key is not None:
        if key not in keys:
            raise RewardOutputError(f"reward '{name}': configured key '{key}' not in its outputs {keys}")
        return key
    if len(keys) == 1:
        return keys[0]
    for cand in (name, "overall", "Overall"):
        if cand in keys:
            return cand
    raise RewardOutputError(f"reward '{name}' returns {keys}: set 'key' in its config to pick the score to weight")


class ComposedReward:
    """``rm(frames, prompts) -> dict[str, Tensor[B]]`` over several weighted rewards.

    components: name -> (reward callable, weight) or (reward callable, weight, primary output key or None).
    ``weights`` maps names to weights; ``last_times`` holds each component's wall time (s) of the last call
    (retries included); ``last_failures`` the sample indices each component could not score.
    """

    def __init__(self, components: Mapping[str, Tuple], retries: int = 1):
        if not components:
            raise ValueError("ComposedReward needs at least one component")
        if int(retries) < 0:
            raise ValueError(f"ComposedReward: retries must be >= 0, got {retries}")
        self.rewards: Dict[str, Callable] = {}
        self.weights: Dict[str, float] = {}
        self.keys: Dict[str, Optional[str]] = {}
        for name, spec in components.items():
            if not isinstance(spec, tuple) or len(spec) not in (2, 3) or not callable(spec[0]):
                raise ValueError(f"ComposedReward: component '{name}' must be (reward, weight[, key]), got {spec!r}")
            w = float(spec[1])
            if not math.isfinite(w):
                raise ValueError(f"ComposedReward: weight of '{name}' must be finite, got {spec[1]!r}")
            self.rewards[name] = spec[0]
            self.weights[name] = w
            self.keys[name] = spec[2] if len(spec) == 3 else None
        self.retries = int(retries)
        self.last_times: Dict[str, float] = {}
        self.last_failures: Dict[str, List[int]] = {}
        self._seen_keys: Dict[str, List[str]] = {}

    def _checked(self, name: str, out, batch: int) -> Dict[str, torch.Tensor]:
        if not isinstance(out, Mapping) or not out:
            raise RewardOutputError(f"reward '{name}' must return a non-empty dict of Tensor[B], got {type(out)}")
        res = {}
        for k, v in out.items():
            if not isinstance(v, torch.Tensor) or v.shape != (batch,):
                raise RewardOutputError(f"reward '{name}' output '{k}' must be a Tensor of shape ({batch},), "
                                        f"got {getattr(v, 'shape', type(v))}")
            res[k] = v.detach().float().cpu()
        return res

    def _run_one(self, name: str, rm: Callable, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]:
        batch = frames.shape[0]
        err: Optional[BaseException] = None
        for _ in range(1 + self.retries):
            try:
                out = self._checked(name, rm(frames, prompts), batch)
                self.last_failures[name] = []
                return out
            except RewardOutputError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a reward model is reported, not fatal
                err = e
        log.warning("reward '%s' failed on the batch of %d after %d attempt(s): %s: %s; scoring samples one by one",
                    name, batch, 1 + self.retries, type(err).__name__, err)
        per_sample: List[Optional[Dict[str, torch.Tensor]]] = []
        failed = []
        for i in range(batch):
            if batch == 1:
                per_sample.append(None)
                failed.append(i)
                break
            try:
                per_sample.append(self._checked(name, rm(frames[i:i + 1], prompts[i:i + 1]), 1))
            except RewardOutputError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("reward '%s' failed on sample %d: %s: %s; it is reported as NaN",
                            name, i, type(e).__name__, e)
                per_sample.append(None)
                failed.append(i)
        keys = next((list(o) for o in per_sample if o is not None), None) or self._seen_keys.get(name)
        if keys is None:
            keys = [self.keys[name] or name]
        out = {k: torch.full((batch,), float("nan")) for k in keys}
        for i, o in enumerate(per_sample):
            if o is None:
                continue
            for k in keys:
                if k not in o:
                    raise RewardOutputError(f"reward '{name}' returned keys {sorted(o)} for sample {i}, "
                                            f"expected {keys}")
                out[k][i] = o[k][0]
        self.last_failures[name] = failed
        return out

    def __call__(self, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]:
        if frames.shape[0] != len(prompts):
            raise ValueError(f"ComposedReward: {frames.shape[0]} clips but {len(prompts)} prompts")
        result: Dict[str, torch.Tensor] = {}
        done: Dict[int, Tuple[str, Dict[str, torch.Tensor]]] = {}  # one call per model shared by components
        for name, rm in self.rewards.items():
            start = time.perf_counter()
            if id(rm) in done:
                first, out = done[id(rm)]
                self.last_failures[name] = self.last_failures[first]
            else:
                out = self._run_one(name, rm, frames, list(prompts))
                done[id(rm)] = (name, out)
            self.last_times[name] = time.perf_counter() - start
            keys = list(out)
            if len(self.last_failures[name]) < frames.shape[0]:
                self._seen_keys[name] = keys
            elif name not in self._seen_keys:
                # Nothing scored yet: the reward's outputs are unknown, so only its (NaN) score is reported, never
                # a made-up sub-score key; a caller that merges outputs (other ranks) fills in the rest.
                result[name] = torch.full((frames.shape[0],), float("nan"))
                continue
            primary = _primary_key(name, keys, self.keys[name])
            result[name] = out[primary]
            for k, v in out.items():
                result[f"{name}/{k}"] = v
        return result

    def total(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the primary scores of one call's output (NaN where any component failed)."""
        return weighted_sum({k: scores[k] for k in self.weights}, self.weights)


def build_from_config(components: Mapping[str, Mapping], retries: int = 1) -> ComposedReward:
    """Build a ComposedReward from ``{name: {weight: w, [reward: registry name], [key: output], **options}}``.

    ``reward`` defaults to the component name (set it to use one reward twice with different options); every other
    key is passed to that reward's constructor. Errors name the component and the offending option.
    """
    if not isinstance(components, Mapping) or not components:
        raise ValueError(f"reward config must be a non-empty mapping of name -> options, got {components!r}")
    built = {}
    instances: Dict[str, Callable] = {}  # components with the same reward and options share one model
    for name, cfg in components.items():
        if not isinstance(cfg, Mapping):
            raise ValueError(f"reward '{name}': config must be a mapping with at least 'weight', got {cfg!r}")
        opts = dict(cfg)
        if "weight" not in opts:
            raise ValueError(f"reward '{name}': missing 'weight'")
        weight = opts.pop("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward '{name}': 'weight' must be a finite number, got {weight!r}")
        reg_name = opts.pop("reward", name)
        key = opts.pop("key", None)
        ident = f"{reg_name}|{sorted(opts.items())!r}"
        try:
            rm = instances[ident] if ident in instances else build(reg_name, **opts)
            instances[ident] = rm
        except (TypeError, ValueError, KeyError, FileNotFoundError) as e:
            msg = e.args[0] if e.args else str(e)
            prefix = f"reward '{name}'" + (f" (registry name '{reg_name}')" if reg_name != name else "")
            if str(msg).startswith(f"reward '{reg_name}'"):
                msg = str(msg)[len(f"reward '{reg_name}'"):].lstrip(": ")
            raise type(e)(f"{prefix}: {msg}") from e
        built[name] = (rm, float(weight), key)
    return ComposedReward(built, retries=retries)
