"""Expand-and-Prune (Pro-GRPO, ALGORITHMS.md section 7): Optimal Variance Filtering and preview pruning rules.

A rollout with checkpoint steps (``tree.survivors``) stops all but a fixed number of each tree's live nodes before
each checkpoint step. Which nodes go on is chosen by a registered *prune rule* (``tree.prune_rule``) from the rewards
of one-step previews ``x0_hat = x - s v``: the preview of a node is the ``x0_hat`` of the evaluation that produced it
(step ``c - 1`` for a checkpoint at step ``c``), so the preview costs no extra forward pass. The counts come from the
config, never from the data, so ranks run the same forward and backward calls.

Advantages use the survivors only: pruned nodes are not leaves, are never scored, and their values are NaN.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import numpy as np

from .errors import CoreError
from .tree import Tree, TreeSpec

PruneRule = Callable[[np.ndarray, int], np.ndarray]
_RULES: dict[str, PruneRule] = {}


def register_prune_rule(name: str):
    """Register ``rule(scores [L], keep) -> indices [keep]`` (positions into ``scores``) under ``name``."""

    def deco(fn: PruneRule) -> PruneRule:
        if name in _RULES:
            raise CoreError(f"prune rule '{name}' is registered twice")
        _RULES[name] = fn
        return fn

    return deco


def get_prune_rule(name: str) -> PruneRule:
    if name not in _RULES:
        close = difflib.get_close_matches(name, list(_RULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise CoreError(f"unknown rule '{name}'{hint}. Accepted: {sorted(_RULES)}")
    return _RULES[name]


def prune_rule_names() -> list:
    return sorted(_RULES)


# ------------------------------------------------------------------------------------------------------------- OVF
def _check(scores, keep: int) -> np.ndarray:
    r = np.asarray(scores, dtype=np.float64).reshape(-1)
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= r.size:
        raise CoreError(f"keep: expected an integer in [1, {r.size}], got {keep!r}")
    return r


def ovf_select(rewards, keep: int) -> np.ndarray:
    """Optimal Variance Filtering: the ``keep`` rewards with the largest variance.

    rewards: [G] (NaN marks a failed sample: it is taken only when fewer than ``keep`` rewards are finite).
    Returns int64 [keep], sorted positions into ``rewards``.

    For a fixed subset size the variance is largest for the j lowest plus the ``keep - j`` highest rewards for some j
    (moving any chosen value outwards increases the spread), so one sort and a scan over j with prefix sums is exact:
    O(G log G). Ties between equal variances go to the smallest j.
    """
    r = _check(rewards, keep)
    finite = np.nonzero(np.isfinite(r))[0]
    failed = np.nonzero(~np.isfinite(r))[0]
    if finite.size <= keep:
        return np.sort(np.concatenate([finite, failed[: keep - finite.size]]))
    order = finite[np.argsort(r[finite], kind="stable")]
    v = r[order] - r[order].mean()  # centred: prefix sums of squares without cancellation
    c1 = np.concatenate([[0.0], np.cumsum(v)])
    c2 = np.concatenate([[0.0], np.cumsum(v * v)])
    g = v.size
    j = np.arange(keep + 1)  # j lowest and keep - j highest
    s1 = c1[j] + (c1[g] - c1[g - (keep - j)])
    s2 = c2[j] + (c2[g] - c2[g - (keep - j)])
    var = s2 / keep - (s1 / keep) ** 2
    best = int(np.argmax(var))
    return np.sort(np.concatenate([order[:best], order[g - (keep - best):]]))


@register_prune_rule("ovf")
def _ovf_rule(scores: np.ndarray, keep: int) -> np.ndarray:
    return ovf_select(scores, keep)


@register_prune_rule("top")
def top_select(scores, keep: int) -> np.ndarray:
    """The ``keep`` highest previews (NaN lowest; ties to the lower index); a greedy baseline to OVF."""
    r = _check(scores, keep)
    key = np.where(np.isnan(r), -np.inf, r)
    return np.sort(np.argsort(-key, kind="stable")[:keep])


# -------------------------------------------------------------------------------------------------- rollout hook
def preview_pruner(rule: str, spec: TreeSpec, score_fn: Callable[[np.ndarray, object], np.ndarray]):
    """The rollout's ``prune_fn(step, node_ids, node_trees, x0_hat) -> kept node ids`` for ``spec.survivors``.

    score_fn(node_trees [L], x0_hat [L, *latent_shape]) -> scalar rewards [L] (decode and score the previews).
    Each tree keeps ``spec.survivor_count(step)`` of its nodes, chosen by the registered ``rule``.
    """
    select = get_prune_rule(rule)

    def prune_fn(step: int, node_ids: np.ndarray, node_trees: np.ndarray, x0_hat) -> np.ndarray:
        keep = spec.survivor_count(step)
        scores = np.asarray(score_fn(node_trees, x0_hat), dtype=np.float64).reshape(-1)
        if scores.shape != node_ids.shape:
            raise CoreError(f"preview scores: expected {node_ids.size} values, got {scores.size}")
        kept = []
        for t in np.unique(node_trees):
            pos = np.nonzero(node_trees == t)[0]
            chosen = np.asarray(select(scores[pos], keep), dtype=np.int64)
            if chosen.size != keep or np.unique(chosen).size != keep:
                raise RuntimeError(f"prune rule '{rule}' returned {chosen.size} distinct nodes; expected {keep}")
            kept.append(node_ids[pos[chosen]])
        return np.sort(np.concatenate(kept))

    return prune_fn


# -------------------------------------------------------------------------------------------------- trained edges
def survivor_edges(tree: Tree, spec: TreeSpec) -> np.ndarray:
    """Boolean [N], to AND with the pruning mask: the edges trained under Expand-and-Prune (all True when ``spec``
    has no checkpoints; roots have no edge and are ignored).

    The edges on the paths from the roots to the surviving leaves, filled up at each (tree, depth) to the fixed count
    ``U_d = min_{d' >= d} live(d')`` (``TreeSpec.live_per_depth``) with the lowest-index other nodes of that depth.
    Survivors' ancestors never exceed ``U_d``; when several survivors share an ancestor (a tree that branched between
    checkpoints) the filler edges belong to pruned subtrees, carry advantage 0 (their value is NaN) and only keep the
    number of backward calls the same on every rank. Sequential groups (Pro-GRPO) need no filler.
    """
    keep = np.ones(tree.num_nodes, bool)
    if not spec.survivors:
        return keep
    live = spec.live_per_depth()
    bound = np.minimum.accumulate(live[::-1])[::-1]
    on_path = np.zeros(tree.num_nodes, bool)
    cur = tree.leaves()
    while cur.size:
        on_path[cur] = True
        cur = np.unique(tree.parent[cur])
        cur = cur[cur >= 0]
    out = on_path.copy()
    for t in range(tree.num_trees):
        for d in range(1, spec.num_steps + 1):
            nodes = np.nonzero((tree.tree == t) & (tree.depth == d))[0]
            missing = int(bound[d]) - int(on_path[nodes].sum())
            if missing < 0:
                raise RuntimeError(f"tree {t}, depth {d}: {-missing} more survivor edges than the bound {bound[d]}")
            out[nodes[~on_path[nodes]][:missing]] = True
    return out
