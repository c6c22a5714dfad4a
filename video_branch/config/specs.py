"""From a resolved config to the core's descriptions: the trees of an iteration and their per-prompt accounting.

The core (``video_branch.core``) takes plain values; this module reads the config's sections and names the config key
when the core rejects a value.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from ..core.errors import CoreError
from ..core.minibatch import chain_ids, minibatch_sizes, plan_minibatches
from ..core.objectives import objective_info
from ..core.ovf import survivor_edges
from ..core.pruning import select_trained_edges
from ..core.tree import TreeSpec, accounting, build_structure, draw_split_step, window_steps
from .errors import ConfigError

# The core's argument names and the config keys they come from.
_KEYS = {"window.start": "tree.window.start", "window.end_offset": "tree.window.end_offset",
         "random split low/high": "tree.random_split.low/high"}


def _config_error(e: CoreError) -> ConfigError:
    msg = str(e)
    for arg, key in _KEYS.items():
        if msg.startswith(arg + ":"):
            return ConfigError(f"config key '{key}':{msg[len(arg) + 1:]}")
    field = msg.split(":", 1)[0].removeprefix("TreeSpec.") if msg.startswith("TreeSpec.") else ""
    return ConfigError(f"config key 'tree{'.' + field if field else ''}': {msg}")


def tree_spec(cfg, iteration: int = 0) -> TreeSpec:
    """The :class:`TreeSpec` of training iteration ``iteration`` of a resolved :class:`~video_branch.config.Config`.

    Depends on the config and the iteration only (never on data), so every rank builds the same trees.
    """
    t = cfg.tree
    try:
        kinds, splits = step_kinds(t, iteration, cfg.train.seed)
        return TreeSpec(
            num_steps=t.num_steps, roots=t.roots, split_steps=splits, branching=t.branching,
            split_noise=t.split_noise, correlation=t.correlation, kinds=kinds, sde_form=t.sde_form,
            eta=t.eta, split_eta=t.split_eta, shift=t.shift,
            survivors=tuple(tuple(p) for p in getattr(t, "survivors", ())),
        )
    except CoreError as e:
        raise _config_error(e) from None


def step_kinds(tree_cfg, iteration: int, seed: int) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """``(kinds, split_steps)`` of one iteration from a ``TreeConfig``.

    Split steps are SDE; the sliding window's steps are SDE; every other step is ``tree.base_kind``. With
    ``tree.random_split.enabled`` the single split step is drawn per iteration (replacing ``tree.split_steps``) and
    the window starts at it, truncated at the last step.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
        raise ValueError(f"iteration: expected an integer >= 0, got {iteration!r}")
    n = tree_cfg.num_steps
    rs = tree_cfg.random_split
    if rs.enabled:
        split = draw_split_step(rs.low, rs.high, seed, iteration)
        splits: Tuple[int, ...] = (split,)
        window = range(split, min(split + tree_cfg.window.size, n))
    else:
        splits = tuple(int(s) for s in tree_cfg.split_steps)
        window = window_steps(tree_cfg.window, n, iteration)
    sde = set(splits) | set(window)
    kinds = tuple("sde" if i in sde else tree_cfg.base_kind for i in range(n))
    return kinds, splits


def count_trained_edges(cfg, spec: TreeSpec, iteration: int = 0, draws: int = 2) -> int:
    """Trained edges per prompt under ``cfg.prune`` (``video_branch.core.pruning``).

    Pruning is called on the structure with random node values and advantages; the count must not depend on them
    (ranks stay in step), so it is drawn ``draws`` times and a difference is an error.
    """
    structure = build_structure(spec, 1)
    counts = set()
    for d in range(draws):
        rng = np.random.default_rng([int(cfg.train.seed) % (1 << 64), int(iteration), d])
        values = rng.standard_normal(structure.num_nodes).astype(np.float32)
        advantages = rng.standard_normal(structure.num_nodes).astype(np.float32)
        mask = np.asarray(select_trained_edges(structure, values, advantages, cfg, iteration, rng))
        mask = mask & survivor_edges(structure, spec)
        counts.add(int(np.count_nonzero(mask)))
    if len(counts) != 1:
        raise RuntimeError(f"the number of trained edges depends on the data ({sorted(counts)}); it must not")
    return counts.pop()


