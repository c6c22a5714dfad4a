"""Tree dumps (``train.dump_trees``): ``trees/iter_NNNNNN_rank<r>.npz``, one entry per node (DESIGN.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

import numpy as np

from ..core.tree import Tree
from .scoring import weighted_total


def dump_tree(out_dir: Path, iteration: int, rank: int, tree: Tree, rewards: Dict[str, np.ndarray],
              weights: Mapping[str, float], values: np.ndarray, adv: np.ndarray, trained: np.ndarray) -> Path:
    """Write one iteration's trees of one rank; ``leaf_reward`` is the weighted sum of the named rewards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    leaf_reward = weighted_total(weights, rewards)
    path = out_dir / f"iter_{iteration:06d}_rank{rank}.npz"
    np.savez(path, tree=tree.tree, parent=tree.parent, depth=tree.depth, step=tree.step, sde=tree.sde,
             logp=tree.logp, leaf_reward=leaf_reward.astype(np.float32), value=values.astype(np.float32),
             advantage=adv.astype(np.float32), trained=trained,
             **{f"reward/{k}": v.astype(np.float32) for k, v in rewards.items()})
    return path
