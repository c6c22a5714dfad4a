"""Frontier-batched tree rollout: execute a :class:`~video_branch.core.tree.TreeSpec` for a batch of prompts.

At each step every live node of every tree is evaluated together, in micro-batches of at most ``frontier_batch``
nodes (CFG doubles a call's batch: unconditional and conditional halves in one call). A split step evaluates the
model once per parent and samples its K children from correlated noise around the shared mean; every other step
gives each node one child, by an SDE or an ODE step.

Randomness is per tree: tree ``t`` draws from its own generator seeded with ``seeds[t]``, in a fixed order (its
roots, then at each SDE step the noise of all its children in one draw, before the step is micro-batched). The
result therefore does not depend on the micro-batch size nor on which trees share a batch, and ranks of one
sequence-parallel group given the same seeds draw the same noise. Noise is drawn on the CPU so it is also the same
on any device.

Expand-and-Prune (``spec.survivors``): before a checkpoint step the live nodes' previews (the ``x0_hat`` of the
evaluation that produced them) go to ``prune_fn``, which returns the nodes that go on; their contents are moved into
the positions :func:`~video_branch.tree.build_structure` reserved for survivors, the others are marked pruned.

The log-prob of every SDE edge is computed by the same path the trainer uses to recompute it (:func:`edge_inputs`
then ``sde.transition_log_prob``), so the on-policy ratio is exactly 1 before any update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ..core import sde
from ..core.schedule import flow_sigmas, model_timesteps
from ..core.tree import Tree, TreeSpec, build_structure

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# prune_fn(step, node_ids [L], node_trees [L], x0_hat [L, *latent_shape]) -> kept node ids
PruneFn = Callable[[int, np.ndarray, np.ndarray, torch.Tensor], np.ndarray]
REWARD_ON = ("final", "x0_hat")


@dataclass
class RolloutResult:
    """What a rollout produced, for one batch of trees.

    spec            the executed :class:`TreeSpec`
    tree            node arrays; ``logp`` is filled on SDE edges (NaN on roots and ODE edges)
    sigmas          ``[N + 1]`` float32 (CPU) schedule; step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``
    edge_eta        ``[num_nodes]`` float32: noise level of the edge into each node (NaN for roots and ODE edges)
    edge_std        ``[num_nodes]`` float32: std of that edge's Gaussian transition (NaN where none)
    leaf_latents    ``[L, *latent_shape]`` final latents of ``tree.leaves()``, in that order
    leaf_x0_hat     ``[L, *latent_shape]`` the last step's ``x0_hat = x - s v`` per leaf (``reward_on="x0_hat"``),
                    or None
    forward_passes  model evaluations per node summed over the rollout (CFG counts two)
    model_calls     calls of ``model_fn``
    logprob_reduce  reduction of the stored log-probs ("mean" or "sum" over latent elements)
    """

    spec: TreeSpec
    tree: Tree
    sigmas: torch.Tensor
    edge_eta: np.ndarray
    edge_std: np.ndarray
    leaf_latents: torch.Tensor
    leaf_x0_hat: Optional[torch.Tensor]
    forward_passes: int
    model_calls: int
    logprob_reduce: str
    _store: torch.Tensor
    _slot: np.ndarray

    @property
    def stored(self) -> np.ndarray:
        """``[num_nodes]`` bool: the node's latent is kept (parent or child of an SDE edge, or a leaf)."""
        return self._slot >= 0

    @property
    def s_cap(self) -> torch.Tensor:
        """``sigmas[1]``: the Flow-GRPO form's replacement for s = 1 (pass it to ``sde.transition_log_prob``)."""
        return self.sigmas[1]

    def latents(self, node_ids) -> torch.Tensor:
        """``[len(node_ids), *latent_shape]`` stored latents (on the CPU when ``store_on_cpu``)."""
        ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.tree.num_nodes):
            raise IndexError(f"node ids must lie in [0, {self.tree.num_nodes}), got {ids.min()}..{ids.max()}")
        missing = ids[self._slot[ids] < 0]
        if missing.size:
            raise KeyError(
                f"latents of nodes {missing[:8].tolist()} were not stored: only parents and children of SDE edges "
                "and leaves are kept"
            )
        return self._store[torch.from_numpy(self._slot[ids])]


