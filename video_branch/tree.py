"""Rollout trees: the executed nodes of a batch of prompts as flat arrays.

A tree belongs to one prompt. Its roots are initial noises (``parent == -1``, ``step == -1``, depth 0); the node
produced by denoising step ``i`` from a node at depth ``i`` sits at depth ``i + 1``. A sequential group of G chains
(DanceGRPO, Flow-GRPO, MixGRPO) is a tree with G roots and no split steps: it "splits G ways at the root".

Nodes are stored in creation order, which is topological (every parent precedes its children) and depth-major.
All arrays are numpy and have one entry per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np


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
    """

    tree: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    step: np.ndarray
    sde: np.ndarray
    split: np.ndarray
    logp: np.ndarray
    num_trees: int
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
        has_child = np.zeros(self.num_nodes, bool)
        has_child[self.parent[self.parent >= 0]] = True
        return ~has_child

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

    def validate(self) -> None:
        """Structural invariants; raises ValueError on a malformed tree."""
        n = self.num_nodes
        if any(a.shape != (n,) for a in (self.parent, self.depth, self.step, self.sde, self.split, self.logp)):
            raise ValueError("tree arrays differ in length")
        idx = np.arange(n)
        if np.any(self.parent >= idx):
            raise ValueError("nodes are not in topological order (a parent follows its child)")
        child = self.parent >= 0
        if np.any(self.depth[child] != self.depth[self.parent[child]] + 1) or np.any(self.depth[~child] != 0):
            raise ValueError("depth is not parent depth + 1")
        if np.any(self.tree[child] != self.tree[self.parent[child]]):
            raise ValueError("a node and its parent belong to different trees")

    # ------------------------------------------------------------------------------------------------ dump
    def to_arrays(self) -> Dict[str, np.ndarray]:
        return {
            "tree": self.tree, "parent": self.parent, "depth": self.depth, "step": self.step,
            "sde": self.sde, "split": self.split, "logp": self.logp,
        }
