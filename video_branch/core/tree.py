"""Rollout trees: the executed nodes of a batch of prompts as flat arrays.

A tree belongs to one prompt. Its roots are initial noises (``parent == -1``, ``step == -1``, depth 0); the node
produced by denoising step ``i`` from a node at depth ``i`` sits at depth ``i + 1``. A sequential group of G chains
(DanceGRPO, Flow-GRPO, MixGRPO) is a tree with G roots and no split steps: it "splits G ways at the root".

Nodes are stored in creation order, which is topological (every parent precedes its children) and depth-major.
All arrays are numpy and have one entry per node.

:class:`TreeSpec` is the pure description of the trees of one iteration (steps, splits, step kinds, noise levels),
derived from the config and the iteration only; :func:`build_structure` lays out the nodes a rollout executes and
:func:`accounting` counts their cost. ``python -m video_branch.accounting`` prints those counts (see ``docs/TREES.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import CoreError


@dataclass
class Tree:
    """Flat node arrays of one or more trees.

    Fields (all shape ``[N]``):
      tree    int64   index of the tree (prompt) the node belongs to
      parent  int64   parent node index, -1 for a root
      depth   int64   0 for a root
      step    int64   denoising step that produced the node, -1 for a root
      sde     bool    the edge into the node is stochastic (has a log-prob)
      split   bool    the edge into the node is a split edge (its parent has several children)
      logp    float32 log-prob of the edge into the node, NaN where there is none (roots, ODE edges)
      pruned  bool    the node was stopped at a checkpoint step (Expand-and-Prune): it has no children and is
                      not a leaf, so it is never scored and its value is NaN (or None: no node was pruned)
    """

    tree: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    step: np.ndarray
    sde: np.ndarray
    split: np.ndarray
    logp: np.ndarray
    num_trees: int
    pruned: Optional[np.ndarray] = field(default=None, compare=False)
    _children: List[np.ndarray] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, num_trees: int) -> "Tree":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), z.copy(), z.copy(), np.zeros(0, bool), np.zeros(0, bool),
                   np.zeros(0, np.float32), num_trees)

    def add_nodes(self, tree, parent, depth, step, sde, split, logp=None) -> np.ndarray:
        """Append nodes (array-likes of equal length); returns their indices."""
        tree = np.asarray(tree, dtype=np.int64).reshape(-1)
        n0, k = self.num_nodes, tree.shape[0]

        def arr(x, dtype):
            return np.broadcast_to(np.asarray(x, dtype=dtype), (k,)).copy()

        self.tree = np.concatenate([self.tree, tree])
        self.parent = np.concatenate([self.parent, arr(parent, np.int64)])
        self.depth = np.concatenate([self.depth, arr(depth, np.int64)])
        self.step = np.concatenate([self.step, arr(step, np.int64)])
        self.sde = np.concatenate([self.sde, arr(sde, bool)])
        self.split = np.concatenate([self.split, arr(split, bool)])
        lp = np.full(k, np.nan, np.float32) if logp is None else arr(logp, np.float32)
        self.logp = np.concatenate([self.logp, lp])
        if self.pruned is not None:
            self.pruned = np.concatenate([self.pruned, np.zeros(k, bool)])
        self._children = None
        return np.arange(n0, n0 + k)

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def num_nodes(self) -> int:
        return int(self.tree.shape[0])

    @property
    def children(self) -> List[np.ndarray]:
        """``children[n]``: indices of n's children, in creation order."""
        if self._children is None:
            kids: List[List[int]] = [[] for _ in range(self.num_nodes)]
            for n, p in enumerate(self.parent):
                if p >= 0:
                    kids[p].append(n)
            self._children = [np.asarray(k, dtype=np.int64) for k in kids]
        return self._children

    @property
    def is_leaf(self) -> np.ndarray:
        """Nodes without children that were not pruned (the scored samples)."""
        has_child = np.zeros(self.num_nodes, bool)
        has_child[self.parent[self.parent >= 0]] = True
        return ~has_child if self.pruned is None else ~has_child & ~self.pruned

    def mark_pruned(self, node_ids) -> None:
        """Mark nodes as stopped at a checkpoint step (they must not get children afterwards)."""
        if self.pruned is None:
            self.pruned = np.zeros(self.num_nodes, bool)
        self.pruned[np.asarray(node_ids, dtype=np.int64)] = True

    @property
    def is_root(self) -> np.ndarray:
        return self.parent < 0

    def leaves(self, tree: int | None = None) -> np.ndarray:
        mask = self.is_leaf if tree is None else self.is_leaf & (self.tree == tree)
        return np.nonzero(mask)[0]

    def root_of(self) -> np.ndarray:
        """Index of each node's root."""
        root = np.arange(self.num_nodes)
        for n in range(self.num_nodes):  # topological order: parents are resolved first
            if self.parent[n] >= 0:
                root[n] = root[self.parent[n]]
        return root

    def at_depth(self, depth: int) -> np.ndarray:
        """Indices of the nodes at ``depth``, in creation order (tree-major)."""
        return np.nonzero(self.depth == depth)[0]

    def validate(self) -> None:
        """Structural invariants; raises ValueError on a malformed tree."""
        n = self.num_nodes
        if any(a.shape != (n,) for a in (self.parent, self.depth, self.step, self.sde, self.split, self.logp)):
            raise CoreError("tree arrays differ in length")
        idx = np.arange(n)
        if np.any(self.parent >= idx):
            raise CoreError("nodes are not in topological order (a parent follows its child)")
        child = self.parent >= 0
        if np.any(self.depth[child] != self.depth[self.parent[child]] + 1) or np.any(self.depth[~child] != 0):
            raise CoreError("depth is not parent depth + 1")
        if np.any(self.tree[child] != self.tree[self.parent[child]]):
            raise CoreError("a node and its parent belong to different trees")

    # ------------------------------------------------------------------------------------------------ dump
    def to_arrays(self) -> Dict[str, np.ndarray]:
        return {
            "tree": self.tree, "parent": self.parent, "depth": self.depth, "step": self.step,
            "sde": self.sde, "split": self.split, "logp": self.logp,
        }