def edge_inputs(result: RolloutResult, node_ids) -> Dict[str, torch.Tensor]:
    """Everything needed to recompute the log-prob of the SDE edges into ``node_ids``.

    Returns (``B = len(node_ids)``; latents on the store's device, the rest on the CPU):
      parent_latent ``[B, *latent_shape]``, child_latent ``[B, *latent_shape]``,
      s ``[B]`` float32 (``sigmas[step]``), s_next ``[B]`` float32, eta ``[B]`` float32, tree_index ``[B]`` int64,
      logp_old ``[B]`` float32, step ``[B]`` int64, s_cap 0-d float32 (``sigmas[1]``).
    Recompute with ``v = model_fn(parent_latent, model_timesteps(s), emb[tree_index])`` (CFG: one call on the
    doubled batch, then ``sde.cfg_combine``) and ``sde.transition_log_prob(spec.sde_form, parent_latent, v,
    child_latent, s, s_next, eta, s_cap=s_cap, reduce=result.logprob_reduce)``.
    """
    tree = result.tree
    ids = np.asarray(node_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= tree.num_nodes):
        raise IndexError(f"node ids must lie in [0, {tree.num_nodes}), got {ids.min()}..{ids.max()}")
    not_sde = ids[~tree.sde[ids]]
    if not_sde.size:
        raise ValueError(f"nodes {not_sde[:8].tolist()}: the edge into them is not stochastic (root or ODE step)")
    steps = torch.from_numpy(tree.step[ids].copy())
    return {
        "parent_latent": result.latents(tree.parent[ids]),
        "child_latent": result.latents(ids),
        "s": result.sigmas[steps],
        "s_next": result.sigmas[steps + 1],
        "eta": torch.from_numpy(result.edge_eta[ids].copy()),
        "tree_index": torch.from_numpy(tree.tree[ids].copy()),
        "logp_old": torch.from_numpy(tree.logp[ids].copy()),
        "step": steps,
        "s_cap": result.s_cap,
    }


# ----------------------------------------------------------------------------------------------------- rollout
def _check_inputs(spec, prompt_embeds, latent_shape, seeds, negative_embeds, guidance_scale, frontier_batch,
                  reward_on, logprob_reduce):
    if not isinstance(spec, TreeSpec):
        raise TypeError(f"spec must be a TreeSpec, got {type(spec).__name__}")
    sde.get_sde_form(spec.sde_form)
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be a tensor [num_trees, L, D], got "
                         f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}")
    num_trees = prompt_embeds.shape[0]
    if len(seeds) != num_trees:
        raise ValueError(f"seeds: expected one seed per tree ({num_trees}), got {len(seeds)}")
    if len(latent_shape) < 1 or any(int(d) < 1 for d in latent_shape):
        raise ValueError(f"latent_shape must be positive sizes (C, F, H, W), got {tuple(latent_shape)}")
    if isinstance(frontier_batch, bool) or not isinstance(frontier_batch, int) or frontier_batch < 1:
        raise ValueError(f"frontier_batch must be an integer >= 1, got {frontier_batch!r}")
    if reward_on not in REWARD_ON:
        raise ValueError(f"reward_on must be one of {REWARD_ON}, got {reward_on!r}")
    if logprob_reduce not in ("mean", "sum"):
        raise ValueError(f"logprob_reduce must be 'mean' or 'sum', got {logprob_reduce!r}")
    if guidance_scale != 1.0:
        if negative_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_embeds (the unconditional prompt)")
        neg = negative_embeds if negative_embeds.ndim == 3 else negative_embeds.unsqueeze(0)
        if neg.shape[0] not in (1, num_trees) or neg.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(
                f"negative_embeds must be [L, D], [1, L, D] or [num_trees, L, D] matching prompt_embeds "
                f"{tuple(prompt_embeds.shape)}, got {tuple(negative_embeds.shape)}"
            )


