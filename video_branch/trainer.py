"""The RL trainer: rollout trees, score leaves, assign credit, prune, and update the policy under DeepSpeed ZeRO-3.

One iteration reads like DESIGN.md's data flow::

    prompts -> rollout trees -> decode + reward leaves -> credit -> pruning -> objective over trained edges -> step

Every rank runs the same sequence of forward and backward calls: tree shapes, pruning counts and micro-batch counts
come from the configuration, and a lockstep check all-reduces the per-iteration call counts.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config
from .credit import assign_credit, leaf_vector
from .data import iteration_prompts, read_prompts, tree_seed
from .logging import RunLogger, archive_previous_run
from .objectives import get_objective, objective_info
from .ovf import preview_pruner, survivor_edges
from .parallel.groups import Dist, init_distributed
from .phases import UpdateStats, get_phase, register_phase
from .pruning import select_trained_edges
from .rollout import RolloutResult, edge_inputs, rollout
from .sde import gaussian_log_prob, sde_mean_std
from .tree import TreeSpec, build_structure


@contextmanager
def _zero_lr(optimizer):
    """Step with learning rate 0: AdamW then leaves every parameter as it is (weight decay included)."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            if g["lr"] == 0.0:  # a scheduler that stepped has already set the next rate
                g["lr"] = lr


class LockstepError(RuntimeError):
    """Ranks disagree on the number of forward/backward calls of an iteration (ZeRO-3 would deadlock)."""