# ------------------------------------------------------------------------------------------------------- tree spec
STEP_KINDS = ("sde", "ode")
SPLIT_NOISES = ("correlated", "independent")
# Mixed into the seed of the random split draw so it is not the same stream as other users of train.seed.
_RANDOM_SPLIT_TAG = 0x7E5EED


@dataclass(frozen=True)
class TreeSpec:
    """The trees of one iteration, per prompt: a pure description, no tensors.

    num_steps     N denoising steps; step ``i`` goes from sigma ``s_i`` to ``s_{i+1}``
    roots         initial noises per prompt (a sequential group of G chains: ``roots=G``, no split steps)
    split_steps   steps at which every live node gets ``branching`` children (strictly increasing)
    branching     K, children per node at a split step
    split_noise   "correlated" (``xi_b = (xi_0 + c z_b) / sqrt(1 + c^2)``) or "independent"
    correlation   c of the correlated split noise
    kinds         "sde" or "ode" per step (length N); split steps are always "sde"
    sde_form      SDE form name of ``video_branch.sde`` ("dance", "flow")
    eta           noise level of non-split SDE steps
    split_eta     noise level of split steps (None: ``eta``)
    shift         flow shift of the sigma schedule
    survivors     ``((step, count), ...)``: checkpoint steps of Expand-and-Prune (ALGORITHMS.md section 7). Before
                  ``step`` runs, each tree keeps ``count`` of its live nodes (chosen by a preview rule, see
                  ``video_branch.ovf``) and the others stop. Counts come from the config, so every rank runs the same
                  forward passes.
    """

    num_steps: int
    roots: int = 1
    split_steps: Tuple[int, ...] = ()
    branching: int = 1
    split_noise: str = "correlated"
    correlation: float = 4.0
    kinds: Optional[Tuple[str, ...]] = None
    sde_form: str = "dance"
    eta: float = 0.3
    split_eta: Optional[float] = None
    shift: float = 3.0
    survivors: Tuple[Tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        n = self.num_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise CoreError(f"TreeSpec.num_steps: expected an integer >= 1, got {n!r}")
        for name in ("roots", "branching"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise CoreError(f"TreeSpec.{name}: expected an integer >= 1, got {v!r}")
        splits = tuple(int(s) for s in self.split_steps)
        if list(splits) != sorted(set(splits)) or any(not 0 <= s < n for s in splits):
            raise CoreError(f"TreeSpec.split_steps: expected strictly increasing steps in [0, {n - 1}], got {splits}")
        kinds = ("sde",) * n if self.kinds is None else tuple(self.kinds)
        if len(kinds) != n or any(k not in STEP_KINDS for k in kinds):
            raise CoreError(f"TreeSpec.kinds: expected {n} entries from {STEP_KINDS}, got {kinds}")
        if any(kinds[s] != "sde" for s in splits):
            raise CoreError(f"TreeSpec.kinds: split steps {splits} must be 'sde', got {[kinds[s] for s in splits]}")
        if self.split_noise not in SPLIT_NOISES:
            raise CoreError(f"TreeSpec.split_noise: expected one of {SPLIT_NOISES}, got {self.split_noise!r}")
        split_eta = self.eta if self.split_eta is None else self.split_eta
        for name, v in (("correlation", self.correlation), ("eta", self.eta), ("split_eta", split_eta)):
            # correlation may be inf (the independent limit); noise levels must be finite.
            if np.isnan(v) or v < 0 or (np.isinf(v) and name != "correlation"):
                raise CoreError(f"TreeSpec.{name}: expected a number >= 0, got {v!r}")
        if not self.shift > 0:
            raise CoreError(f"TreeSpec.shift: expected a number > 0, got {self.shift!r}")
        object.__setattr__(self, "num_steps", int(n))
        object.__setattr__(self, "roots", int(self.roots))
        object.__setattr__(self, "branching", int(self.branching))
        object.__setattr__(self, "split_steps", splits)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "split_eta", float(split_eta))
        object.__setattr__(self, "correlation", float(self.correlation))
        object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "survivors", self._check_survivors())

    def _check_survivors(self) -> Tuple[Tuple[int, int], ...]:
        pairs = []
        for item in self.survivors:
            if len(item) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in item):
                raise CoreError(f"TreeSpec.survivors: expected (step, count) integer pairs, got {self.survivors!r}")
            pairs.append((int(item[0]), int(item[1])))
        steps = [p[0] for p in pairs]
        if steps != sorted(set(steps)) or any(not 1 <= st < self.num_steps for st in steps):
            raise CoreError(f"TreeSpec.survivors: expected strictly increasing checkpoint steps in "
                             f"[1, {self.num_steps - 1}] (a preview needs one evaluation before it), got {steps}")
        counts = [self.roots]
        for i in range(self.num_steps):
            if i in dict(pairs):
                keep = dict(pairs)[i]
                if not 1 <= keep <= counts[-1]:
                    raise CoreError(f"TreeSpec.survivors: {keep} survivors at step {i}, but a tree has "
                                     f"{counts[-1]} live nodes there; expected 1..{counts[-1]}")
                counts[-1] = keep
            counts.append(counts[-1] * (self.branching if i in self.split_steps else 1))
        return tuple(pairs)

    # --------------------------------------------------------------------------------------------- per step
    def is_split(self, step: int) -> bool:
        """A step where nodes get more than one child."""
        return step in self.split_steps and self.branching > 1

    def children_per_node(self, step: int) -> int:
        return self.branching if step in self.split_steps else 1

    def step_eta(self, step: int) -> float:
        """Noise level of the edges produced by ``step`` (NaN for an ODE step)."""
        if self.kinds[step] == "ode":
            return float("nan")
        return self.split_eta if step in self.split_steps else self.eta

    @property
    def sde_steps(self) -> Tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kinds) if k == "sde")

    def survivor_count(self, step: int) -> Optional[int]:
        """Live nodes per tree kept before ``step`` runs, or None when ``step`` is not a checkpoint."""
        return dict(self.survivors).get(step)

    def nodes_per_depth(self) -> np.ndarray:
        """``[N + 1]`` int64: nodes of one tree at each depth (depth 0: the roots), pruned ones included."""
        counts = [self.roots]
        for i in range(self.num_steps):
            counts.append(int(self.live_per_depth()[i]) * self.children_per_node(i))
        return np.asarray(counts, dtype=np.int64)

    def live_per_depth(self) -> np.ndarray:
        """``[N + 1]`` int64: nodes of one tree at each depth that go on (after a checkpoint's pruning); the last
        entry is the number of leaves."""
        live = [self.roots]
        for i in range(self.num_steps):
            keep = self.survivor_count(i)
            if keep is not None:
                live[-1] = keep
            live.append(live[-1] * self.children_per_node(i))
        return np.asarray(live, dtype=np.int64)


