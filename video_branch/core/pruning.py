"""Which edges of a rollout tree are back-propagated (ALGORITHMS.md section 4, and DanceGRPO's options of section 6).

Pruning acts on the backward pass only: rollout and rewards are untouched. An edge is identified with the node it
produces (the edge parent -> child is "node child"); roots have no edge. Only SDE edges are candidates, ODE edges have
no log-probability.

The rules of ``cfg.prune`` are applied in this order; each one only removes edges:

1. **Step rules** (structure and iteration only): SDE edges; ``exclude_last_step`` drops the edges of step
   ``num_steps - 1``; depth pruning drops the edges whose child depth lies in :func:`depth_window`.
2. **Chain rules** (use values/advantages to pick chains, never the counts): width pruning (``parent_top1`` or
   ``extreme_b``) drops the edges after the last split that are not on a kept chain; ``best_of_n`` keeps only the
   chains of the n/2 best and n/2 worst leaves of a sequential group.
3. **Timestep fraction** ``f < 1``: per root, a random subset of the steps that still have trained edges after 1 and
   2 is kept (``floor(f * n_eligible)`` steps, drawn from ``generator``).

Invariant (needed by ZeRO-3, where every rank must run the same backward calls): the number of trained edges depends
on the tree structure, the config and the iteration only, never on values, advantages, rewards (NaN included: a NaN
ranks lowest) or the random draw. :func:`expected_trained_edges` returns that number.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CoreError
from .minibatch import chain_ids
from .tree import Tree


# ----------------------------------------------------------------------------------------------------------- helpers
def _prune_section(cfg: Any) -> Any:
    return cfg.prune if hasattr(cfg, "prune") else cfg


def _node_array(x: Any, name: str, n: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape != (n,):
        raise CoreError(f"{name}: expected one value per node, shape [{n}], got shape {np.shape(x)}")
    return a


def _rank_key(v: np.ndarray) -> np.ndarray:
    """Sort key where NaN ranks below every number (a failed reward never wins a comparison)."""
    return np.where(np.isnan(v), -np.inf, v)


def _last_split_depth(tree: Tree) -> np.ndarray:
    """Per tree: depth of the children of its last split step; 0 for a tree without splits (the roots are where a
    sequential group branches)."""
    out = np.zeros(tree.num_trees, dtype=np.int64)
    sp = np.nonzero(tree.split)[0]
    if sp.size:
        np.maximum.at(out, tree.tree[sp], tree.depth[sp])
    return out


def _mark_chains(tree: Tree, leaves: np.ndarray) -> np.ndarray:
    """Boolean [N]: nodes on the root-to-leaf path of any of ``leaves``."""
    on = np.zeros(tree.num_nodes, bool)
    cur = np.unique(np.asarray(leaves, dtype=np.int64))
    while cur.size:
        cur = cur[~on[cur]]  # stop where another chain already marked the rest of the path
        on[cur] = True
        cur = np.unique(tree.parent[cur])
        cur = cur[cur >= 0]
    return on


def _descendants_of(tree: Tree, seeds: np.ndarray) -> np.ndarray:
    """Boolean [N]: ``seeds`` and every node below them."""
    below = np.zeros(tree.num_nodes, bool)
    below[np.asarray(seeds, dtype=np.int64)] = True
    for d in range(1, int(tree.depth.max(initial=0)) + 1):
        idx = np.nonzero(tree.depth == d)[0]
        below[idx] |= below[tree.parent[idx]]
    return below


# ------------------------------------------------------------------------------------------------------ depth window
def depth_window(cfg: Any, max_depth: int, first_depth: int, iteration: int) -> tuple[int, int]:
    """Inclusive child-depth range ``(lo, hi)`` dropped by depth pruning at ``iteration``; ``(0, -1)`` when off.

    cfg: a ``Config`` or its ``PruneConfig``. max_depth: the deepest node depth (``num_steps``). first_depth: the start
    used when ``depth_start`` is unset, the first depth of the single-chain region after the last split (for the
    default tree, last split at step 9 -> split children at depth 10 -> first_depth 11, window 11..15).

    The window keeps ``depth_window`` depths and moves one depth every ``depth_slide_interval`` iterations in
    ``depth_direction``: ``later`` moves it towards larger depths (what the BranchGRPO paper describes), ``earlier``
    towards smaller depths (what its released code does). It stops when its leading edge reaches ``depth_stop``:
    the last depth ``hi`` for ``later`` (default ``max_depth``), the first depth ``lo`` for ``earlier`` (default 1);
    the stop is clamped to ``[1, max_depth]``, and a window that starts beyond its stop does not move.
    """
    p = _prune_section(cfg)
    size = int(p.depth_window)
    if size <= 0:
        return 0, -1
    if max_depth < 1:
        raise CoreError(f"depth_window: the tree has no depth to prune (max_depth={max_depth})")
    if iteration < 0:
        raise CoreError(f"depth_window: iteration must be >= 0, got {iteration}")
    start = int(p.depth_start) if p.depth_start is not None else int(first_depth)
    start = min(max(start, 1), max_depth)
    moves = int(iteration) // int(p.depth_slide_interval)
    if p.depth_direction == "later":
        stop = max_depth if p.depth_stop is None else min(max(int(p.depth_stop), 1), max_depth)
        lo = start + min(moves, max(0, stop - (start + size - 1)))
    elif p.depth_direction == "earlier":
        stop = 1 if p.depth_stop is None else min(max(int(p.depth_stop), 1), max_depth)
        lo = start - min(moves, max(0, start - stop))
    else:
        raise CoreError(f"prune.depth_direction: expected 'later' or 'earlier', got {p.depth_direction!r}")
    return lo, min(lo + size - 1, max_depth)


# ----------------------------------------------------------------------------------------------------------- rules
def _step_rules(tree: Tree, cfg: Any, iteration: int) -> np.ndarray:
    p = _prune_section(cfg)
    keep = tree.sde & (tree.parent >= 0)
    if p.exclude_last_step:
        keep &= tree.step != int(cfg.tree.num_steps) - 1
    if p.depth_window > 0:
        max_depth = int(tree.depth.max(initial=0))
        first = _last_split_depth(tree) + 1
        for t in range(tree.num_trees):
            lo, hi = depth_window(p, max_depth, int(first[t]), iteration)
            keep &= ~((tree.tree == t) & (tree.depth >= lo) & (tree.depth <= hi))
    return keep


def _width_rule(tree: Tree, values: np.ndarray, p: Any) -> np.ndarray:
    """Boolean [N]: False for the post-last-split edges of the chains that width pruning drops."""
    keep = np.ones(tree.num_nodes, bool)
    if p.width == "none":
        return keep
    split_depth = _last_split_depth(tree)
    post = tree.depth > split_depth[tree.tree]
    key = _rank_key(values)
    if p.width == "parent_top1":
        kept_children: list[int] = []
        for t in range(tree.num_trees):
            if split_depth[t] == 0:
                raise CoreError(f"prune.width=parent_top1 needs a split step, but tree {t} never splits "
                                 "(use extreme_b or best_of_n for a sequential group)")
            kids = np.nonzero((tree.tree == t) & tree.split & (tree.depth == split_depth[t]))[0]
            for par in np.unique(tree.parent[kids]):
                sib = kids[tree.parent[kids] == par]
                kept_children.append(int(sib[np.argmax(key[sib])]))  # argmax: ties go to the lower index
        return ~post | _descendants_of(tree, np.asarray(kept_children, dtype=np.int64))
    if p.width == "extreme_b":
        b = int(p.width_b)
        kept_leaves: list[np.ndarray] = []
        for t in range(tree.num_trees):
            leaves = tree.leaves(t)
            order = leaves[np.argsort(-key[leaves], kind="stable")]  # best first; ties: lower index first
            if 2 * b >= order.size:
                kept_leaves.append(order)
            else:
                kept_leaves.append(np.concatenate([order[:b], order[order.size - b:]]))
        chains = _mark_chains(tree, np.concatenate(kept_leaves) if kept_leaves else np.zeros(0, np.int64))
        return ~post | chains
    raise CoreError(f"prune.width: expected one of {WIDTH_MODES}, got {p.width!r}")


WIDTH_MODES = ("none", "parent_top1", "extreme_b", "released_branch", "released_pool")


def dfs_order(tree: Tree) -> np.ndarray:
    """int64 [N]: each node's position in a pre-order walk (tree by tree, children in creation order), the order in
    which BranchGRPO's released code collects its training samples."""
    order = np.empty(tree.num_nodes, dtype=np.int64)
    stack = list(np.nonzero(tree.parent < 0)[0][::-1])
    kids = tree.children
    i = 0
    while stack:
        n = int(stack.pop())
        order[n] = i
        i += 1
        stack.extend(kids[n][::-1].tolist())
    return order


