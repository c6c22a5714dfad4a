"""Training phases of the trainer, keyed by the unit an objective trains on (``objective_info(name).unit``).

A phase has two parts: ``micro_batches(trainer)``, the number of backward micro-batches per update from the config
alone (it also records the iteration's trained units on the trainer), and ``train(trainer, iteration, res, adv,
trained)``, which runs the updates of one iteration and returns their statistics. Both phases live here, side by
side: ``"edges"`` trains on SDE transitions (the clipped-ratio family), ``"samples"`` on the rollout's final latents
(V-GRPO, DiffusionNFT).

The edge phase, per iteration: the trained edges (their count fixed by the config and checked) are split into
``trainer.n_micro`` micro-batches; each update recomputes their log-probs under the engine (and the reference's
means for the KL term), evaluates the objective and backpropagates micro-batch by micro-batch; updates after the
first reshuffle the edges.

The sample phase, per iteration:

- every prompt (tree) draws ``objective.pairs`` (t, eps) pairs, stratified in t, from a generator seeded by
  (train.seed, iteration, dp_rank, tree): the samples of a prompt share them and the ranks of an SP group agree;
- items are (sample, pair), sample-major; a micro-batch holds whole samples, ``max(1, optim.micro_batch // pairs)``
  at most, so the number of micro-batches is fixed by the config;
- the old quantities (the objective's ``old``) are computed before the first update, without grad, on the
  objective's old policy (the rollout's weights, or a kept copy such as the EMA of DiffusionNFT);
- each update runs the micro-batches (samples reshuffled after the first update), with the same non-finite-loss
  skip as the edge phase, and calls the objective's ``after_step`` after each optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import deepspeed
import numpy as np
import torch

from ..config.specs import tree_spec
from ..core.nft import ema_update_
from ..core.objectives import SampleBatch
from ..core.ovf import survivor_edges
from ..core.pruning import select_trained_edges
from ..core.surrogate import draw_pairs, noised, pair_generator
from ..core.tree import accounting, build_structure
from ..parallel.lockstep import LockstepError


@dataclass(frozen=True)
class Phase:
    micro_batches: Callable  # (trainer) -> int
    train: Callable  # (trainer, iteration, res, adv, trained) -> Dict[str, float]


_PHASES: Dict[str, Phase] = {}


@dataclass
class UpdateStats:
    """What a training phase reports for one iteration: losses, clipping, KL, ratio deviations, skips, grad norm."""

    losses: List[float] = field(default_factory=list)
    clipped: List[float] = field(default_factory=list)
    kls: List[float] = field(default_factory=list)
    ratio_dev_first: float = float("nan")  # max |ratio - 1| in the first micro-batch of the first update
    ratio_dev_all: float = float("nan")
    grad_norm: float = float("nan")
    skipped_micro_steps: int = 0
    skipped_updates: int = 0
    backward_calls: int = 0

    def ratio(self, ratio: torch.Tensor, first: bool) -> None:
        if not ratio.numel():
            return
        dev = float((ratio - 1).abs().max())
        if first:
            self.ratio_dev_first = dev
        self.ratio_dev_all = dev if not np.isfinite(self.ratio_dev_all) else max(self.ratio_dev_all, dev)

    def micro(self, out, bad: bool, last: bool, update_skipped: bool) -> None:
        """Record one backpropagated micro-batch (``out``: the objective's output)."""
        self.skipped_micro_steps += bad
        self.backward_calls += 1
        self.skipped_updates += last and update_skipped
        self.losses.append(float(out.loss.detach()))
        self.clipped.append(float(out.clipped_frac))
        self.kls.append(float(out.kl))

    def end_update(self, engine) -> None:
        gn = engine.get_global_grad_norm()
        self.grad_norm = float(gn) if gn is not None else float("nan")

    def summary(self) -> Dict[str, float]:
        return {
            "loss": float(np.mean(self.losses)), "grad_norm": self.grad_norm, "ratio_max_dev": self.ratio_dev_first,
            "ratio_max_dev_all": self.ratio_dev_all, "clip_frac": float(np.mean(self.clipped)),
            "kl": float(np.mean(self.kls)), "skipped_micro_steps": self.skipped_micro_steps,
            "skipped_updates": self.skipped_updates,
        }


def register_phase(unit: str, micro_batches: Callable, train: Callable) -> None:
    if unit in _PHASES:
        raise ValueError(f"training phase '{unit}' is registered twice")
    _PHASES[unit] = Phase(micro_batches, train)


def get_phase(unit: str) -> Phase:
    if unit not in _PHASES:
        raise KeyError(f"no training phase for objectives of unit '{unit}'; registered: {sorted(_PHASES)}")
    return _PHASES[unit]


# ------------------------------------------------------------------------------------------------ edges
def _edge_micro_batches(trainer) -> int:
    """Trained edges per rank and update, from the config alone (the same on every rank)."""
    cfg = trainer.cfg
    spec = tree_spec(cfg, 0)
    tree = build_structure(spec, cfg.train.prompts_per_rank)
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(tree.num_nodes)
    mask = select_trained_edges(tree, vals, vals, cfg, 0, np.random.default_rng(0))
    mask &= survivor_edges(tree, spec)
    trainer.edges_per_iteration = int(mask.sum())
    trainer.train_units = f"{trainer.edges_per_iteration} trained edges"
    return max(1, math.ceil(trainer.edges_per_iteration / cfg.optim.micro_batch))


def _train_edges(trainer, iteration: int, res, adv: np.ndarray, trained: np.ndarray) -> Dict[str, float]:
    cfg, policy, dev = trainer.cfg, trainer.policy, trainer.dist.device
    edges = np.nonzero(trained)[0]
    if edges.size != trainer.edges_per_iteration:
        raise LockstepError(f"iteration {iteration}: {edges.size} trained edges on rank {trainer.dist.rank}, "
                            f"expected {trainer.edges_per_iteration} from the config")
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + iteration)
    stats = UpdateStats()
    old_means: Dict[int, torch.Tensor] = {}
    for update in range(cfg.optim.updates_per_iteration):
        order = edges[torch.randperm(edges.size, generator=gen).numpy()] if update else edges
        chunks = np.array_split(order, trainer.n_micro)
        update_skipped = False
        for mb, ids in enumerate(chunks):
            e = policy.edge_log_probs(policy.engine, res, ids)
            x, s, emb, mean, std, logp = e.x, e.s, e.emb, e.mean, e.std, e.logp
            logp_old = e.inputs["logp_old"].to(logp)
            mean_ref = None
            if policy.reference is not None:
                with torch.no_grad():
                    mean_ref = policy.edge_log_probs(policy.reference, res, ids, inputs=e).mean
            mean_old = None
            if cfg.objective.ratio_norm:
                # The first update runs on the rollout's weights (DeepSpeed steps at the accumulation boundary),
                # so its means are the old policy's; later updates reuse them.
                if update == 0:
                    for edge_id, m_old in zip(ids.tolist(), mean.detach().cpu()):
                        old_means[edge_id] = m_old
                mean_old = torch.stack([old_means[i] for i in ids.tolist()]).to(mean)
            out = trainer.objective(logp, logp_old, torch.as_tensor(adv[ids], dtype=torch.float32, device=dev),
                                    clip_eps=cfg.objective.clip_eps, kl_coef=cfg.objective.kl_coef,
                                    mean_new=mean, mean_old=mean_old, mean_ref=mean_ref,
                                    std=std.expand(len(ids), *([1] * (x.dim() - 1))),
                                    ratio_norm=cfg.objective.ratio_norm)
            stats.ratio(out.ratio, first=update == 0 and mb == 0)
            # Weight each micro-batch by its share of edges; DeepSpeed divides by the accumulation steps.
            # SP ranks hold token shards of the same samples: DeepSpeed's mean over all ranks times sp_size is
            # the mean over data-parallel members of the full gradient.
            loss = out.loss * (len(ids) * trainer.n_micro / edges.size) * policy.sp.loss_scale
            last = mb == len(chunks) - 1
            bad, update_skipped = policy.micro_step(loss, (x[:1], s[:1], emb[:1]), last, update_skipped)
            stats.micro(out, bad, last, update_skipped)
        stats.end_update(policy.engine)
    trainer._stats.backward_calls += stats.backward_calls
    return stats.summary()


