"""The trained policy under DeepSpeed and the calls made on it: velocities with CFG, edge log-probs recomputed from
a rollout, and the micro-step that backpropagates one micro-batch (skipping non-finite losses in lockstep)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional

import deepspeed
import torch

from ..core.sde import cfg_combine, gaussian_log_prob, sde_mean_std
from ..models.wan import velocity
from ..parallel.collectives import any_rank
from ..parallel.groups import Dist
from .rollout import RolloutResult, edge_inputs


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


@dataclass
class EdgeLogProbs:
    """Inputs and outputs of :meth:`Policy.edge_log_probs` for a set of edges (tensors on the policy's device)."""

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


class Policy:
    """The DeepSpeed engine of the transformer with what training keeps beside it.

    policy_copy: a plain copy that rollouts run on (``rollout.gathered_weights``), refreshed from the engine;
    copies: full copies an objective keeps (DiffusionNFT's EMA); reference: the frozen KL reference (a loaded copy,
    or the LoRA policy with its adapter disabled), None without a KL term; sp: the sequence-parallel handle.
    """

    def __init__(self, cfg, dist: Dist, engine, optimizer, lr_scheduler, policy_copy, copies, reference, sp):
        self.cfg, self.dist = cfg, dist
        self.engine, self.optimizer, self.lr_scheduler = engine, optimizer, lr_scheduler
        self.policy_copy, self.copies, self.reference, self.sp = policy_copy, copies, reference, sp

    def rollout_module(self):
        """The module sampling runs on: the gathered copy (refreshed from the engine) or the ZeRO-3 module."""
        if self.policy_copy is None:
            return self.engine.module
        src = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(src, enabled=self.cfg.parallel.zero_stage == 3):
            with torch.no_grad():
                for a, b in zip(src, self.policy_copy.parameters()):
                    b.copy_(a.data.to(b.dtype))
        return self.policy_copy

    def model_fn(self, module):
        """``fn(x, t, emb) -> velocity`` on ``module``, inputs moved to the run's device."""
        dev = self.dist.device

        def fn(x, t, emb):
            return velocity(module, x.to(dev), t.to(dev), emb.to(dev))

        return fn

    def velocity_cfg(self, module, x, s, emb, negative):
        """Velocity at sigma ``s`` with the rollout's classifier-free guidance (one batched call for both halves)."""
        t = 1000.0 * s
        w = self.cfg.rollout.guidance_scale
        if w == 1.0:
            return velocity(module, x, t, emb)
        neg = negative.expand(emb.shape[0], *negative.shape).to(emb)
        out = velocity(module, torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, emb]))
        vu, vc = out.chunk(2)
        return cfg_combine(vu, vc, w)

    def edge_log_probs(self, module, res: RolloutResult, ids, inputs: Optional[EdgeLogProbs] = None) -> EdgeLogProbs:
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
        v = self.velocity_cfg(module, x, s, emb, res.negative)
        mean, std = sde_mean_std(res.spec.sde_form, x, v, s, s_next, eta, res.s_cap)
        logp = gaussian_log_prob(x_next, mean, std, reduce=self.cfg.objective.logprob_reduce)
        return EdgeLogProbs(inp, x, x_next, s, s_next, eta, emb, mean, std, logp)

    def micro_step(self, loss, zero_inputs, last: bool, update_skipped: bool) -> tuple:
        """Backpropagate one micro-batch's weighted loss and step the engine; ``last`` marks the mini-batch's last
        micro-batch, the gradient-accumulation boundary where the optimizer steps. Mini-batches may hold different
        numbers of micro-batches (a remainder), so the boundary is set here rather than counted by DeepSpeed, and
        the loss is not divided by DeepSpeed's accumulation steps: the caller weights it by its share.

        A non-finite loss on any rank skips that micro-batch's backward on every rank (agreed by an all-reduce, so
        ZeRO-3's collectives stay in step: a finite zero loss through the policy at ``zero_inputs`` (x, s, emb) is
        backpropagated instead) and the whole update's parameter change (the boundary step runs at learning rate 0).
        Returns (this micro-batch was skipped, the update is skipped).
        """
        bad = any_rank(self.dist, not bool(torch.isfinite(loss)))
        if bad:
            loss = self._zero_loss(*zero_inputs)
        self.engine.set_gradient_accumulation_boundary(bool(last))
        self.engine.backward(loss, scale_wrt_gas=False)
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
        zero = velocity(self.engine, torch.zeros_like(x), 1000.0 * s, emb).sum() * 0.0
        if not torch.isfinite(zero):
            raise FloatingPointError("the policy's weights are no longer finite; resume from the last checkpoint "
                                     "with a lower optim.lr")
        return zero
