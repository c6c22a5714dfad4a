"""Credit assignment on rollout trees: leaf rewards -> fused node values -> depth-wise advantages.

ALGORITHMS.md section 3. All functions are pure and work on flat node arrays of a :class:`~video_branch.tree.Tree`
(shape ``[N]``, one entry per node, any number of trees). A leaf whose reward is NaN (the reward call failed) is left
out of every fusion; a node with no valid leaf below it gets value NaN and advantage 0, so its edge still runs in the
backward pass (ranks stay in lockstep) but carries no signal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import CoreError
from .tree import Tree

STD_EPS = 1e-8  # added to the std in the z-score (ALGORITHMS.md)
STD_FLOOR = 1e-6  # below this std a depth carries no signal


def _as_array(x: Any, name: str, n: int) -> np.ndarray:
    """Node-length float64 numpy copy of a numpy array, list or torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1) if np.ndim(x) else None
    if a is None or a.shape != (n,):
        raise CoreError(f"{name}: expected one value per node, shape [{n}], got shape {np.shape(x)}")
    return a.copy()


def leaf_vector(tree: Tree, leaf_ids, scores) -> np.ndarray:
    """Place per-leaf scores into a node-length array.

    leaf_ids: [L] node indices (each a leaf of ``tree``, no repeats); scores: [L].
    Returns float64 [N] holding ``scores`` at ``leaf_ids`` and NaN everywhere else.
    """
    ids = np.asarray(leaf_ids, dtype=np.int64).reshape(-1)
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != ids.shape:
        raise CoreError(f"leaf_vector: {ids.shape[0]} leaf ids but {s.shape[0]} scores")
    n = tree.num_nodes
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise CoreError(f"leaf_vector: leaf ids must lie in [0, {n - 1}], got {ids.min()}..{ids.max()}")
    if np.unique(ids).size != ids.size:
        raise CoreError("leaf_vector: a leaf id appears more than once")
    not_leaf = ids[~tree.is_leaf[ids]]
    if not_leaf.size:
        raise CoreError(f"leaf_vector: nodes {not_leaf[:8].tolist()} are not leaves")
    out = np.full(n, np.nan)
    out[ids] = s
    return out


FUSIONS = ("mean", "path", "path_leaves")