def _stored_mask(tree: Tree, spec: TreeSpec) -> np.ndarray:
    keep = tree.sde.copy()
    keep[tree.parent[tree.sde]] = True
    keep |= tree.is_leaf
    for step, _ in spec.survivors:  # survivors are moved within their depth: keep the whole depth
        keep[tree.depth == step] = True
    return keep


@torch.no_grad()
def rollout(
    spec: TreeSpec,
    model_fn: ModelFn,
    prompt_embeds: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    negative_embeds: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    frontier_batch: int = 64,
    store_on_cpu: bool = True,
    dtype: torch.dtype = torch.float32,
    reward_on: str = "final",
    device="cpu",
    progress: Optional[Callable[[int, int], None]] = None,
    logprob_reduce: str = "mean",
    prune_fn: Optional[PruneFn] = None,
) -> RolloutResult:
    """Roll out one tree per prompt.

    Args:
        spec: the trees' description (:func:`video_branch.config.specs.tree_spec`).
        model_fn: ``(x [B, *latent_shape] in dtype, t [B] float32 = 1000 * s, emb [B, L, D]) -> velocity`` of x's shape.
        prompt_embeds: ``[T, L, D]``, one prompt per tree.
        latent_shape: ``(C, F, H, W)`` of one sample.
        seeds: ``T`` integers; tree t draws all its noise from a generator seeded with ``seeds[t]``.
        negative_embeds: ``[L, D]``, ``[1, L, D]`` or ``[T, L, D]``; required when ``guidance_scale != 1``.
        guidance_scale: CFG weight; 1 disables CFG.
        frontier_batch: most nodes per model call (a CFG call holds twice as many samples).
        store_on_cpu: keep stored latents on the CPU (else on ``device``).
        dtype: dtype of the latents and of the model input.
        reward_on: "final" or "x0_hat" (also keep the last step's x0_hat of each leaf).
        device: where the model runs.
        progress: called as ``progress(steps_done, num_steps)`` after each step.
        logprob_reduce: "mean" (default) or "sum" over latent elements, as the objective recomputes it.
        prune_fn: required when ``spec.survivors`` is set: ``prune_fn(step, node_ids, node_trees, x0_hat)`` returns
            the ``spec.survivor_count(step)`` nodes of each tree that go on (see ``video_branch.ovf``).

    Returns:
        :class:`RolloutResult`.
    """
    _check_inputs(spec, prompt_embeds, latent_shape, seeds, negative_embeds, guidance_scale, frontier_batch,
                  reward_on, logprob_reduce)
    if spec.survivors and prune_fn is None:
        raise ValueError(f"spec.survivors={spec.survivors} needs a prune_fn (the preview rule of tree.prune_rule)")
    device = torch.device(device)
    shape = tuple(int(d) for d in latent_shape)
    num_trees = prompt_embeds.shape[0]
    tree = build_structure(spec, num_trees)
    sigmas = flow_sigmas(spec.num_steps, spec.shift)
    s_cap = sigmas[1]
    guided = guidance_scale != 1.0
    emb_all = prompt_embeds.to(device)
    neg_all = None
    if guided:
        neg = negative_embeds if negative_embeds.ndim == 3 else negative_embeds.unsqueeze(0)
        neg_all = neg.expand(num_trees, *neg.shape[1:]).to(device=device, dtype=prompt_embeds.dtype)

    edge_eta = np.asarray([np.nan] + [spec.step_eta(i) for i in range(spec.num_steps)], np.float32)[tree.step + 1]
    edge_std = np.full(tree.num_nodes, np.nan, np.float32)
    store_device = torch.device("cpu") if store_on_cpu else device
    slot = np.full(tree.num_nodes, -1, np.int64)
    keep = _stored_mask(tree, spec)
    slot[keep] = np.arange(int(keep.sum()))
    store = torch.empty((int(keep.sum()), *shape), dtype=dtype, device=store_device)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    counters = {"forward_passes": 0, "model_calls": 0}

    def put(nodes: np.ndarray, x: torch.Tensor) -> None:
        m = keep[nodes]
        if m.any():
            store[torch.from_numpy(slot[nodes[m]])] = x[torch.from_numpy(np.nonzero(m)[0])].to(store_device)

    def velocity(x: torch.Tensor, steps: torch.Tensor, trees: torch.Tensor) -> torch.Tensor:
        t = model_timesteps(sigmas[steps]).to(device)
        emb = emb_all[trees.to(device)]
        if guided:
            out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg_all[trees.to(device)], emb]))
            _check_velocity(out, (2 * x.shape[0], *shape))
            v_u, v_c = out.chunk(2)
            v = sde.cfg_combine(v_u, v_c, guidance_scale)
        else:
            v = model_fn(x, t, emb)
            _check_velocity(v, tuple(x.shape))
        counters["forward_passes"] += x.shape[0] * (2 if guided else 1)
        counters["model_calls"] += 1
        return v

    roots = tree.at_depth(0)
    frontier = torch.stack([torch.randn(shape, generator=gens[tree.tree[r]]) for r in roots]).to(device, dtype)
    put(roots, frontier)
    leaf_x0 = None
    preview = None
    for i in range(spec.num_steps):
        if spec.survivor_count(i) is not None:
            frontier = _apply_survivors(spec, tree, i, frontier, preview, prune_fn, store, slot, edge_std)
        parents, children = tree.at_depth(i), tree.at_depth(i + 1)
        if tree.pruned is not None:
            parents = parents[~tree.pruned[parents]]
        k = spec.children_per_node(i)
        stochastic = spec.kinds[i] == "sde"
        nxt = torch.empty((children.size, *shape), dtype=dtype, device=device)
        step_noise = _step_noise(spec, i, shape, tree.tree[children], gens) if stochastic else None
        last = i == spec.num_steps - 1
        if last and reward_on == "x0_hat":
            leaf_x0 = torch.empty((children.size, *shape), dtype=dtype, device=store_device)
        preview = None
        if spec.survivor_count(i + 1) is not None:
            preview = torch.empty((children.size, *shape), dtype=dtype, device=store_device)
        for a in range(0, parents.size, frontier_batch):
            pb = parents[a:a + frontier_batch]
            cb = children[a * k:(a + pb.size) * k]
            x = frontier[a:a + pb.size]
            v = velocity(x, torch.from_numpy(tree.step[cb[::k]].copy()), torch.from_numpy(tree.tree[pb].copy()))
            if k > 1:
                x, v = x.repeat_interleave(k, 0), v.repeat_interleave(k, 0)
            steps = torch.from_numpy(tree.step[cb].copy())
            s, s_next = sigmas[steps], sigmas[steps + 1]
            if stochastic:
                noise = step_noise[a * k:(a + pb.size) * k].to(device)
                eta = torch.from_numpy(edge_eta[cb].copy())
                res = sde.sde_step(spec.sde_form, x, v, s, s_next, eta, s_cap=s_cap, noise=noise,
                                   reduce=logprob_reduce)
                child = res.latent
                tree.logp[cb] = res.log_prob.float().cpu().numpy()
                edge_std[cb] = res.std.reshape(-1).expand(cb.size).float().cpu().numpy()
            else:
                child = sde.ode_step(x, v, s, s_next)
            nxt[a * k:(a + pb.size) * k] = child
            if leaf_x0 is not None:
                leaf_x0[a * k:(a + pb.size) * k] = sde.predict_x0(x, v, s).to(store_device)
            if preview is not None:
                preview[a * k:(a + pb.size) * k] = sde.predict_x0(x, v, s).to(store_device)
        frontier = nxt
        put(children, frontier)
        if progress is not None:
            progress(i + 1, spec.num_steps)

    leaves = tree.leaves()
    return RolloutResult(
        spec=spec, tree=tree, sigmas=sigmas, edge_eta=edge_eta, edge_std=edge_std,
        leaf_latents=store[torch.from_numpy(slot[leaves])], leaf_x0_hat=leaf_x0,
        forward_passes=counters["forward_passes"], model_calls=counters["model_calls"],
        logprob_reduce=logprob_reduce, _store=store, _slot=slot,
    )


