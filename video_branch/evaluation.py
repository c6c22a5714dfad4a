"""Held-out evaluation during training: ODE samples from fixed seeds, scored by the run's rewards.

The seeds depend only on ``eval.seed`` and the prompt, so evaluations before and after training see the same initial
noise and their difference measures the policy, not the sampling.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from .rollout import rollout
from .tree import TreeSpec


def ode_spec(num_steps: int, shift: float, clips: int) -> TreeSpec:
    """``clips`` independent ODE chains per prompt (no log-probs, nothing trained)."""
    return TreeSpec(num_steps=num_steps, roots=clips, split_steps=(), branching=1, split_noise="independent",
                    correlation=0.0, kinds=("ode",) * num_steps, sde_form="dance", eta=0.0, split_eta=None,
                    shift=shift)


def shard(n: int, parts: int, index: int) -> List[int]:
    """Indices of member ``index`` when n items are dealt to ``parts`` members, padded by repetition so that every
    member gets the same count (equal forward calls on every rank). Returns -1 for padding."""
    per = -(-n // parts)
    ids = list(range(index * per, min(n, (index + 1) * per)))
    return ids + [-1] * (per - len(ids))


def heldout_scores(trainer, iteration: int) -> Dict[str, np.ndarray]:
    """{reward term: [prompts * clips]} over the held-out prompts, gathered from every data-parallel member."""
    cfg, d = trainer.cfg, trainer.dist
    prompts = trainer.eval_prompts
    mine = shard(len(prompts), d.dp_size, d.dp_rank)
    local_prompts = [prompts[i if i >= 0 else 0] for i in mine]
    emb = trainer.encoder.encode(local_prompts)
    neg = None
    if cfg.eval.guidance_scale != 1.0:
        neg = trainer.encoder.encode([cfg.rollout.negative_prompt])[0]
    spec = ode_spec(cfg.eval.num_steps, cfg.tree.shift, cfg.eval.clips_per_prompt)
    seeds = [cfg.eval.seed * 100003 + max(i, 0) for i in mine]
    module = trainer.rollout_module()
    module.eval()
    with torch.no_grad():
        res = rollout(spec, trainer._model_fn(module), emb, latent_shape=trainer.latent_shape, seeds=seeds,
                      negative_embeds=neg, guidance_scale=cfg.eval.guidance_scale,
                      frontier_batch=cfg.rollout.frontier_batch, store_on_cpu=True, device=d.device)
        from .models.vae import decode_to_frames

        frames = decode_to_frames(trainer.models.vae, res.leaf_latents.to(d.device),
                                  batch_size=cfg.rollout.decode_batch).cpu()
    module.train()
    leaves = res.tree.leaves()
    tree_of_leaf = res.tree.tree[leaves]
    scores = trainer._sp_shared(lambda: trainer.reward(frames, [local_prompts[t] for t in tree_of_leaf]))
    keep = np.array([mine[t] >= 0 for t in tree_of_leaf])
    local = {k: v.detach().cpu().numpy()[keep] for k, v in scores.items()}
    if d.world_size == 1:
        return local
    gathered: List = [None] * d.world_size
    dist.all_gather_object(gathered, (d.sp_rank, local))
    out: Dict[str, List[np.ndarray]] = {}
    for sp_rank, part in gathered:
        if sp_rank != 0:  # the ranks of one SP group hold the same samples
            continue
        for k, v in part.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}
