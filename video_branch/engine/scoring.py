"""Decode and reward: leaf latents -> frames -> named rewards, as node-length arrays the credit step reads.

A failed sample scores NaN (the reward models report it; an infinite score is treated the same), never a made-up
value. Inside a sequence-parallel group the reward runs once, on the group's first rank, and is shared.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

from ..core.credit import leaf_vector
from ..models.vae import decode_to_frames
from ..parallel.collectives import sp_shared
from ..parallel.groups import Dist
from .rollout import RolloutResult


def reward_weights(components: Mapping[str, Mapping]) -> Dict[str, float]:
    """{reward name: weight} of the run's weighted components (``reward.components``)."""
    return {k: float(v.get("weight", 1.0)) for k, v in components.items()}


def weighted_total(weights: Mapping[str, float], rewards: Mapping[str, np.ndarray], index=None) -> np.ndarray:
    """The leaves' reward: ``sum_k weights[k] * rewards[k]`` in the order of ``weights`` (NaN where a weighted
    component is NaN), over ``rewards[k][index]`` when an index is given; the arrays' dtype is kept."""
    return sum(w * (rewards[k] if index is None else rewards[k][index]) for k, w in weights.items())


def decode(vae, latents: torch.Tensor, d: Dist, batch_size: int) -> torch.Tensor:
    """uint8 frames [B, T, H, W, 3] on the CPU."""
    with torch.no_grad():
        return decode_to_frames(vae, latents.to(d.device), batch_size=batch_size).cpu()


def score_frames(reward, frames: torch.Tensor, prompts: List[str], d: Dist) -> Dict[str, torch.Tensor]:
    """{reward name: [B]} on the CPU, computed once per sequence-parallel group."""
    return sp_shared(d, lambda: {k: v.detach().cpu() for k, v in reward(frames, prompts).items()})


def score_leaves(res: RolloutResult, vae, reward, d: Dist, *, reward_on: str,
                 decode_batch: int) -> Dict[str, np.ndarray]:
    """Decode the leaves and score them: {reward name: [N] node-length array, NaN off-leaf or on failure}.

    ``reward_on``: ``"final"`` (the leaves' latents) or ``"x0_hat"`` (the last step's predicted clean sample).
    The decoded frames are kept on ``res.frames``.
    """
    tree = res.tree
    leaves = tree.leaves()
    lat = res.leaf_x0_hat if reward_on == "x0_hat" else res.leaf_latents
    frames = decode(vae, lat, d, decode_batch)
    prompts = [res.prompts[t] for t in tree.tree[leaves]]
    scores = score_frames(reward, frames, prompts, d)
    res.frames = frames
    out = {}
    for k, v in scores.items():
        v = v.detach().cpu().double().numpy()
        if np.isinf(v).any():  # an infinite score is a failed sample, never a value to train on
            warnings.warn(f"reward '{k}' returned infinite scores for {int(np.isinf(v).sum())} sample(s); "
                          "they are treated as invalid (NaN)")
            v = np.where(np.isinf(v), np.nan, v)
        out[k] = leaf_vector(tree, leaves, v)
    return out


def preview_scores(prompts: Sequence[str], x0_hat: torch.Tensor, vae, reward, d: Dist,
                   weights: Mapping[str, float], decode_batch: int) -> np.ndarray:
    """Weighted reward of decoded one-step previews (Expand-and-Prune); a failed sample scores NaN."""
    frames = decode(vae, x0_hat, d, decode_batch)
    scores = score_frames(reward, frames, list(prompts), d)
    total = np.zeros(len(prompts)) + weighted_total(weights, {k: scores[k].double().numpy() for k in weights})
    return np.where(np.isfinite(total), total, np.nan)