def _apply_survivors(spec, tree, step, frontier, preview, prune_fn, store, slot, edge_std) -> torch.Tensor:
    """Prune the depth-``step`` nodes before ``step`` runs; returns the survivors' latents (the new frontier).

    The chosen nodes' contents (latent, parent, edge log-prob and std) move, in their order, to the first
    ``survivor_count`` positions of their tree at this depth, which the structure left unpruned.
    """
    nodes = tree.at_depth(step)
    node_trees = tree.tree[nodes]
    kept = np.asarray(prune_fn(step, nodes.copy(), node_trees.copy(), preview), dtype=np.int64).reshape(-1)
    count = spec.survivor_count(step)
    order = np.empty(nodes.size, np.int64)  # order[j]: position (in `nodes`) whose contents go to position j
    for t in np.unique(node_trees):
        pos = np.nonzero(node_trees == t)[0]
        chosen = np.isin(nodes[pos], kept)
        if int(chosen.sum()) != count:
            raise ValueError(f"prune_fn kept {int(chosen.sum())} nodes of tree {t} at step {step}; expected {count}")
        order[pos] = np.concatenate([pos[chosen], pos[~chosen]])
    if not np.isin(kept, nodes).all() or np.unique(kept).size != kept.size:
        raise ValueError(f"prune_fn returned ids that are not distinct live nodes at step {step}: {kept[:8].tolist()}")
    perm = torch.from_numpy(order)
    for arr in (tree.parent, tree.logp, edge_std):
        arr[nodes] = arr[nodes[order]]
    tree._children = None
    rows = torch.from_numpy(slot[nodes])
    store[rows] = store[rows[perm]]
    frontier = frontier[perm.to(frontier.device)]
    go_on = ~tree.pruned[nodes]
    return frontier[torch.from_numpy(np.nonzero(go_on)[0]).to(frontier.device)]


def _step_noise(spec: TreeSpec, step: int, shape, child_tree: np.ndarray, gens) -> torch.Tensor:
    """``[len(child_tree), *shape]`` standard-normal noise of every child produced at ``step`` (CPU, float32).

    Each tree draws its children's noise in one call on its own generator, before the step is micro-batched, so
    the values depend on the seed and the tree's layout only. ``child_tree`` is tree-major (see build_structure).
    """
    out = torch.empty((child_tree.size, *shape), dtype=torch.float32)
    k = spec.children_per_node(step)
    trees, starts, counts = np.unique(child_tree, return_index=True, return_counts=True)
    for t, a, n in zip(trees, starts, counts):
        if step in spec.split_steps:
            # split_noise returns [k, parents, ...]; children are stored parent-major.
            xi = sde.split_noise((n // k, *shape), k, spec.correlation, generator=gens[t],
                                 independent=spec.split_noise == "independent")
            out[a:a + n] = xi.transpose(0, 1).reshape(n, *shape)
        else:
            out[a:a + n] = torch.randn((n, *shape), generator=gens[t])
    return out


def _check_velocity(v, expected) -> None:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected):
        raise ValueError(f"model_fn must return a velocity of shape {tuple(expected)}, got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