def fuse_values(tree: Tree, leaf_reward, mode: str = "mean", beta: float = 1.0) -> np.ndarray:
    """Fused node values from the leaf rewards, bottom-up.

    tree: N nodes. leaf_reward: [N], the reward on leaves, NaN on internal nodes and on leaves whose reward failed.
    mode:

    - ``"mean"``: the uniform mean over the valid leaves below n;
    - ``"path"`` (BranchGRPO's released ``use_prob_weighted``): nested, split by split: a node with one child takes
      its child's value; a node with several children takes ``sum_c softmax_c(beta * log p(c)) V(c)`` over its
      children with a valid value, ``log p(c)`` the log-prob of the edge into c alone;
    - ``"path_leaves"``: ``V(n) = sum_{valid leaves l below n} w_l r_l``, ``w = softmax_l(beta * log p(l | n))``
      with ``log p(l | n)`` the sum of every edge log-prob from n down to l (split and non-split edges).

    Edges without a log-prob (ODE edges) count as log-prob 0.
    Returns float64 [N]: ``V(leaf) = r``; NaN for nodes without a valid leaf below them.

    Since ``log p(l | n) = C(l) - C(n)`` with ``C`` the cumulative log-prob from the root, the softmax over the leaves
    below n only depends on ``beta * C(l)``. Each node keeps a stabilised log-sum-exp triple (max, sum of weights,
    sum of weighted rewards) and merges its children's triples, one depth at a time from the deepest: O(N).
    """
    if mode not in FUSIONS:
        raise CoreError(f"fuse_values: mode must be one of {FUSIONS}, got {mode!r}")
    n = tree.num_nodes
    r = _as_array(leaf_reward, "leaf_reward", n)
    leaf = tree.is_leaf
    stray = np.nonzero(~leaf & np.isfinite(r))[0]
    if stray.size:
        raise CoreError(f"leaf_reward: internal nodes {stray[:8].tolist()} carry a reward; expected NaN there")
    if np.any(np.isinf(r)):
        raise CoreError("leaf_reward: infinite reward; expected finite values or NaN for a failed reward")
    b = 0.0 if mode == "mean" else float(beta)
    if not np.isfinite(b):
        raise CoreError(f"fuse_values: beta must be finite, got {beta}")

    edge = np.nan_to_num(tree.logp.astype(np.float64), nan=0.0)
    if mode == "path":
        return _nested_path_values(tree, r, leaf & np.isfinite(r), edge, b)
    cum = edge.copy()  # C(n): creation order is topological, so parents are final before their children
    for d in range(1, int(tree.depth.max(initial=0)) + 1):
        idx = np.nonzero(tree.depth == d)[0]
        cum[idx] += cum[tree.parent[idx]]

    valid = leaf & np.isfinite(r)
    m = np.where(valid, b * cum, -np.inf)  # max of beta * C(l) over the valid leaves below
    s = valid.astype(np.float64)  # sum of exp(beta * C(l) - m)
    t = np.where(valid, r, 0.0)  # sum of exp(beta * C(l) - m) * r_l
    for d in range(int(tree.depth.max(initial=0)), 0, -1):
        idx = np.nonzero(tree.depth == d)[0]
        live = idx[np.isfinite(m[idx])]
        if live.size == 0:
            continue
        par = tree.parent[live]
        np.maximum.at(m, par, m[live])
        scale = np.exp(m[live] - m[par])
        s += np.bincount(par, weights=s[live] * scale, minlength=n)
        t += np.bincount(par, weights=t[live] * scale, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(s > 0, t / np.where(s > 0, s, 1.0), np.nan)
    v[valid] = r[valid]  # exact, not t / s rounded
    return v


def _nested_path_values(tree: Tree, r: np.ndarray, valid: np.ndarray, edge: np.ndarray, beta: float) -> np.ndarray:
    """The ``"path"`` fusion of :func:`fuse_values`, one depth at a time from the deepest."""
    n = tree.num_nodes
    v = np.where(valid, r, np.nan)
    for d in range(int(tree.depth.max(initial=0)), 0, -1):
        kids = np.nonzero(tree.depth == d)[0]
        par = tree.parent[kids]
        count = np.bincount(par, minlength=n)
        one = count[par] == 1
        v[par[one]] = v[kids[one]]  # a single child passes its value up unchanged
        many = ~one
        if not many.any():
            continue
        k, p = kids[many], par[many]
        ok = np.isfinite(v[k])
        z = np.where(ok, beta * edge[k], -np.inf)
        m = np.full(n, -np.inf)
        np.maximum.at(m, p, z)
        w = np.where(ok, np.exp(z - np.where(np.isfinite(m[p]), m[p], 0.0)), 0.0)
        sw = np.bincount(p, weights=w, minlength=n)
        swv = np.bincount(p, weights=w * np.where(ok, v[k], 0.0), minlength=n)
        ps = np.unique(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            v[ps] = np.where(sw[ps] > 0, swv[ps] / np.where(sw[ps] > 0, sw[ps], 1.0), np.nan)
    return v


GLOBAL_STD_EPS = 1e-4  # added to the batch std (Flow-GRPO's global_std)


def depthwise_advantages(tree: Tree, values, clip: float = 5.0, std: float | None = None) -> np.ndarray:
    """Depth-wise z-score of node values within each tree.

    values: [N]. For every (tree, depth), over the nodes with a finite value:
    ``A = (V - mean) / (std + 1e-8)`` with the unbiased std. A (tree, depth) with fewer than two valid nodes or with
    std < 1e-6 gets A = 0; nodes with a NaN value get A = 0. The result is clipped to ``[-clip, clip]``.
    Returns float64 [N]; the edge parent -> child takes ``A(child)``.

    ``std``: divide every deviation from its (tree, depth) mean by this one number instead (Flow-GRPO's
    ``global_std``: the std of every reward of the batch plus 1e-4); nodes with a NaN value still get A = 0.
    """
    n = tree.num_nodes
    v = _as_array(values, "values", n)
    override = None if std is None else float(std)
    if override is not None and not override > 0:
        raise CoreError(f"depthwise_advantages: std must be > 0, got {std}")
    if not clip >= 0:
        raise CoreError(f"depthwise_advantages: clip must be >= 0, got {clip}")
    ok = np.isfinite(v)
    group = tree.tree.astype(np.int64) * (int(tree.depth.max(initial=0)) + 1) + tree.depth
    _, g = np.unique(group, return_inverse=True)
    g = g.reshape(-1)
    ng = int(g.max(initial=-1)) + 1
    vz = np.where(ok, v, 0.0)
    cnt = np.bincount(g, weights=ok.astype(np.float64), minlength=ng)
    mean = np.bincount(g, weights=vz, minlength=ng) / np.maximum(cnt, 1.0)
    dev = np.where(ok, v - mean[g], 0.0)  # two passes: no cancellation for large, close values
    var = np.bincount(g, weights=dev * dev, minlength=ng) / np.maximum(cnt - 1.0, 1.0)
    std = np.sqrt(var)
    if override is not None:
        return np.clip(np.where(ok, dev / override, 0.0), -clip, clip)
    live = (cnt >= 2) & (std >= STD_FLOOR)
    adv = np.where(ok & live[g], dev / (std[g] + STD_EPS), 0.0)
    return np.clip(adv, -clip, clip)


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def assign_credit(
    tree: Tree,
    leaf_rewards: Mapping[str, Any],
    weights: Mapping[str, float],
    cfg_credit: Any,
    batch_std: Callable[[np.ndarray], float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Values and advantages of every node from one or more leaf rewards.

    leaf_rewards: name -> [N] (NaN off the leaves and on failed leaves, as in :func:`fuse_values`).
    weights: name -> weight, the same names. cfg_credit: ``CreditConfig`` (or a mapping) with ``fusion``, ``beta``,
    ``adv_clip``, ``aggregate``.

    - ``sum_then_norm``: ``r = sum_k w_k r_k`` per leaf (a leaf is invalid if any component with nonzero weight is
      NaN), then fuse and normalise ``r``.
    - ``norm_then_sum``: fuse and normalise each ``r_k`` on its own (unclipped), ``A = sum_k w_k A_k``, then clip.

    With ``cfg_credit.std == "global"`` (Flow-GRPO's ``global_std``) every deviation is divided by
    ``batch_std(valid leaf rewards) + 1e-4`` instead of its depth's std; ``batch_std`` returns the std (ddof 0) of
    the rewards of the whole batch, all ranks (the engine all-reduces; it is called once per normalised reward, the
    same number of times on every rank).

    Components with weight 0 take no part (a reward that is only logged may fail without invalidating a leaf).
    Returns ``(values [N], advantages [N])``, float64; ``values`` are the fused values of the weighted sum in both
    modes (what tree dumps record).
    """
    names = list(leaf_rewards)
    if not names:
        raise CoreError("assign_credit: no rewards given")
    missing = [k for k in names if k not in weights]
    extra = [k for k in weights if k not in leaf_rewards]
    if missing or extra:
        raise CoreError(f"assign_credit: reward names {names} and weight names {list(weights)} differ "
                         f"(missing weights: {missing}, weights without a reward: {extra})")
    fusion = _cfg_get(cfg_credit, "fusion", "mean")
    beta = float(_cfg_get(cfg_credit, "beta", 1.0))
    clip = float(_cfg_get(cfg_credit, "adv_clip", 5.0))
    aggregate = _cfg_get(cfg_credit, "aggregate", "sum_then_norm")
    if aggregate not in ("sum_then_norm", "norm_then_sum"):
        raise CoreError(f"credit.aggregate: expected 'sum_then_norm' or 'norm_then_sum', got {aggregate!r}")

    n = tree.num_nodes
    used = [k for k in names if float(weights[k]) != 0.0]
    comps: dict[str, np.ndarray] = {k: _as_array(leaf_rewards[k], f"leaf_rewards[{k!r}]", n) for k in names}
    total = np.zeros(n)
    for k in used:
        total = total + float(weights[k]) * comps[k]  # NaN in any used component makes the leaf invalid
    if not used:
        total[:] = np.nan
    std_mode = _cfg_get(cfg_credit, "std", "group")
    if std_mode not in ("group", "global"):
        raise CoreError(f"credit.std: expected 'group' or 'global', got {std_mode!r}")
    if std_mode == "global" and batch_std is None:
        raise CoreError("credit.std=global needs batch_std, the std of the batch's rewards over all ranks")
    leaf = tree.is_leaf

    def scale(r: np.ndarray) -> float | None:
        if std_mode == "group":
            return None
        sd = float(batch_std(r[leaf & np.isfinite(r)]))
        return sd + GLOBAL_STD_EPS if np.isfinite(sd) else None  # no valid reward anywhere: every A is 0

    values = fuse_values(tree, total, mode=fusion, beta=beta)
    if aggregate == "sum_then_norm":
        return values, depthwise_advantages(tree, values, clip=clip, std=scale(total))
    adv = np.zeros(n)
    for k in used:
        vk = fuse_values(tree, comps[k], mode=fusion, beta=beta)
        adv += float(weights[k]) * depthwise_advantages(tree, vk, clip=np.inf, std=scale(comps[k]))
    return values, np.clip(adv, -clip, clip)
