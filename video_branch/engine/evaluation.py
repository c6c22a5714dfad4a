"""Held-out evaluation during training: ODE samples from fixed seeds, scored by the run's rewards.

The seeds depend only on ``eval.seed`` and the prompt, so evaluations before and after training see the same initial
noise and their difference measures the policy, not the sampling.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch.distributed as dist

from ..core.stats import mean_ci
from ..parallel.groups import Dist
from .sampling import generate
from .scoring import score_frames


def shard(n: int, parts: int, index: int) -> List[int]:
    """Indices of member ``index`` when n items are dealt to ``parts`` members, padded by repetition so that every
    member gets the same count (equal forward calls on every rank). Returns -1 for padding."""
    per = -(-n // parts)
    ids = list(range(index * per, min(n, (index + 1) * per)))
    return ids + [-1] * (per - len(ids))


def heldout_scores(cfg, d: Dist, prompts: Sequence[str], wan, encoder, transformer, reward) -> Dict[str, np.ndarray]:
    """{reward term: [prompts * clips]} over the held-out ``prompts``, sampled with ``transformer`` (the VAE of
    ``wan`` decodes), gathered from every data-parallel member."""
    mine = shard(len(prompts), d.dp_size, d.dp_rank)
    local_prompts = [prompts[i if i >= 0 else 0] for i in mine]
    seeds = [cfg.eval.seed * 100003 + max(i, 0) for i in mine]
    frames = generate(wan, local_prompts, seeds, num_steps=cfg.eval.num_steps,
                      guidance_scale=cfg.eval.guidance_scale, shift=cfg.tree.shift, num_frames=cfg.video.num_frames,
                      height=cfg.video.height, width=cfg.video.width, negative_prompt=cfg.rollout.negative_prompt,
                      frontier_batch=cfg.rollout.frontier_batch, clips_per_prompt=cfg.eval.clips_per_prompt,
                      encoder=encoder, transformer=transformer, decode_batch=cfg.rollout.decode_batch)
    # Rows are prompt-major: clip c of local prompt t is row t * clips + c.
    tree_of_leaf = np.repeat(np.arange(len(local_prompts)), cfg.eval.clips_per_prompt)
    scores = score_frames(reward, frames, [local_prompts[t] for t in tree_of_leaf], d)
    keep = np.array([mine[t] >= 0 for t in tree_of_leaf])
    local = {k: v.numpy()[keep] for k, v in scores.items()}
    if d.world_size == 1:
        return local
    gathered: List = [None] * d.world_size
    dist.all_gather_object(gathered, (d.sp_rank, int(keep.sum()), local))
    parts = [(n, part) for sp_rank, n, part in gathered if sp_rank == 0]  # an SP group's ranks hold the same clips
    # A member whose reward never scored a sample knows only the reward's own name, not its sub-scores: its clips
    # are NaN in every term the others report, in their place, so every term's clips stay in the same order.
    keys = list(dict.fromkeys(k for _, part in parts for k in part))
    return {k: np.concatenate([np.asarray(part[k], dtype=np.float64) if k in part else np.full(n, np.nan)
                               for n, part in parts]) for k in keys}


def summarize(scores: Dict[str, np.ndarray]) -> Dict:
    """Mean and 95% CI per reward term, the clip count, and the per-clip scores in their fixed order (same seeds
    every evaluation, for paired before/after differences)."""
    summary: Dict = {}
    for k, v in scores.items():
        m, ci = mean_ci(v)
        summary[k], summary[k + "_ci95"] = m, ci
    summary["n"] = int(len(next(iter(scores.values()))))
    summary["valid"] = {k: int(np.isfinite(np.asarray(v, dtype=np.float64)).sum()) for k, v in scores.items()}
    summary["per_clip"] = {k: [float(x) for x in np.asarray(v, dtype=np.float64)] for k, v in scores.items()}
    return summary