register_phase("edges", _edge_micro_batches, _train_edges)


# ------------------------------------------------------------------------------------------------ samples
def samples_per_micro_batch(cfg) -> int:
    """Whole samples per micro-batch: ``optim.micro_batch`` counts model inputs, a sample brings ``pairs`` of them."""
    return max(1, cfg.optim.micro_batch // cfg.objective.pairs)


def trained_samples(cfg, iteration: int = 0) -> int:
    """Final samples trained per prompt: the leaves of the tree."""
    return accounting(tree_spec(cfg, iteration))["leaves"]


def _sample_micro_batches(trainer) -> int:
    cfg = trainer.cfg
    trainer.samples_per_iteration = trained_samples(cfg) * cfg.train.prompts_per_rank
    trainer.edges_per_iteration = 0
    trainer.train_units = f"{trainer.samples_per_iteration} trained samples x {cfg.objective.pairs} pairs"
    return math.ceil(trainer.samples_per_iteration / samples_per_micro_batch(cfg))


class _Items:
    """Builds the (sample, pair) items of chosen samples from the leaves and the groups' pairs."""

    def __init__(self, trainer, iteration: int, res, adv: np.ndarray):
        cfg, d = trainer.cfg, trainer.dist
        self.m = cfg.objective.pairs
        leaves = res.tree.leaves()
        self.trees = res.tree.tree[leaves]
        self.x0 = res.leaf_latents
        self.adv = torch.as_tensor(np.nan_to_num(adv[leaves]), dtype=torch.float32)
        shape = tuple(self.x0.shape[1:])
        self.pairs = {int(j): draw_pairs(self.m, shape, pair_generator(cfg.train.seed, iteration, d.dp_rank, int(j)))
                      for j in np.unique(self.trees)}
        self.embeds = res.embeds

    def __call__(self, ids: np.ndarray, device) -> tuple[SampleBatch, torch.Tensor]:
        m = self.m
        x0 = self.x0[torch.as_tensor(ids)].repeat_interleave(m, 0).float()
        t = torch.cat([self.pairs[int(self.trees[i])][0] for i in ids])
        eps = torch.cat([self.pairs[int(self.trees[i])][1] for i in ids])
        batch = SampleBatch(x0=x0.to(device), eps=eps.to(device), t=t.to(device),
                            x_t=noised(x0, eps, t).to(device),
                            adv=self.adv[torch.as_tensor(ids)].repeat_interleave(m).to(device), pairs=m)
        emb = self.embeds[torch.as_tensor(self.trees[ids])].repeat_interleave(m, 0).to(device)
        return batch, emb


def _item_index(ids: np.ndarray, m: int) -> torch.Tensor:
    return torch.as_tensor((ids[:, None] * m + np.arange(m)[None, :]).reshape(-1))


def _old_module(trainer):
    name = trainer.objective.old_policy
    if name == "rollout":
        return trainer.policy.policy_copy if trainer.policy.policy_copy is not None else trainer.policy.engine.module
    return trainer.policy.copies[name]


def _train_samples(trainer, iteration: int, res, adv: np.ndarray, trained: np.ndarray) -> Dict[str, float]:
    cfg, obj, dev = trainer.cfg, trainer.objective, trainer.dist.device
    n = res.leaf_latents.shape[0]
    if n != trainer.samples_per_iteration:
        raise LockstepError(f"iteration {iteration}: {n} final samples on rank {trainer.dist.rank}, expected "
                            f"{trainer.samples_per_iteration} from the config")
    items = _Items(trainer, iteration, res, adv)
    chunks = np.array_split(np.arange(n), trainer.n_micro)

    module = _old_module(trainer)
    was_training = module.training
    module.eval()
    old_parts = []
    with torch.no_grad():
        for ids in chunks:
            batch, emb = items(ids, dev)
            v_old = trainer.policy.velocity_cfg(module, batch.x_t, batch.t, emb, res.negative)
            old_parts.append({k: v.detach().cpu() for k, v in obj.old(v_old, batch, cfg).items()})
    module.train(was_training)
    old = {k: torch.cat([p[k] for p in old_parts]) for k in old_parts[0]}

    gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + iteration)
    stats = UpdateStats()
    for update in range(cfg.optim.updates_per_iteration):
        order = torch.randperm(n, generator=gen).numpy() if update else np.arange(n)
        update_skipped = False
        for mb, ids in enumerate(np.array_split(order, trainer.n_micro)):
            batch, emb = items(ids, dev)
            idx = _item_index(ids, items.m)
            v = trainer.policy.velocity_cfg(trainer.policy.engine, batch.x_t, batch.t, emb, res.negative)
            out = obj(v, batch, {k: t[idx] for k, t in old.items()}, cfg)
            stats.ratio(out.ratio, first=update == 0 and mb == 0)
            # Weight each micro-batch by its share of samples (DeepSpeed divides by the accumulation steps); SP
            # ranks hold token shards of the same samples, as in the edge phase.
            loss = out.loss * (len(ids) * trainer.n_micro / n) * trainer.policy.sp.loss_scale
            last = mb == trainer.n_micro - 1
            bad, update_skipped = trainer.policy.micro_step(loss, (batch.x_t[:1], batch.t[:1], emb[:1]), last,
                                                     update_skipped)
            stats.micro(out, bad, last, update_skipped)
            if last:
                obj.after_step(lambda name, decay: ema_step(trainer.policy, name, decay), cfg)
        stats.end_update(trainer.policy.engine)
    trainer._stats.backward_calls += stats.backward_calls
    trainer._stats.trained_samples = n
    return stats.summary()


register_phase("samples", _sample_micro_batches, _train_samples)


# ------------------------------------------------------------------------------------------------ kept copies
def ema_step(policy, name: str, decay: float) -> None:
    """Move the kept copy ``name`` of ``policy`` (an :class:`~video_branch.engine.policy.Policy`) towards the trained
    weights: ``copy <- decay copy + (1 - decay) weights``.

    Under ZeRO-3 the trained parameters are gathered (a collective: every rank calls this after the same step).
    """
    pairs = [(a, b) for a, b in zip(policy.engine.module.parameters(), policy.copies[name].parameters())
             if a.requires_grad]
    src = [a for a, _ in pairs]
    with deepspeed.zero.GatheredParameters(src, enabled=policy.cfg.parallel.zero_stage == 3):
        ema_update_([b for _, b in pairs], [a.data for a in src], decay)