def _released_width_rule(tree: Tree, sel: np.ndarray, advantages: np.ndarray, p: Any) -> np.ndarray:
    """BranchGRPO's released width pruning (``width_pruning_mode`` 1 and 2) on the selected edges after the last
    split step (child step > last split step), ``ratio = prune.width_ratio``:

    - ``released_branch`` (mode 1): per chain (the last split's child it descends from), sort its edges by
      advantage, descending and stable in collection order, and keep ``max(1, int(len * ratio))``. The edges of a
      chain carry one advantage, so this keeps the chain's first edges: a depth cut in effect.
    - ``released_pool`` (mode 2): pool those edges over every tree of the batch, sort likewise and keep the best
      ``k // 2`` and the worst ``k - k // 2``, ``k = max(2, int(total * ratio))``.

    Counts depend on the structure and the ratio only.
    """
    split_depth = _last_split_depth(tree)
    if np.any(split_depth == 0):
        raise CoreError(f"prune.width={p.width} needs a split step in every tree")
    post = sel & (tree.depth > split_depth[tree.tree])  # edges of the steps after the last split step
    key = _rank_key(advantages)
    dfs = dfs_order(tree)
    ratio = float(p.width_ratio)
    keep = sel & ~post
    cand = np.nonzero(post)[0]
    if p.width == "released_branch":
        below = np.full(tree.num_nodes, -1, dtype=np.int64)
        at = tree.depth == split_depth[tree.tree]
        below[at] = np.nonzero(at)[0]
        for n in range(tree.num_nodes):
            if tree.depth[n] > split_depth[tree.tree[n]]:
                below[n] = below[tree.parent[n]]
        for g in np.unique(below[cand]):
            group = cand[below[cand] == g]
            group = group[np.argsort(dfs[group], kind="stable")]
            ranked = group[np.argsort(-key[group], kind="stable")]
            keep[ranked[: max(1, int(group.size * ratio))]] = True
        return keep
    cand = cand[np.argsort(dfs[cand], kind="stable")]
    ranked = cand[np.argsort(-key[cand], kind="stable")]
    k = max(2, int(ranked.size * ratio))
    best = k // 2
    keep[ranked[:best]] = True
    keep[ranked[ranked.size - (k - best):]] = True
    return keep


