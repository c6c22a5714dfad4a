"""Training phases of the trainer, keyed by the unit an objective trains on (``objective_info(name).unit``).

A phase has two parts: ``micro_batches(trainer)``, the number of backward micro-batches of the largest mini-batch
from the config alone (it also records the iteration's trained units on the trainer), and ``train(trainer,
iteration, res, adv, trained)``, which runs the updates of one iteration and returns their statistics. Both phases
live here, side by side: ``"edges"`` trains on SDE transitions (the clipped-ratio family), ``"samples"`` on the
rollout's final latents (V-GRPO, DiffusionNFT).

The update schedule (``video_branch.core.minibatch``, counts from ``config.specs.update_schedule``): each of the
``optim.updates_per_iteration`` passes shuffles the iteration's trained units (edges, whole chains with
``optim.minibatch_by: chain``, or samples) with a generator seeded by (train.seed, iteration, dp_rank) and cuts them
into mini-batches of ``optim.minibatch`` (0: one mini-batch); an optimizer step follows each mini-batch. A mini-batch
is backpropagated in micro-batches of at most ``optim.micro_batch`` edges, each weighted by its share of the
mini-batch. The first step is on-policy (its ratios are 1, logged as ``ratio_max_dev``); later steps see moved
weights, so the clip acts. Per step, the maximum ratio deviation and the clip fraction are logged
(``step_ratio_max_dev``, ``step_clip_frac``).

The edge phase, per mini-batch: recompute the edges' log-probs under the engine (and the reference's means for the
KL term), evaluate the objective, backpropagate micro-batch by micro-batch, step. With GRPO-Guard
(``objective.ratio_norm``) the old policy's transition means are those of the first mini-batch's own forward (still
on the rollout's weights) and, for every other edge, a forward without grad before the first step.

The sample phase, per iteration:

- every prompt (tree) draws ``objective.pairs`` (t, eps) pairs, stratified in t, from a generator seeded by
  (train.seed, iteration, dp_rank, tree): the samples of a prompt share them and the ranks of an SP group agree;
- items are (sample, pair), sample-major; a micro-batch holds whole samples, ``max(1, optim.micro_batch // pairs)``
  at most, so the number of micro-batches is fixed by the config;
- the old quantities (the objective's ``old``) are computed before the first update, without grad, on the
  objective's old policy (the rollout's weights, or a kept copy such as the EMA of DiffusionNFT);
- each mini-batch of samples is trained as above, with the same non-finite-loss skip as the edge phase, and the
  objective's ``after_step`` runs after each optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import deepspeed
import numpy as np
import torch

from ..config.specs import tree_spec, update_schedule
from ..core.minibatch import chain_ids, plan_minibatches
from ..core.nft import ema_update_
from ..core.objectives import SampleBatch, kl_std
from ..core.surrogate import draw_pairs, noised, pair_generator
from ..core.tree import accounting
from ..parallel.collectives import all_mean
from ..parallel.lockstep import LockstepError

_SHUFFLE_TAG = 0x5EED5  # mixed into the seed of the mini-batch shuffle


@dataclass(frozen=True)
class Phase:
    micro_batches: Callable  # (trainer) -> int
    train: Callable  # (trainer, iteration, res, adv, trained) -> Dict[str, float]


_PHASES: Dict[str, Phase] = {}


@dataclass
class UpdateStats:
    """What a training phase reports for one iteration: losses, clipping and ratio deviation per optimizer step, KL,
    skips, grad norm."""

    losses: List[float] = field(default_factory=list)
    clipped: List[float] = field(default_factory=list)
    kls: List[float] = field(default_factory=list)
    step_ratio_dev: List[float] = field(default_factory=list)  # max |ratio - 1| of each optimizer step
    step_clip: List[float] = field(default_factory=list)  # mean clip fraction of each optimizer step
    grad_norm: float = float("nan")
    skipped_micro_steps: int = 0
    skipped_updates: int = 0
    backward_calls: int = 0
    engine_steps: int = 0  # optimizer steps the engine took (DeepSpeed's global step count moved by)
    _dev: float = float("nan")
    _clip: List[float] = field(default_factory=list)

    def begin_step(self) -> None:
        self._dev, self._clip = float("nan"), []

    def ratio(self, ratio: torch.Tensor) -> None:
        if not ratio.numel():
            return
        dev = float((ratio - 1).abs().max())
        self._dev = dev if not np.isfinite(self._dev) else max(self._dev, dev)

    def micro(self, out, bad: bool, last: bool, update_skipped: bool) -> None:
        """Record one backpropagated micro-batch (``out``: the objective's output)."""
        self.skipped_micro_steps += bad
        self.backward_calls += 1
        self.skipped_updates += last and update_skipped
        self.losses.append(float(out.loss.detach()))
        self.clipped.append(float(out.clipped_frac))
        self._clip.append(float(out.clipped_frac))
        self.kls.append(float(out.kl))

    def end_step(self, engine) -> None:
        gn = engine.get_global_grad_norm()
        self.grad_norm = float(gn) if gn is not None else float("nan")
        self.step_ratio_dev.append(self._dev)
        self.step_clip.append(float(np.mean(self._clip)) if self._clip else float("nan"))

    def summary(self, dist) -> Dict[str, float]:
        """Scalars (averaged over ranks by the trainer) and the per-step lists (averaged over ranks here)."""
        def mean(v):
            return float(np.mean(v)) if len(v) else float("nan")

        def nanmax(v):
            v = [x for x in v if np.isfinite(x)]
            return max(v) if v else float("nan")

        steps = len(self.step_ratio_dev)
        per = all_mean(dist, {**{f"d{i:05d}": v for i, v in enumerate(self.step_ratio_dev)},
                              **{f"c{i:05d}": v for i, v in enumerate(self.step_clip)}})
        return {
            "loss": mean(self.losses), "grad_norm": self.grad_norm,
            "ratio_max_dev": self.step_ratio_dev[0] if steps else float("nan"),
            "ratio_max_dev_all": nanmax(self.step_ratio_dev), "ratio_max_dev_later": nanmax(self.step_ratio_dev[1:]),
            "clip_frac": mean(self.clipped), "clip_frac_later": mean([c for c in self.step_clip[1:]
                                                                      if np.isfinite(c)]),
            "kl": mean(self.kls), "skipped_micro_steps": self.skipped_micro_steps,
            "skipped_updates": self.skipped_updates, "optimizer_steps": self.engine_steps,
            "step_ratio_max_dev": [per[f"d{i:05d}"] for i in range(steps)],
            "step_clip_frac": [per[f"c{i:05d}"] for i in range(steps)],
        }


def register_phase(unit: str, micro_batches: Callable, train: Callable) -> None:
    if unit in _PHASES:
        raise ValueError(f"training phase '{unit}' is registered twice")
    _PHASES[unit] = Phase(micro_batches, train)


def get_phase(unit: str) -> Phase:
    if unit not in _PHASES:
        raise KeyError(f"no training phase for objectives of unit '{unit}'; registered: {sorted(_PHASES)}")
    return _PHASES[unit]


def shuffle_generator(cfg, iteration: int, dp_rank: int) -> np.random.Generator:
    """The mini-batch shuffle of one iteration; the ranks of a sequence-parallel group share their dp_rank, so they
    train the same mini-batches."""
    return np.random.default_rng([int(cfg.train.seed) % (1 << 64), int(iteration), int(dp_rank), _SHUFFLE_TAG])


def _micro_chunks(batch: np.ndarray, per_micro: int) -> List[np.ndarray]:
    return np.array_split(batch, max(1, math.ceil(batch.size / per_micro)))


def _check_plan(plan, sched, iteration: int, rank: int, what: str) -> None:
    sizes = [len(b) for b in plan]
    if sizes != sched["minibatch_sizes"]:
        raise LockstepError(f"iteration {iteration}: mini-batches of {sizes} {what} on rank {rank}, expected "
                            f"{sched['minibatch_sizes']} from the config")


# ------------------------------------------------------------------------------------------------ edges
def _edge_micro_batches(trainer) -> int:
    """Micro-batches of the largest mini-batch at iteration 0, from the config alone (the same on every rank)."""
    cfg = trainer.cfg
    sched = update_schedule(cfg, 0)
    trainer.edges_per_iteration = sched["units"]
    trainer.train_units = (f"{sched['units']} trained edges in {sched['optimizer_steps']} optimizer step(s) "
                           f"per iteration")
    return max(1, math.ceil(max(sched["minibatch_sizes"], default=1) / cfg.optim.micro_batch))


def _old_means(trainer, res, edges: np.ndarray) -> Dict[int, torch.Tensor]:
    """Transition means of ``edges`` under the rollout's weights, without grad (GRPO-Guard's mu_old)."""
    policy = trainer.policy
    module = policy.policy_copy if policy.policy_copy is not None else policy.engine
    out: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for ids in _micro_chunks(edges, trainer.cfg.optim.micro_batch):
            for edge_id, m in zip(ids.tolist(), policy.edge_log_probs(module, res, ids).mean.cpu()):
                out[edge_id] = m
    return out


def _train_edges(trainer, iteration: int, res, adv: np.ndarray, trained: np.ndarray) -> Dict[str, float]:
    cfg, policy, dev = trainer.cfg, trainer.policy, trainer.dist.device
    sched = update_schedule(cfg, iteration)
    edges = np.nonzero(trained)[0]
    if edges.size != sched["units"]:
        raise LockstepError(f"iteration {iteration}: {edges.size} trained edges on rank {trainer.dist.rank}, "
                            f"expected {sched['units']} from the config")
    gen = shuffle_generator(cfg, iteration, trainer.dist.dp_rank)
    groups = chain_ids(res.tree)[edges] if cfg.optim.minibatch_by == "chain" else None
    stats = UpdateStats()
    steps0 = policy.engine.global_steps
    old_means: Dict[int, torch.Tensor] = {}
    for update in range(cfg.optim.updates_per_iteration):
        plan = plan_minibatches(edges, cfg.optim.minibatch, gen, groups)
        _check_plan(plan, sched, iteration, trainer.dist.rank, "edges")
        if cfg.objective.ratio_norm and update == 0 and len(plan) > 1:
            old_means.update(_old_means(trainer, res, np.concatenate(plan[1:])))
        for step, batch in enumerate(plan):
            first = update == 0 and step == 0  # still on the rollout's weights
            stats.begin_step()
            chunks = _micro_chunks(batch, cfg.optim.micro_batch)
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
                    if first:
                        for edge_id, m_old in zip(ids.tolist(), mean.detach().cpu()):
                            old_means[edge_id] = m_old
                    mean_old = torch.stack([old_means[i] for i in ids.tolist()]).to(mean)
                std_e = std.expand(len(ids), *([1] * (x.dim() - 1)))
                out = trainer.objective(logp, logp_old, torch.as_tensor(adv[ids], dtype=torch.float32, device=dev),
                                        clip_eps=cfg.objective.clip_eps, kl_coef=cfg.objective.kl_coef,
                                        mean_new=mean, mean_old=mean_old, mean_ref=mean_ref, std=std_e,
                                        ratio_norm=cfg.objective.ratio_norm,
                                        kl_std=kl_std(cfg.objective.kl_form, std_e, s, e.s_next))
                stats.ratio(out.ratio)
                # Weight each micro-batch by its share of the mini-batch's edges. SP ranks hold token shards of the
                # same samples: DeepSpeed's mean over all ranks times sp_size is the mean over data-parallel members
                # of the full gradient.
                loss = out.loss * (len(ids) / batch.size) * policy.sp.loss_scale
                last = mb == len(chunks) - 1
                bad, update_skipped = policy.micro_step(loss, (x[:1], s[:1], emb[:1]), last, update_skipped)
                stats.micro(out, bad, last, update_skipped)
            stats.end_step(policy.engine)
    stats.engine_steps = policy.engine.global_steps - steps0
    trainer._stats.backward_calls += stats.backward_calls
    return stats.summary(trainer.dist)


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
    sched = update_schedule(cfg, 0)
    trainer.samples_per_iteration = trained_samples(cfg) * cfg.train.prompts_per_rank
    trainer.edges_per_iteration = 0
    trainer.train_units = (f"{trainer.samples_per_iteration} trained samples x {cfg.objective.pairs} pairs in "
                           f"{sched['optimizer_steps']} optimizer step(s) per iteration")
    return math.ceil(max(sched["minibatch_sizes"], default=1) / samples_per_micro_batch(cfg))


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
    per_micro = samples_per_micro_batch(cfg)
    chunks = _micro_chunks(np.arange(n), per_micro)

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

    sched = update_schedule(cfg, iteration)
    gen = shuffle_generator(cfg, iteration, trainer.dist.dp_rank)
    stats = UpdateStats()
    steps0 = trainer.policy.engine.global_steps
    for _ in range(cfg.optim.updates_per_iteration):
        plan = plan_minibatches(np.arange(n), cfg.optim.minibatch, gen)
        _check_plan(plan, sched, iteration, trainer.dist.rank, "samples")
        for batch in plan:
            stats.begin_step()
            parts = _micro_chunks(batch, per_micro)
            update_skipped = False
            for mb, ids in enumerate(parts):
                items_mb, emb = items(ids, dev)
                idx = _item_index(ids, items.m)
                v = trainer.policy.velocity_cfg(trainer.policy.engine, items_mb.x_t, items_mb.t, emb, res.negative)
                out = obj(v, items_mb, {k: t[idx] for k, t in old.items()}, cfg)
                stats.ratio(out.ratio)
                # Weight each micro-batch by its share of the mini-batch's samples; SP ranks hold token shards of
                # the same samples, as in the edge phase.
                loss = out.loss * (len(ids) / batch.size) * trainer.policy.sp.loss_scale
                last = mb == len(parts) - 1
                bad, update_skipped = trainer.policy.micro_step(loss, (items_mb.x_t[:1], items_mb.t[:1], emb[:1]),
                                                                last, update_skipped)
                stats.micro(out, bad, last, update_skipped)
                if last:
                    obj.after_step(lambda name, decay: ema_step(trainer.policy, name, decay), cfg)
            stats.end_step(trainer.policy.engine)
    stats.engine_steps = trainer.policy.engine.global_steps - steps0
    trainer._stats.backward_calls += stats.backward_calls
    trainer._stats.trained_samples = n
    return stats.summary(trainer.dist)


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
