"""The update schedule of one iteration: how the rollout's trained units are cut into mini-batches, each followed by
an optimizer step.

Units are trained edges (edge objectives) or final samples (sample objectives). With a mini-batch size ``b > 0`` the
units are shuffled and cut into ``floor(U / b)`` full mini-batches and one more with the remainder, as BranchGRPO's
released loop does (an optimizer step every ``b`` samples and one after the last partial batch); ``b = 0`` keeps all
units in one mini-batch (one step per rollout).

Grouped by chain, the shuffle and the cut act on whole chains: every trained edge of a chain lands in the same
mini-batch and ``b`` counts chains (DanceGRPO's and Flow-GRPO's loops, which accumulate the gradient of whole
samples). A chain is the path below a tree's last split step; in a sequential group, one root's chain.

Only the first mini-batch is on-policy (the later ones see the weights moved by the earlier steps), so the ratio
and its clip act from the second step on.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .errors import CoreError
from .tree import Tree

GROUPINGS = ("edge", "chain")


def minibatch_sizes(total: int, size: int) -> List[int]:
    """Mini-batch sizes of ``total`` units cut every ``size``: ``[size] * (total // size)`` plus the remainder.

    ``size == 0`` or ``size >= total``: one mini-batch of ``total``. ``total == 0``: no mini-batch (no step).
    """
    if total < 0 or size < 0:
        raise CoreError(f"minibatch: expected sizes >= 0, got total={total}, size={size}")
    if total == 0:
        return []
    if size == 0 or size >= total:
        return [int(total)]
    q, r = divmod(int(total), int(size))
    return [int(size)] * q + ([r] if r else [])


def chain_ids(tree: Tree) -> np.ndarray:
    """int64 [N]: per node, the index of its ancestor (or itself) at the depth of its tree's last split's children
    (depth 0, the roots, for a tree that never splits); -1 for a node above that depth, which lies on several chains.
    """
    split_depth = np.zeros(tree.num_trees, dtype=np.int64)
    sp = np.nonzero(tree.split)[0]
    if sp.size:
        np.maximum.at(split_depth, tree.tree[sp], tree.depth[sp])
    target = split_depth[tree.tree]
    out = np.full(tree.num_nodes, -1, dtype=np.int64)
    at = tree.depth == target
    out[at] = np.nonzero(at)[0]
    for n in range(tree.num_nodes):  # creation order is topological: a parent is resolved before its children
        if tree.depth[n] > target[n]:
            out[n] = out[tree.parent[n]]
    return out


def plan_minibatches(units: np.ndarray, size: int, generator: np.random.Generator,
                     groups: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """The mini-batches of one pass over ``units`` (int [U], e.g. trained edge ids), in the order they are trained.

    Without ``groups``: a random permutation of the units cut by :func:`minibatch_sizes`. With ``groups`` (int [U],
    the chain of each unit, all >= 0): the distinct chains are permuted and cut every ``size`` chains; a mini-batch
    holds every unit of its chains (in their given order).
    """
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    if groups is None:
        order = units[generator.permutation(units.size)]
        bounds = np.cumsum([0, *minibatch_sizes(units.size, size)])
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    groups = np.asarray(groups, dtype=np.int64).reshape(-1)
    if groups.shape != units.shape:
        raise CoreError(f"minibatch: {units.size} units but {groups.size} chain ids")
    if groups.size and groups.min() < 0:
        raise CoreError("minibatch_by chain: a trained edge lies above the last split step (it belongs to several "
                        "chains); group by edge instead")
    chains = np.unique(groups)
    chains = chains[generator.permutation(chains.size)]
    bounds = np.cumsum([0, *minibatch_sizes(chains.size, size)])
    return [units[np.isin(groups, chains[a:b])] for a, b in zip(bounds[:-1], bounds[1:])]