def _best_of_n_rule(tree: Tree, advantages: np.ndarray, p: Any) -> np.ndarray:
    n = int(p.best_of_n)
    if n <= 0:
        return np.ones(tree.num_nodes, bool)
    if n % 2:
        raise CoreError(f"prune.best_of_n: expected an even number (n/2 best and n/2 worst chains), got {n}")
    root = tree.root_of()
    leaves = np.nonzero(tree.is_leaf)[0]
    if np.unique(root[leaves]).size != leaves.size:
        raise CoreError("prune.best_of_n needs a sequential group (every root a single chain); "
                         "this tree branches below a root")
    key = _rank_key(advantages)
    kept: list[np.ndarray] = []
    for t in range(tree.num_trees):
        lv = tree.leaves(t)
        if n > lv.size:
            raise CoreError(f"prune.best_of_n={n} exceeds the {lv.size} chains of tree {t}")
        order = lv[np.argsort(-key[lv], kind="stable")]
        kept.append(np.concatenate([order[: n // 2], order[order.size - n // 2:]]))
    return _mark_chains(tree, np.concatenate(kept) if kept else np.zeros(0, np.int64))


def _permutation(k: int, generator: Any) -> np.ndarray:
    if hasattr(generator, "manual_seed"):  # torch.Generator
        import torch

        return torch.randperm(k, generator=generator).numpy()
    return generator.permutation(k)


def _timestep_rule(tree: Tree, sel: np.ndarray, fraction: float, generator: Any) -> np.ndarray:
    """Keep, per root, the edges of a random ``floor(fraction * n_eligible)`` of its eligible steps.

    Eligible steps are the steps with at least one selected edge in the root's subtree. When every selected edge of
    a root lies below its tree's last split (a group sharing one initial noise that branches at step 0), each chain
    draws its own steps instead, as DanceGRPO's per-sample permutation does. When steps differ in how many
    edges they carry (a branching tree), the draw is stratified by that count, with the quota of each stratum fixed
    by the largest-remainder rule, so that the number of trained edges does not depend on the draw. For a chain (one
    stratum) this is a uniform random subset of the steps, as in DanceGRPO.
    """
    if generator is None:
        generator = np.random.default_rng()
    keep = np.zeros(tree.num_nodes, bool)
    root = tree.root_of()
    chain = chain_ids(tree)
    units = []
    for r in np.nonzero(tree.parent < 0)[0]:
        mine = sel & (root == r)
        below = np.unique(chain[mine])
        if below.size > 1 and below.min() >= 0:  # every selected edge on one chain: draw per chain, as DanceGRPO
            units.extend(mine & (chain == c) for c in below)
        else:
            units.append(mine)
    for mine in units:
        steps, counts = np.unique(tree.step[mine], return_counts=True)
        if steps.size == 0:
            continue
        total = int(np.floor(fraction * steps.size + 1e-9))
        strata = np.unique(counts)
        sizes = np.array([(counts == c).sum() for c in strata])
        exact = fraction * sizes
        quota = np.floor(exact + 1e-9).astype(np.int64)
        extra = total - int(quota.sum())
        if extra > 0:
            order = np.argsort(-(exact - quota), kind="stable")  # ties: the stratum with fewer edges per step
            quota[order[:extra]] += 1
        chosen: list[np.ndarray] = []
        for c, q in zip(strata, quota):
            cand = steps[counts == c]
            chosen.append(cand[_permutation(cand.size, generator)[:q]])
        keep |= mine & np.isin(tree.step, np.concatenate(chosen))
    return keep


# ----------------------------------------------------------------------------------------------------------- public
def select_trained_edges(
    tree: Tree,
    values: Any,
    advantages: Any,
    cfg: Any,
    iteration: int,
    generator: Any | None = None,
) -> np.ndarray:
    """Boolean [N]: whether the edge into each node is back-propagated (False for roots and ODE edges).

    tree: N nodes, any number of trees. values: [N] fused values (width pruning ranks by them); advantages: [N]
    (best_of_n ranks leaves by them); NaN ranks lowest, ties go to the lower node index. cfg: the run ``Config``
    (``cfg.prune`` and ``cfg.tree.num_steps`` are read). iteration: the training iteration (slides the depth window).
    generator: ``numpy.random.Generator`` or ``torch.Generator`` for the timestep-fraction draw (a fresh unseeded
    numpy generator if None; pass a seeded one for reproducible runs). See the module docstring for the order of the
    rules and the invariant.
    """
    p = _prune_section(cfg)
    n = tree.num_nodes
    v = _node_array(values, "values", n)
    a = _node_array(advantages, "advantages", n)
    if tree.num_nodes and int(tree.step.max()) >= int(cfg.tree.num_steps):
        raise CoreError(f"select_trained_edges: the tree has step {int(tree.step.max())} but "
                         f"tree.num_steps={cfg.tree.num_steps}")
    if not 0.0 <= float(p.timestep_fraction) <= 1.0:
        raise CoreError(f"prune.timestep_fraction: expected a value in [0, 1], got {p.timestep_fraction}")
    sel = _step_rules(tree, cfg, iteration)
    if p.width in ("released_branch", "released_pool"):
        sel = _released_width_rule(tree, sel, a, p)
    else:
        sel &= _width_rule(tree, v, p)
    sel &= _best_of_n_rule(tree, a, p)
    if float(p.timestep_fraction) < 1.0:
        sel = _timestep_rule(tree, sel, float(p.timestep_fraction), generator)
    return sel


def expected_trained_edges(tree: Tree, cfg: Any, iteration: int) -> int:
    """Number of edges :func:`select_trained_edges` trains for this structure, config and iteration.

    By the invariant it is the same for any values, advantages and draw; it is evaluated with zeros and a fixed draw.
    """
    zeros = np.zeros(tree.num_nodes)
    return int(select_trained_edges(tree, zeros, zeros, cfg, iteration, np.random.default_rng(0)).sum())


def pruning_summary(tree: Tree, trained: np.ndarray) -> dict[str, int]:
    """Counts for logging: ``edges``, ``sde_edges``, ``trained_edges``."""
    edges = tree.parent >= 0
    return {
        "edges": int(edges.sum()),
        "sde_edges": int((edges & tree.sde).sum()),
        "trained_edges": int(np.asarray(trained, bool).sum()),
    }