def check_lockstep(iteration: int, counts: Dict[str, int]) -> None:
    """All-reduce per-iteration call counts; raise LockstepError on every rank if any two ranks differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        diff = ", ".join(f"{k}: {int(a)}..{int(b)}" for k, a, b in zip(counts, lo.tolist(), hi.tolist()) if a != b)
        raise LockstepError(f"iteration {iteration}: ranks ran different numbers of calls ({diff}); under ZeRO-3 "
                            "this deadlocks. Tree shapes, pruning counts and micro-batches must come from the config "
                            "alone")


@dataclass
class IterationStats:
    forward_passes: int = 0
    backward_calls: int = 0
    trained_edges: int = 0
    trained_samples: int = 0


@dataclass
class EdgeLogProbs:
    """Inputs and outputs of :meth:`Trainer.edge_log_probs` for a set of edges (tensors on the trainer's device)."""

    inputs: Dict[str, torch.Tensor]
    x: torch.Tensor
    x_next: torch.Tensor
    s: torch.Tensor
    s_next: torch.Tensor
    eta: torch.Tensor
    emb: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    logp: torch.Tensor


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


def resume_point(cfg: Config, run_dir: Path) -> Optional[tuple[Path, str]]:
    """(checkpoint directory, tag) that this run continues from, or None for a fresh start (decided from the config
    and the run directory alone): ``never``; ``auto`` without a complete checkpoint; else the given path."""
    resume = cfg.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        tag = ckpt.latest_tag(Path(run_dir) / "checkpoints")
        return None if tag is None else (Path(run_dir) / "checkpoints", tag)
    p = Path(resume)
    return p.parent, p.name


def latent_shape(cfg: Config, vae) -> tuple:
    """[C, F', h, w] of the latents of a clip, from the VAE's compression factors."""
    from .sampling import latent_shape_for

    return latent_shape_for(vae, cfg.video.num_frames, cfg.video.height, cfg.video.width)


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (ignoring NaN)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(1.96 * x.std(ddof=1) / math.sqrt(x.size))


def paired_change(before: Dict, after: Dict) -> Dict[str, float]:
    """Per reward term: mean after - before over the same clips (same prompts and seeds) and its 95% CI half-width."""
    out = {}
    for k, b in before.get("per_clip", {}).items():
        a = after.get("per_clip", {}).get(k)
        if a is None or len(a) != len(b):
            continue
        m, ci = mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        out[k], out[k + "_ci95"] = m, ci
    return out


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        # Cheap checks of every input first, so a bad prompt file or model directory stops before any work.
        self.train_prompts = read_prompts(cfg.train.prompt_file, key="train.prompt_file")
        self.eval_prompts = read_prompts(cfg.eval.prompt_file, key="eval.prompt_file")
        if cfg.eval.num_prompts:
            self.eval_prompts = self.eval_prompts[: cfg.eval.num_prompts]
        from .models.wan import read_model_index

        read_model_index(cfg.model.path)

        self.dist: Dist = init_distributed(cfg.parallel.sp_size, cfg.parallel.backend, cfg.train.device,
                                                cfg.parallel.cpu_shm_allreduce, cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        if self.dist.is_main and resume_point(cfg, self.run_dir) is None:
            archive_previous_run(self.run_dir)
        self.dist.barrier()
        self._build_models()
        self._build_engine()
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard,
                                plot_every=cfg.logging.plot_every)
        self.start_iteration = 0
        if self.dist.is_main:
            d = self.dist
            print(f"video_branch: method {cfg.method}, world {d.world_size} = {d.dp_size} data-parallel x "
                  f"{d.sp_size} sequence-parallel (Ulysses {'on' if self.sp.active else 'off'}), ZeRO stage "
                  f"{cfg.parallel.zero_stage}, {self.train_units} in {self.n_micro} micro-batches "
                  f"per update, device {d.device}", flush=True)

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_models(self) -> None:
        from reward_models.compose import build_from_config

        from .models.text import PromptEncoder
        from .models.wan import load_wan

        cfg, dev = self.cfg, self.dist.device
        m = load_wan(cfg.model.path, dtype=cfg.model.dtype, attention_backend=cfg.model.attention_backend,
                     gradient_checkpointing=cfg.model.gradient_checkpointing, device=dev)
        if cfg.model.text_pad_to:
            from .models.text_padding import enable_padded_text

            enable_padded_text(m.transformer, cfg.model.text_pad_to)
        if cfg.model.lora.rank > 0:
            from .models.lora import apply_lora

            m.transformer = apply_lora(m.transformer, cfg.model.lora)
        self.models = m
        self.encoder = PromptEncoder(m.text_encoder, m.tokenizer, max_sequence_length=cfg.model.max_sequence_length,
                                     device=dev)
        self.reward = build_from_config(cfg.reward.components, retries=cfg.reward.retries)
        self.latent_shape = latent_shape(cfg, m.vae)
        self.reference = None
        # The frozen reference of the KL term, for objectives that have one (V-GRPO's KL is to the old policy).
        self.needs_reference = cfg.objective.kl_coef > 0 and objective_info(cfg.objective.name).reference
        if self.needs_reference and cfg.model.lora.rank == 0:  # with LoRA: the disabled adapter, see below
            ref = load_wan(cfg.model.path, dtype=cfg.model.dtype, attention_backend=cfg.model.attention_backend,
                           device=dev, components=("transformer",)).transformer
            if cfg.model.text_pad_to:
                enable_padded_text(ref, cfg.model.text_pad_to)
            self.reference = ref.requires_grad_(False).eval()

    def _micro_batches_per_update(self) -> int:
        """Trained edges per rank and update, from the config alone (the same on every rank)."""
        spec = TreeSpec.from_config(self.cfg, 0)
        tree = build_structure(spec, self.cfg.train.prompts_per_rank)
        rng = np.random.default_rng(0)
        vals = rng.standard_normal(tree.num_nodes)
        mask = select_trained_edges(tree, vals, vals, self.cfg, 0, np.random.default_rng(0))
        mask &= survivor_edges(tree, spec)
        self.edges_per_iteration = int(mask.sum())
        self.train_units = f"{self.edges_per_iteration} trained edges"
        return max(1, math.ceil(self.edges_per_iteration / self.cfg.optim.micro_batch))

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        ds_config = json.loads(Path(cfg.parallel.ds_config).read_text())
        self.objective = get_objective(cfg.objective.name)
        info = objective_info(cfg.objective.name)
        self.training_phase = get_phase(info.unit)
        self.n_micro = self.training_phase.micro_batches(self)
        ds_config["train_micro_batch_size_per_gpu"] = 1
        ds_config["gradient_accumulation_steps"] = self.n_micro
        ds_config["train_batch_size"] = self.n_micro * self.dist.world_size
        ds_config["gradient_clipping"] = cfg.optim.grad_clip
        ds_config.setdefault("zero_optimization", {})["stage"] = cfg.parallel.zero_stage
        if cfg.model.dtype == "bfloat16":
            ds_config["bf16"] = {"enabled": True}
        model = self.models.transformer
        model.train()
        self.policy_copy = None
        if cfg.rollout.gathered_weights:
            self.policy_copy = copy.deepcopy(model).requires_grad_(False).eval()
        # Full copies an objective keeps (DiffusionNFT's EMA old policy), taken before ZeRO-3 partitions the weights.
        self.copies = {name: copy.deepcopy(model).requires_grad_(False).eval() for name in info.copies}
        params = [p for p in model.parameters() if p.requires_grad]
        # A torch optimizer object: DeepSpeed's own AdamW would JIT-compile FusedAdam (minutes on CPU).
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay)
        warm = cfg.optim.warmup_iterations * cfg.optim.updates_per_iteration
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=sched, config=ds_config,
            dist_init_required=False,
        )
        # Sequence parallelism goes on after every deepcopy of the transformer (its hooks hold process groups).
        from .parallel.ulysses import enable_sequence_parallel

        self.sp = enable_sequence_parallel(self.engine.module, self.dist.sp_group)
        for extra in (self.policy_copy, self.reference, *self.copies.values()):
            if extra is not None:
                enable_sequence_parallel(extra, self.dist.sp_group)
        if self.needs_reference and self.reference is None:
            from .models.lora import AdapterDisabled

            self.reference = AdapterDisabled(self.engine.module)  # the frozen base weights, no second copy

    # ------------------------------------------------------------------------------------------------ policy calls
    def rollout_module(self):
        """The module sampling runs on: the gathered copy (refreshed from the engine) or the ZeRO-3 module."""
        if self.policy_copy is None:
            return self.engine.module
        import deepspeed

        src = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(src, enabled=self.cfg.parallel.zero_stage == 3):
            with torch.no_grad():
                for a, b in zip(src, self.policy_copy.parameters()):
                    b.copy_(a.data.to(b.dtype))
        return self.policy_copy

    def _model_fn(self, module):
        from .models.wan import velocity

        def fn(x, t, emb):
            return velocity(module, x.to(self.dist.device), t.to(self.dist.device), emb.to(self.dist.device))

        return fn

    def _embeddings(self, prompts: List[str]):
        emb = self.encoder.encode(prompts)
        neg = None
        if self.cfg.rollout.guidance_scale != 1.0:
            neg = self.encoder.encode([self.cfg.rollout.negative_prompt])[0]
        return emb, neg

    # ------------------------------------------------------------------------------------------------ phases
    def _rollout(self, iteration: int, prompt_ids: List[int]) -> RolloutResult:
        cfg = self.cfg
        prompts = [self.train_prompts[i] for i in prompt_ids]
        emb, neg = self._embeddings(prompts)
        spec = TreeSpec.from_config(cfg, iteration)
        seeds = [tree_seed(cfg.train.seed, iteration, self.dist.dp_rank, j) for j in range(len(prompts))]
        module = self.rollout_module()
        module.eval()
        with torch.no_grad():
            res = rollout(spec, self._model_fn(module), emb, latent_shape=self.latent_shape, seeds=seeds,
                          negative_embeds=neg, guidance_scale=cfg.rollout.guidance_scale,
                          frontier_batch=cfg.rollout.frontier_batch, store_on_cpu=cfg.rollout.store_on_cpu,
                          reward_on=cfg.rollout.reward_on, device=self.dist.device,
                          logprob_reduce=cfg.objective.logprob_reduce,
                          prune_fn=preview_pruner(cfg.tree.prune_rule, spec, lambda trees, x0: self._preview_scores(
                              [prompts[t] for t in trees], x0)) if spec.survivors else None)
        self.engine.module.train()
        res.prompts = prompts
        res.spec = spec
        res.embeds, res.negative = emb, neg
        return res

    def _preview_scores(self, prompts: List[str], x0_hat: torch.Tensor) -> np.ndarray:
        """Weighted reward of decoded one-step previews (Expand-and-Prune); a failed sample scores NaN."""
        from .models.vae import decode_to_frames

        with torch.no_grad():
            frames = decode_to_frames(self.models.vae, x0_hat.to(self.dist.device),
                                      batch_size=self.cfg.rollout.decode_batch).cpu()
        scores = self._sp_shared(lambda: {k: v.detach().cpu() for k, v in self.reward(frames, prompts).items()})
        total = np.zeros(len(prompts))
        for k, opts in self.cfg.reward.components.items():
            total = total + float(opts.get("weight", 1.0)) * scores[k].double().numpy()
        return np.where(np.isfinite(total), total, np.nan)

    def _score(self, res: RolloutResult) -> Dict[str, np.ndarray]:
        """Decode the leaves and score them: {reward name: [N] node-length array, NaN off-leaf or on failure}."""
        from .models.vae import decode_to_frames

        tree = res.tree
        leaves = tree.leaves()
        lat = res.leaf_x0_hat if self.cfg.rollout.reward_on == "x0_hat" else res.leaf_latents
        with torch.no_grad():
            frames = decode_to_frames(self.models.vae, lat.to(self.dist.device),
                                      batch_size=self.cfg.rollout.decode_batch).cpu()
        prompts = [res.prompts[t] for t in tree.tree[leaves]]
        scores = self._sp_shared(lambda: {k: v.detach().cpu() for k, v in self.reward(frames, prompts).items()})
        res.frames = frames
        out = {}
        for k, v in scores.items():
            v = v.detach().cpu().double().numpy()
            if np.isinf(v).any():  # an infinite score is a failed sample, never a value to train on
                warnings.warn(f"reward '{k}' returned infinite scores for {int(np.isinf(v).sum())} sample(s); "
                              "they are treated as invalid (NaN)")
                v = np.where(np.isinf(v), np.nan, v)
            out[k] = leaf_vector(tree, leaves, v)
        return out

    def _train(self, iteration: int, res: RolloutResult, adv: np.ndarray, trained: np.ndarray) -> Dict[str, float]:
        cfg = self.cfg
        edges = np.nonzero(trained)[0]
        if edges.size != self.edges_per_iteration:
            raise LockstepError(f"iteration {iteration}: {edges.size} trained edges on rank {self.dist.rank}, "
                                f"expected {self.edges_per_iteration} from the config")
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + iteration)
        stats = UpdateStats()
        old_means: Dict[int, torch.Tensor] = {}
        for update in range(cfg.optim.updates_per_iteration):
            order = edges[torch.randperm(edges.size, generator=gen).numpy()] if update else edges
            chunks = np.array_split(order, self.n_micro)
            update_skipped = False
            for mb, ids in enumerate(chunks):
                e = self.edge_log_probs(self.engine, res, ids)
                x, s, emb, mean, std, logp = e.x, e.s, e.emb, e.mean, e.std, e.logp
                logp_old = e.inputs["logp_old"].to(logp)
                mean_ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        mean_ref = self.edge_log_probs(self.reference, res, ids, inputs=e).mean
                mean_old = None
                if cfg.objective.ratio_norm:
                    # The first update runs on the rollout's weights (DeepSpeed steps at the accumulation boundary),
                    # so its means are the old policy's; later updates reuse them.
                    if update == 0:
                        for edge_id, m_old in zip(ids.tolist(), mean.detach().cpu()):
                            old_means[edge_id] = m_old
                    mean_old = torch.stack([old_means[i] for i in ids.tolist()]).to(mean)
                out = self.objective(logp, logp_old, torch.as_tensor(adv[ids], dtype=torch.float32,
                                                                     device=self.dist.device),
                                     clip_eps=cfg.objective.clip_eps, kl_coef=cfg.objective.kl_coef,
                                     mean_new=mean, mean_old=mean_old, mean_ref=mean_ref,
                                     std=std.expand(len(ids), *([1] * (x.dim() - 1))),
                                     ratio_norm=cfg.objective.ratio_norm)
                stats.ratio(out.ratio, first=update == 0 and mb == 0)
                # Weight each micro-batch by its share of edges; DeepSpeed divides by the accumulation steps.
                # SP ranks hold token shards of the same samples: DeepSpeed's mean over all ranks times sp_size is
                # the mean over data-parallel members of the full gradient.
                loss = out.loss * (len(ids) * self.n_micro / edges.size) * self.sp.loss_scale
                last = mb == len(chunks) - 1
                bad, update_skipped = self.micro_step(loss, (x[:1], s[:1], emb[:1]), last, update_skipped)
                stats.micro(out, bad, last, update_skipped)
            stats.end_update(self.engine)
        self._stats.backward_calls += stats.backward_calls
        return stats.summary()

    def edge_log_probs(self, module, res: RolloutResult, ids,
                       inputs: Optional["EdgeLogProbs"] = None) -> "EdgeLogProbs":
        """Transition log-probs of the SDE edges ``ids`` under ``module`` (the engine, a reference or a plain copy),
        recomputed from the rollout's stored parent/child latents by the path the rollout used. ``inputs``: reuse
        the tensors of an earlier call on the same edges."""
        if inputs is None:
            inp = edge_inputs(res, ids)
            dev = self.dist.device
            x, x_next = inp["parent_latent"].to(dev), inp["child_latent"].to(dev)
            s, s_next, eta = inp["s"].to(dev), inp["s_next"].to(dev), inp["eta"].to(dev)
            emb = res.embeds[torch.as_tensor(inp["tree_index"])].to(dev)
        else:
            inp, x, x_next, s, s_next, eta, emb = (inputs.inputs, inputs.x, inputs.x_next, inputs.s, inputs.s_next,
                                                   inputs.eta, inputs.emb)
        v = self._velocity_cfg(module, x, s, emb, res.negative)
        mean, std = sde_mean_std(res.spec.sde_form, x, v, s, s_next, eta, res.s_cap)
        logp = gaussian_log_prob(x_next, mean, std, reduce=self.cfg.objective.logprob_reduce)
        return EdgeLogProbs(inp, x, x_next, s, s_next, eta, emb, mean, std, logp)

    def micro_step(self, loss, zero_inputs, last: bool, update_skipped: bool) -> tuple:
        """Backpropagate one micro-batch's weighted loss and step the engine (it updates at the boundary).

        A non-finite loss on any rank skips that micro-batch's backward on every rank (agreed by an all-reduce, so
        ZeRO-3's collectives stay in step: a finite zero loss through the policy at ``zero_inputs`` (x, s, emb) is
        backpropagated instead) and the whole update's parameter change (the boundary step runs at learning rate 0).
        Returns (this micro-batch was skipped, the update is skipped).
        """
        bad = self._any_rank(not bool(torch.isfinite(loss)))
        if bad:
            loss = self._zero_loss(*zero_inputs)
        self.engine.backward(loss)
        update_skipped = update_skipped or bad
        if last and update_skipped:
            with _zero_lr(self.optimizer):
                self.engine.step()
        else:
            self.engine.step()
        return bad, update_skipped

    def _zero_loss(self, x, s, emb) -> torch.Tensor:
        """A finite zero loss through the policy, backpropagated in place of a non-finite one: ZeRO-3 needs a
        backward on every rank, and gradients of a NaN graph would poison the optimizer state."""
        from .models.wan import velocity

        zero = velocity(self.engine, torch.zeros_like(x), 1000.0 * s, emb).sum() * 0.0
        if not torch.isfinite(zero):
            raise FloatingPointError("the policy's weights are no longer finite; resume from the last checkpoint "
                                     "with a lower optim.lr")
        return zero

    def _any_rank(self, flag: bool) -> bool:
        if self.dist.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _velocity_cfg(self, module, x, s, emb, negative):
        from .models.wan import velocity
        from .sde import cfg_combine

        t = 1000.0 * s
        w = self.cfg.rollout.guidance_scale
        if w == 1.0:
            return velocity(module, x, t, emb)
        neg = negative.expand(emb.shape[0], *negative.shape).to(emb)
        out = velocity(module, torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, emb]))
        vu, vc = out.chunk(2)
        return cfg_combine(vu, vc, w)

    def _sp_shared(self, fn):
        """Run ``fn`` on the first rank of the sequence-parallel group and share its result with the group
        (the ranks of a group hold identical samples, so rewards are computed once)."""
        d = self.dist
        if d.sp_size == 1:
            return fn()
        box = [fn() if d.sp_rank == 0 else None]
        dist.broadcast_object_list(box, src=d.rank - d.sp_rank, group=d.sp_group)
        return box[0]

    # ------------------------------------------------------------------------------------------------ lockstep
    def _check_lockstep(self, iteration: int) -> None:
        check_lockstep(iteration, {"forward passes": self._stats.forward_passes,
                                   "backward calls": self._stats.backward_calls,
                                   "trained edges": self._stats.trained_edges,
                                   "trained samples": self._stats.trained_samples})

    def _all_mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """Average over ranks (NaN-aware: a rank with no valid value does not count)."""
        if self.dist.world_size == 1:
            return values
        keys = sorted(values)
        v = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        ok = torch.isfinite(v).double()
        s = torch.stack([torch.nan_to_num(v) * ok, ok])
        dist.all_reduce(s)
        return {k: float(s[0, i] / s[1, i]) if s[1, i] > 0 else float("nan") for i, k in enumerate(keys)}

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, iteration: int, name: str) -> Dict[str, float]:
        """Held-out reward of ODE samples (eval.num_steps, fixed seeds): mean and 95% CI per reward term."""
        from .evaluation import heldout_scores

        scores = heldout_scores(self, iteration)
        summary = {}
        for k, v in scores.items():
            m, ci = mean_ci(v)
            summary[k], summary[k + "_ci95"] = m, ci
        summary["n"] = int(len(next(iter(scores.values()))))
        # Per-clip scores in a fixed order (same seeds every evaluation), for paired before/after differences.
        summary["per_clip"] = {k: [float(x) for x in np.asarray(v, dtype=np.float64)] for k, v in scores.items()}
        self.logger.log_eval(name, iteration, summary)
        return summary

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Dict[str, float]]:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        d.barrier()
        self._maybe_resume()
        results = {}
        if self.start_iteration == 0 or not (self.run_dir / "eval_before.json").is_file():
            results["before"] = self.evaluate(self.start_iteration, "before")
            if d.is_main:
                (self.run_dir / "eval_before.json").write_text(json.dumps(results["before"], indent=1))
        else:
            results["before"] = json.loads((self.run_dir / "eval_before.json").read_text())
        bar = None
        if d.is_main and cfg.logging.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.iterations, initial=self.start_iteration, desc="train", unit="it",
                       dynamic_ncols=True)
        for it in range(self.start_iteration, cfg.train.iterations):
            row = self.train_iteration(it, bar)
            self.logger.log(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", phase="done")
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.train.iterations:
                self.evaluate(it + 1, "during")
            if cfg.train.checkpoint_every and (it + 1) % cfg.train.checkpoint_every == 0:
                ckpt.save(self.engine, self.run_dir / "checkpoints", it + 1, {"iteration": it + 1},
                          d.rank, keep=cfg.train.keep_checkpoints, copies=self.copies)
        if bar is not None:
            bar.close()
        if cfg.train.iterations > 0 and self.start_iteration < cfg.train.iterations:
            ckpt.save(self.engine, self.run_dir / "checkpoints", cfg.train.iterations,
                      {"iteration": cfg.train.iterations}, d.rank, keep=cfg.train.keep_checkpoints, copies=self.copies)
        results["after"] = self.evaluate(cfg.train.iterations, "after")
        results["change"] = paired_change(results["before"], results["after"])
        self.export_final()
        self.logger.plot()
        self.logger.close()
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
        rewards = self._score(res)
        t2 = time.perf_counter()
        weights = {k: float(v.get("weight", 1.0)) for k, v in cfg.reward.components.items()}
        named = {k: rewards[k] for k in weights}  # the weighted components; sub-scores are logged only
        values, adv = assign_credit(res.tree, named, weights, cfg.credit)
        trained = select_trained_edges(res.tree, values, adv, cfg, it, np.random.default_rng([cfg.train.seed, it,
                                                                                               d.dp_rank, 0xED6E]))
        trained &= survivor_edges(res.tree, res.spec)
        self._stats.trained_edges = int(trained.sum())
        return Batch(res, rewards, weights, values, adv, trained, t1 - t0, t2 - t1)

    def train_iteration(self, it: int, bar=None) -> Dict[str, float]:
        cfg, d = self.cfg, self.dist
        self._stats = IterationStats()
        t0 = time.perf_counter()
        phase = (lambda p: bar.set_postfix(phase=p)) if bar is not None else (lambda p: None)
        b = self.prepare_batch(it, phase)
        res, rewards, values, adv, trained, weights = b.res, b.rewards, b.values, b.adv, b.trained, b.weights
        t2 = t0 + b.rollout_s + b.reward_s  # credit and pruning count as training time, as they always have
        phase("train")
        train_stats = self.training_phase.train(self, it, res, adv, trained)
        t3 = time.perf_counter()
        self._check_lockstep(it)
        if cfg.train.dump_trees:
            self._dump_tree(it, res, rewards, values, adv, trained)
        leaves = res.tree.leaves()
        total = sum(weights[k] * rewards[k][leaves] for k in weights)
        local = {"reward_mean": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
                 "invalid_leaves": float(np.sum(~np.isfinite(total)))}
        for k, v in rewards.items():
            vals = v[leaves]
            local[f"reward/{k}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        local.update(train_stats)
        row = {"iteration": it, **self._all_mean(local)}
        row["invalid_leaves"] = row["invalid_leaves"] * d.dp_size  # a sum over data-parallel members, not a mean
        row.update(rollout_s=b.rollout_s, reward_s=b.reward_s, train_s=t3 - t2, iter_s=time.perf_counter() - t0,
                   forward_passes=self._stats.forward_passes, trained_edges=self._stats.trained_edges,
                   trained_samples=self._stats.trained_samples,
                   lr=float(self.engine.get_lr()[0]))
        return row

    # ------------------------------------------------------------------------------------------------ I/O
    def _dump_tree(self, it, res, rewards, values, adv, trained) -> None:
        out = self.run_dir / "trees"
        out.mkdir(parents=True, exist_ok=True)
        t = res.tree
        weights = {k: float(v.get("weight", 1.0)) for k, v in self.cfg.reward.components.items()}
        leaf_reward = sum(weights[k] * rewards[k] for k in weights)
        np.savez(out / f"iter_{it:06d}_rank{self.dist.rank}.npz", tree=t.tree, parent=t.parent, depth=t.depth,
                 step=t.step, sde=t.sde, logp=t.logp, leaf_reward=leaf_reward.astype(np.float32),
                 value=values.astype(np.float32), advantage=adv.astype(np.float32), trained=trained,
                 **{f"reward/{k}": v.astype(np.float32) for k, v in rewards.items()})

    def _maybe_resume(self) -> None:
        point = resume_point(self.cfg, self.run_dir)
        if point is None:
            return
        ckpt_dir, tag = point
        if not (ckpt_dir / tag).is_dir():
            raise FileNotFoundError(f"train.resume: checkpoint directory not found: {ckpt_dir / tag}")
        state = ckpt.load(self.engine, ckpt_dir, tag, self.dist.rank, copies=self.copies)
        self.start_iteration = int(state.get("iteration", 0))
        self.logger.truncate_after(self.start_iteration - 1)
        if self.dist.is_main:
            print(f"resumed from {ckpt_dir / tag} at iteration {self.start_iteration}", flush=True)

    def export_final(self) -> Optional[Path]:
        """Write ``final/``: the model directory with the trained transformer, loadable by WanPipeline."""
        from .models.export import export_pipeline_dir

        return export_pipeline_dir(self, self.run_dir / "final")


register_phase("edges", Trainer._micro_batches_per_update, Trainer._train)
