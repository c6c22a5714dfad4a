"""The RL trainer: rollout trees, score leaves, assign credit, prune, and update the policy under DeepSpeed ZeRO-3.

One iteration reads like DESIGN.md's data flow (:meth:`Trainer.prepare_batch` and :meth:`Trainer.train_iteration`)::

    prompts -> rollout trees -> decode + reward leaves -> credit -> pruning -> objective over trained edges -> step

Every rank runs the same sequence of forward and backward calls: tree shapes, pruning counts and micro-batch counts
come from the configuration, and a lockstep check all-reduces the per-iteration call counts. Building the models
(:mod:`.setup`), the policy's calls (:mod:`.policy`), scoring (:mod:`.scoring`), the training phases (:mod:`.phases`),
evaluation, checkpoints and logging live in their own modules.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import Config
from ..config.specs import tree_spec
from ..core.credit import assign_credit
from ..core.objectives import get_objective, objective_info
from ..core.ovf import preview_pruner, survivor_edges
from ..core.pruning import select_trained_edges
from ..core.stats import paired_change
from ..data import iteration_prompts, tree_seed
from ..models.export import export_pipeline_dir
from ..models.lora import lora_scale
from ..parallel.collectives import all_mean, all_std
from ..parallel.groups import Dist, init_distributed
from ..parallel.lockstep import check_lockstep
from . import checkpoint as ckpt
from .dump import dump_tree
from .evaluation import heldout_scores, summarize
from .logging import RunLogger, archive_previous_run
from .phases import get_phase
from .preflight import check_inputs
from .rollout import RolloutResult, rollout
from .rundir import lock_run_dir
from .scoring import preview_scores, reward_weights, score_leaves, weighted_total
from .setup import build_models, build_policy


class NoValidRewards(RuntimeError):
    """Training stopped: no leaf had a valid reward for ``train.max_invalid_iterations`` iterations in a row."""


@dataclass
class IterationStats:
    """Per-iteration call counts of this rank (the lockstep check compares them across ranks)."""

    forward_passes: int = 0
    backward_calls: int = 0
    trained_edges: int = 0
    trained_samples: int = 0


@dataclass
class Batch:
    """One iteration's scored rollout with its credit: what the training phase consumes."""

    res: RolloutResult
    rewards: Dict[str, np.ndarray]  # reward name -> [N] node-length array (NaN off-leaf or on failure)
    weights: Dict[str, float]
    values: np.ndarray
    adv: np.ndarray
    trained: np.ndarray
    rollout_s: float
    reward_s: float  # decode + reward (credit and pruning are not included)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        # Every check that needs no weights first (inputs, then the run directory), so a bad input stops in seconds
        # and before the run directory changes.
        inputs = check_inputs(cfg)
        self.train_prompts, self.eval_prompts = inputs.train_prompts, inputs.eval_prompts

        self.dist: Dist = init_distributed(cfg.parallel.sp_size, cfg.parallel.backend, cfg.train.device,
                                           cfg.parallel.cpu_shm_allreduce, cfg.train.cpu_threads)
        self.lock = lock_run_dir(self.run_dir, self.dist)
        point = ckpt.resume_point(cfg, self.run_dir)
        if point is not None:
            try:
                ckpt.check_resumable(cfg, point, self.dist.world_size)
            except ckpt.ResumeError:
                self.lock.release()
                raise
        if self.dist.is_main:
            print(f"video_branch: inputs checked in {inputs.seconds:.2f} s; loading the models", flush=True)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        if self.dist.is_main and point is None:
            archive_previous_run(self.run_dir)
        self.dist.barrier()
        run = build_models(cfg, self.dist.device)
        self.models, self.encoder, self.reward, self.latent_shape = run.wan, run.encoder, run.reward, run.latent_shape
        self.weights = reward_weights(cfg.reward.components)
        self.objective = get_objective(cfg.objective.name)
        self.training_phase = get_phase(objective_info(cfg.objective.name).unit)
        self.n_micro = self.training_phase.micro_batches(self)
        self.policy = build_policy(cfg, run, self.dist, self.n_micro)
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard,
                                plot_every=cfg.logging.plot_every)
        self.start_iteration = 0
        if self.dist.is_main:
            d = self.dist
            print(f"video_branch: method {cfg.method}, world {d.world_size} = {d.dp_size} data-parallel x "
                  f"{d.sp_size} sequence-parallel (Ulysses {'on' if self.policy.sp.active else 'off'}), ZeRO stage "
                  f"{cfg.parallel.zero_stage}, {self.train_units} in {self.n_micro} micro-batches "
                  f"per update, device {d.device}", flush=True)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Dict[str, float]]:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        d.barrier()
        self._maybe_resume()
        results = {"before": self._evaluate_before()}
        bar = self._progress_bar()
        no_valid = 0  # iterations in a row in which no leaf on any rank had a valid reward
        for it in range(self.start_iteration, cfg.train.iterations):
            row = self.train_iteration(it, bar)
            self.logger.log(row)
            no_valid = no_valid + 1 if row["valid_leaves"] == 0 else 0
            if cfg.train.max_invalid_iterations and no_valid >= cfg.train.max_invalid_iterations:
                self.logger.plot()
                self.logger.close()
                raise NoValidRewards(
                    f"no leaf on any rank had a valid reward in iterations {it + 1 - no_valid}-{it} "
                    f"(train.max_invalid_iterations={cfg.train.max_invalid_iterations}): every reward call failed or "
                    "returned NaN, so nothing was learned (the warnings above name the reward and its error); fix "
                    "the reward, or set train.max_invalid_iterations: 0 to train on regardless")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", phase="done")
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.train.iterations:
                self.evaluate(it + 1, "during")
            if cfg.train.checkpoint_every and (it + 1) % cfg.train.checkpoint_every == 0:
                self._save_checkpoint(it + 1)
        if bar is not None:
            bar.close()
        if cfg.train.iterations > 0 and self.start_iteration < cfg.train.iterations:
            self._save_checkpoint(cfg.train.iterations)
        results["after"] = self.evaluate(cfg.train.iterations, "after")
        results["change"] = paired_change(results["before"], results["after"])
        self.export_final()
        self.logger.plot()
        self.logger.close()
        self.lock.release()
        if d.is_main:
            (self.run_dir / "eval_after.json").write_text(json.dumps({**results["after"],
                                                                      "change": results["change"]}, indent=1))
        return results

    def prepare_batch(self, it: int, phase=lambda p: None) -> Batch:
        """Roll out this rank's prompts of iteration ``it``, decode and score the leaves, assign credit and select
        the trained edges (counts fixed by the config)."""
        cfg, d = self.cfg, self.dist
        t0 = time.perf_counter()
        phase("rollout")
        prompt_ids = iteration_prompts(self.train_prompts, seed=cfg.train.seed, iteration=it, dp_rank=d.dp_rank,
                                       per_rank=cfg.train.prompts_per_rank)
        res = self._rollout(it, prompt_ids)
        self._stats.forward_passes = res.forward_passes
        t1 = time.perf_counter()
        phase("reward")
        rewards = score_leaves(res, self.models.vae, self.reward, d, reward_on=cfg.rollout.reward_on,
                               decode_batch=cfg.rollout.decode_batch)
        t2 = time.perf_counter()
        named = {k: rewards[k] for k in self.weights}  # the weighted components; sub-scores are logged only
        values, adv = assign_credit(res.tree, named, self.weights, cfg.credit,
                                    batch_std=lambda r: all_std(d, r))  # credit.std: global
        trained = select_trained_edges(res.tree, values, adv, cfg, it, np.random.default_rng([cfg.train.seed, it,
                                                                                               d.dp_rank, 0xED6E]))
        trained &= survivor_edges(res.tree, res.spec)
        self._stats.trained_edges = int(trained.sum())
        return Batch(res, rewards, self.weights, values, adv, trained, t1 - t0, t2 - t1)

    def train_iteration(self, it: int, bar=None) -> Dict[str, float]:
        self._stats = IterationStats()
        t0 = time.perf_counter()
        phase = (lambda p: bar.set_postfix(phase=p)) if bar is not None else (lambda p: None)
        b = self.prepare_batch(it, phase)  # rollout -> decode + reward -> credit -> prune
        t2 = t0 + b.rollout_s + b.reward_s  # credit and pruning count as training time, as they always have
        phase("train")
        train_stats = self.training_phase.train(self, it, b.res, b.adv, b.trained)  # update
        t3 = time.perf_counter()
        check_lockstep(it, {"forward passes": self._stats.forward_passes,
                            "backward calls": self._stats.backward_calls,
                            "trained edges": self._stats.trained_edges,
                            "trained samples": self._stats.trained_samples})
        if self.cfg.train.dump_trees:
            dump_tree(self.run_dir / "trees", it, self.dist.rank, b.res.tree, b.rewards, b.weights, b.values, b.adv,
                      b.trained)
        return self._metrics(it, b, train_stats, t0, t2, t3)

    # ------------------------------------------------------------------------------------------------ phases
    def _rollout(self, iteration: int, prompt_ids: List[int]) -> RolloutResult:
        cfg, d = self.cfg, self.dist
        prompts = [self.train_prompts[i] for i in prompt_ids]
        emb = self.encoder.encode(prompts)
        neg = self.encoder.encode([cfg.rollout.negative_prompt])[0] if cfg.rollout.guidance_scale != 1.0 else None
        spec = tree_spec(cfg, iteration)
        seeds = [tree_seed(cfg.train.seed, iteration, d.dp_rank, j) for j in range(len(prompts))]
        prune_fn = None
        if spec.survivors:
            prune_fn = preview_pruner(cfg.tree.prune_rule, spec, lambda trees, x0: preview_scores(
                [prompts[t] for t in trees], x0, self.models.vae, self.reward, d, self.weights,
                cfg.rollout.decode_batch))
        module = self.policy.rollout_module()
        module.eval()
        with torch.no_grad():
            res = rollout(spec, self.policy.model_fn(module), emb, latent_shape=self.latent_shape, seeds=seeds,
                          negative_embeds=neg, guidance_scale=cfg.rollout.guidance_scale,
                          frontier_batch=cfg.rollout.frontier_batch, store_on_cpu=cfg.rollout.store_on_cpu,
                          reward_on=cfg.rollout.reward_on, device=d.device,
                          logprob_reduce=cfg.objective.logprob_reduce, prune_fn=prune_fn)
        self.policy.engine.module.train()
        res.prompts = prompts
        res.spec = spec
        res.embeds, res.negative = emb, neg
        return res

    def _metrics(self, it: int, b: Batch, train_stats: Dict[str, float], t0: float, t2: float,
                 t3: float) -> Dict[str, float]:
        """The iteration's ``metrics.jsonl`` row: rewards and training statistics averaged over ranks, timings."""
        leaves = b.res.tree.leaves()
        total = weighted_total(b.weights, b.rewards, leaves)
        local = {"reward_mean": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
                 "invalid_leaves": float(np.sum(~np.isfinite(total))),
                 "valid_leaves": float(np.sum(np.isfinite(total)))}
        for k, v in b.rewards.items():
            vals = v[leaves]
            local[f"reward/{k}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        local.update({k: v for k, v in train_stats.items() if not isinstance(v, list)})
        row = {"iteration": it, **all_mean(self.dist, local)}
        row.update({k: v for k, v in train_stats.items() if isinstance(v, list)})  # per step, reduced by the phase
        for k in ("invalid_leaves", "valid_leaves"):  # sums over data-parallel members
            row[k] = row[k] * self.dist.dp_size
        row.update(rollout_s=b.rollout_s, reward_s=b.reward_s, train_s=t3 - t2, iter_s=time.perf_counter() - t0,
                   forward_passes=self._stats.forward_passes, trained_edges=self._stats.trained_edges,
                   trained_samples=self._stats.trained_samples, lr=float(self.policy.engine.get_lr()[0]))
        return row

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, iteration: int, name: str, transformer=None) -> Dict[str, float]:
        """Held-out reward of ODE samples (eval.num_steps, fixed seeds): mean and 95% CI per reward term, and the
        per-clip scores. ``transformer``: sample from this module instead of the policy."""
        module = transformer if transformer is not None else self.policy.rollout_module()
        scores = heldout_scores(self.cfg, self.dist, self.eval_prompts, self.models, self.encoder, module,
                                self.reward)
        summary = summarize(scores)
        self.logger.log_eval(name, iteration, summary)
        self.logger.plot()
        return summary

    def _evaluate_before(self) -> Dict[str, float]:
        before = self.run_dir / "eval_before.json"
        if self.start_iteration > 0 and before.is_file():
            return json.loads(before.read_text())
        summary = self.evaluate(self.start_iteration, "before")
        if self.dist.is_main:
            before.write_text(json.dumps(summary, indent=1))
        return summary

    # ------------------------------------------------------------------------------------------------ I/O
    def _progress_bar(self):
        if not (self.dist.is_main and self.cfg.logging.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.iterations, initial=self.start_iteration, desc="train", unit="it",
                    dynamic_ncols=True)

    def _save_checkpoint(self, iteration: int) -> None:
        ckpt.save(self.policy.engine, self.run_dir / "checkpoints", iteration, {"iteration": iteration},
                  self.dist.rank, keep=self.cfg.train.keep_checkpoints, copies=self.policy.copies)

    def _maybe_resume(self) -> None:
        point = ckpt.resume_point(self.cfg, self.run_dir)
        if point is None:
            return
        ckpt_dir, tag = point
        state = ckpt.load(self.policy.engine, ckpt_dir, tag, self.dist.rank, copies=self.policy.copies)
        self.start_iteration = int(state.get("iteration", 0))
        self.logger.truncate_after(self.start_iteration - 1)
        if self.dist.is_main:
            print(f"resumed from {ckpt_dir / tag} at iteration {self.start_iteration}", flush=True)

    def export_final(self) -> Optional[Path]:
        """Write ``final/``: the model directory with the trained transformer, loadable by WanPipeline."""
        lora = self.cfg.model.lora
        if self.cfg.parallel.zero_stage == 3:
            # Evaluation ran on the ZeRO-3 module (rollout.gathered_weights: false): wait for its prefetched
            # parameters and release them, or gathering them for the export fails with "a param in flight".
            self.policy.engine.empty_partition_cache()
        return export_pipeline_dir(self.policy.engine.module, self.cfg.model.path, self.run_dir / "final",
                                   is_main=self.dist.is_main, zero3=self.cfg.parallel.zero_stage == 3,
                                   lora_scale=lora_scale(lora) if lora.rank > 0 else 0.0)