def window_steps(window, num_steps: int, iteration: int, start: Optional[int] = None) -> range:
    """Steps of the sliding SDE window at ``iteration`` (MixGRPO's schedule); empty when ``window.size == 0``.

    The window starts at ``start + stride * (iteration // slide_interval)``. With ``wrap`` it cycles through the
    positions where it fits (``start .. num_steps - size``) and jumps back to ``start`` after the last one; without,
    it stops at the last position. ``start`` defaults to ``window.start``.

    With ``window.end_offset = e`` (MixGRPO's released schedule, e = 2) the steps from ``num_steps - e`` on are never
    in the window: its start cycles through ``start .. num_steps - e`` and it is cut there, so near the end it
    shrinks (to size - 1, ..., 1 steps) and at the last position it is empty.
    """
    size = window.size
    if size == 0:
        return range(0)
    first = window.start if start is None else start
    end_offset = getattr(window, "end_offset", None)
    if end_offset is not None:
        # MixGRPO's schedule: the window is cut at `stop` (it shrinks near it and is empty at the last position),
        # and its start cycles through first .. stop.
        stop = num_steps - int(end_offset)
        if not 0 <= first <= stop:
            raise CoreError(f"window.start: the window starts at step {first}, beyond step {stop} where "
                            f"window.end_offset={end_offset} cuts it; expected start <= {stop}")
        offset = window.stride * (iteration // window.slide_interval)
        positions = stop - first + 1
        offset = offset % positions if window.wrap else min(offset, positions - 1)
        return range(first + offset, min(first + offset + size, stop))
    if first + size > num_steps:
        raise CoreError(
            f"window.start: a window of {size} steps from step {first} does not fit in "
            f"tree.num_steps={num_steps}; expected start <= {num_steps - size}"
        )
    offset = window.stride * (iteration // window.slide_interval)
    positions = num_steps - size - first + 1
    offset = offset % positions if window.wrap else min(offset, positions - 1)
    return range(first + offset, first + offset + size)


def draw_split_step(low: int, high: int, seed: int, iteration: int) -> int:
    """The branching step of a random-split iteration (Flow-GRPO-Fast), uniform in ``[low, high]``.

    Seeded by ``(seed, iteration)`` only, so every rank draws the same step.
    """
    if not 0 <= low <= high:
        raise CoreError(f"random split low/high: expected 0 <= low <= high, got {low}, {high}")
    rng = np.random.default_rng([int(seed) % (1 << 64), int(iteration), _RANDOM_SPLIT_TAG])
    return int(rng.integers(low, high + 1))


# ------------------------------------------------------------------------------------------------------ structure
def build_structure(spec: TreeSpec, num_trees: int) -> Tree:
    """The nodes a rollout of ``spec`` executes for ``num_trees`` prompts (``logp`` NaN).

    Creation order: the roots tree by tree, then step by step the children of the frontier in frontier order
    (a split parent's K children are consecutive), so every depth is tree-major.
    """
    if isinstance(num_trees, bool) or not isinstance(num_trees, (int, np.integer)) or num_trees < 1:
        raise CoreError(f"num_trees: expected an integer >= 1, got {num_trees!r}")
    t = Tree.empty(int(num_trees))
    frontier = t.add_nodes(tree=np.repeat(np.arange(num_trees), spec.roots), parent=-1, depth=0, step=-1,
                           sde=False, split=False)
    if spec.survivors:
        t.pruned = np.zeros(t.num_nodes, bool)
    for i in range(spec.num_steps):
        keep = spec.survivor_count(i)
        if keep is not None:
            # The layout keeps the first `keep` live nodes of every tree; the rollout moves the chosen survivors
            # into those positions, so the structure (and every count) is known before any data.
            rank_in_tree = np.arange(frontier.size) - np.searchsorted(t.tree[frontier], t.tree[frontier])
            t.mark_pruned(frontier[rank_in_tree >= keep])
            frontier = frontier[rank_in_tree < keep]
        parents = np.repeat(frontier, spec.children_per_node(i))
        frontier = t.add_nodes(tree=t.tree[parents], parent=parents, depth=i + 1, step=i,
                               sde=spec.kinds[i] == "sde", split=spec.is_split(i))
    return t


def accounting(spec: TreeSpec, guidance: bool = False) -> Dict[str, int]:
    """Per-prompt cost of ``spec``: ``leaves, forward_passes, edges, sde_edges``.

    A step costs one model evaluation per parent node that goes on (a split step evaluates once and samples K
    children; the nodes pruned at a checkpoint step are not evaluated again);
    classifier-free guidance doubles every evaluation.
    """
    n = spec.nodes_per_depth()
    live = spec.live_per_depth()
    sde = np.asarray([k == "sde" for k in spec.kinds])
    return {
        "leaves": int(live[-1]),
        # Only nodes that go on are evaluated: a checkpoint's pruned nodes stop before its step.
        "forward_passes": int(live[:-1].sum()) * (2 if guidance else 1),
        "edges": int(n[1:].sum()),
        "sde_edges": int(n[1:][sde].sum()),
    }