def count_trained_samples(cfg, spec: TreeSpec) -> int:
    """Final samples trained per prompt: every leaf for a sample-level objective (V-GRPO, DiffusionNFT), else 0."""
    return int(spec.live_per_depth()[-1]) if objective_info(cfg.objective.name).unit == "samples" else 0


def trained_mask(cfg, spec: TreeSpec, tree, iteration: int, rng: np.random.Generator) -> np.ndarray:
    """A trained-edge mask of ``tree`` (built from ``spec``) under ``cfg.prune`` for random values and advantages:
    the config-determined selection the counts are taken from."""
    values = rng.standard_normal(tree.num_nodes)
    advantages = rng.standard_normal(tree.num_nodes)
    mask = np.asarray(select_trained_edges(tree, values, advantages, cfg, iteration, rng))
    return mask & survivor_edges(tree, spec)


def update_schedule(cfg, iteration: int = 0, draws: int = 2) -> Dict[str, Any]:
    """One rank's update schedule at ``iteration``, from the config alone (the same on every rank).

    Returns ``unit`` ("edges" or "samples"), ``units`` (trained units per rank and iteration), ``minibatch_sizes``
    (in units, one pass), ``passes`` (``optim.updates_per_iteration``) and ``optimizer_steps`` (passes x
    mini-batches). With ``optim.minibatch_by: chain`` every chain must carry the same number of trained edges;
    otherwise the sizes would depend on the data and the config is rejected.
    """
    o = cfg.optim
    spec = tree_spec(cfg, iteration)
    tree = build_structure(spec, cfg.train.prompts_per_rank)
    unit = objective_info(cfg.objective.name).unit
    if unit == "samples":
        sizes = minibatch_sizes(int(spec.live_per_depth()[-1]) * cfg.train.prompts_per_rank, o.minibatch)
    else:
        seen = set()
        for d in range(draws):
            rng = np.random.default_rng([int(cfg.train.seed) % (1 << 64), int(iteration), d, 0x5C4E])
            edges = np.nonzero(trained_mask(cfg, spec, tree, iteration, rng))[0]
            groups = chain_ids(tree)[edges] if o.minibatch_by == "chain" else None
            try:
                plan = plan_minibatches(edges, o.minibatch, rng, groups)
            except CoreError as e:
                raise ConfigError(f"config key 'optim.minibatch_by': {e}") from None
            seen.add(tuple(len(b) for b in plan))
        if len(seen) != 1:
            raise ConfigError("config key 'optim.minibatch_by': chain mini-batches would hold different numbers of "
                              f"trained edges from one draw to the next ({sorted(seen)}): the chains carry unequal "
                              "numbers of trained edges; accepted: 'edge' for this tree")
        sizes = list(seen.pop())
    return {"unit": unit, "units": int(sum(sizes)), "minibatch_sizes": sizes, "passes": int(o.updates_per_iteration),
            "optimizer_steps": int(o.updates_per_iteration) * len(sizes)}


def optimizer_steps_before(cfg, iteration: int) -> int:
    """Optimizer steps that one rank takes in iterations ``0 .. iteration - 1`` (from the config alone)."""
    return int(sum(update_schedule(cfg, i)["optimizer_steps"] for i in range(int(iteration))))


def config_accounting(cfg, iteration: int = 0) -> Dict[str, Any]:
    """Per-prompt accounting of a resolved config at ``iteration`` (forward passes count CFG when enabled)."""
    spec = tree_spec(cfg, iteration)
    guidance = cfg.rollout.guidance_scale != 1.0
    out: Dict[str, Any] = {"method": cfg.method, "iteration": int(iteration)}
    out.update(accounting(spec, guidance))
    out["trained_edges"] = count_trained_edges(cfg, spec, iteration)
    out["trained_samples"] = count_trained_samples(cfg, spec)
    sched = update_schedule(cfg, iteration)
    out["optimizer_steps"] = sched["optimizer_steps"]  # per rank and iteration, train.prompts_per_rank prompts
    out["minibatch_sizes"] = sched["minibatch_sizes"]
    out["guidance_scale"] = cfg.rollout.guidance_scale
    out["split_steps"] = list(spec.split_steps)
    out["sde_steps"] = list(spec.sde_steps)
    if spec.survivors:
        out["survivors"] = [list(p) for p in spec.survivors]
        out["evaluated_per_step"] = spec.live_per_depth()[:-1].tolist()  # nodes evaluated at each step, per prompt
    return out
