"""Building a run: the frozen models (text encoder, VAE, reward, reference) and the policy under DeepSpeed."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from reward_models.compose import build_from_config

from ..config.specs import optimizer_steps_before
from ..core.lr import lr_multiplier
from ..core.objectives import objective_info
from ..models.lora import AdapterDisabled, apply_lora
from ..models.text import PromptEncoder
from ..models.text_padding import enable_padded_text
from ..models.wan import WanComponents, load_wan
from ..parallel.groups import Dist
from ..parallel.ulysses import enable_sequence_parallel
from .policy import Policy
from .sampling import latent_shape_for

# DeepSpeed's ZeRO-3 calls torch's renamed collectives once per gathered parameter; torch re-warns after every
# warnings.catch_warnings, which floods a run's log with one FutureWarning per collective.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                        r"deprecated", category=FutureWarning)


@dataclass
class RunModels:
    """What a run loads besides the trained policy."""

    wan: WanComponents  # transformer (the policy before DeepSpeed), VAE, text encoder, tokenizer
    encoder: PromptEncoder
    reward: object  # reward_models' composed reward: rm(frames, prompts) -> {name: [B]}
    latent_shape: tuple  # [C, F', h, w] of one clip's latents
    reference: torch.nn.Module | None  # the loaded KL reference (full fine-tuning with a KL term), else None
    needs_reference: bool  # the objective pulls towards a frozen reference (objective.kl_coef > 0)


def build_models(cfg, device) -> RunModels:
    wan = load_wan(cfg.model.path, dtype=cfg.model.dtype, attention_backend=cfg.model.attention_backend,
                   gradient_checkpointing=cfg.model.gradient_checkpointing, device=device)
    if cfg.model.text_pad_to:
        enable_padded_text(wan.transformer, cfg.model.text_pad_to)
    if cfg.model.lora.rank > 0:
        wan.transformer = apply_lora(wan.transformer, cfg.model.lora)
    encoder = PromptEncoder(wan.text_encoder, wan.tokenizer, max_sequence_length=cfg.model.max_sequence_length,
                            device=device)
    reward = build_from_config(cfg.reward.components, retries=cfg.reward.retries)
    shape = latent_shape_for(wan.vae, cfg.video.num_frames, cfg.video.height, cfg.video.width)
    reference = None
    # The frozen reference of the KL term, for objectives that have one (V-GRPO's KL is to the old policy).
    needs_reference = cfg.objective.kl_coef > 0 and objective_info(cfg.objective.name).reference
    # With LoRA the reference is by default the disabled adapter (see build_policy); objective.kl_reference=copy
    # loads the base transformer as for full fine-tuning.
    if needs_reference and (cfg.model.lora.rank == 0 or cfg.objective.kl_reference == "copy"):
        ref = load_wan(cfg.model.path, dtype=cfg.model.dtype, attention_backend=cfg.model.attention_backend,
                       device=device, components=("transformer",)).transformer
        if cfg.model.text_pad_to:
            enable_padded_text(ref, cfg.model.text_pad_to)
        reference = ref.requires_grad_(False).eval()
    return RunModels(wan, encoder, reward, shape, reference, needs_reference)


def lr_lambda(cfg):
    """The learning-rate multiplier per optimizer step: warm-up over the steps of ``optim.warmup_iterations``
    iterations, then ``optim.lr_decay`` over the steps of the rest of ``train.iterations``."""
    o = cfg.optim
    warm = optimizer_steps_before(cfg, o.warmup_iterations)
    total = optimizer_steps_before(cfg, cfg.train.iterations) if o.lr_decay != "constant" else warm
    return lambda step: lr_multiplier(step, warm, total, o.lr_decay, o.lr_final_ratio)


def build_policy(cfg, models: RunModels, d: Dist, n_micro: int) -> Policy:
    """The transformer under DeepSpeed (``n_micro`` micro-batches accumulated per update), with the copies the run
    keeps: the gathered rollout copy, the objective's copies (taken before ZeRO-3 partitions the weights)."""
    ds_config = json.loads(Path(cfg.parallel.ds_config).read_text())
    info = objective_info(cfg.objective.name)
    ds_config["train_micro_batch_size_per_gpu"] = 1
    ds_config["gradient_accumulation_steps"] = n_micro
    ds_config["train_batch_size"] = n_micro * d.world_size
    ds_config["gradient_clipping"] = cfg.optim.grad_clip
    ds_config.setdefault("zero_optimization", {})["stage"] = cfg.parallel.zero_stage
    if cfg.model.dtype == "bfloat16":
        ds_config["bf16"] = {"enabled": True}
    model = models.wan.transformer
    model.train()
    policy_copy = None
    if cfg.rollout.gathered_weights:
        policy_copy = copy.deepcopy(model).requires_grad_(False).eval()
    copies = {name: copy.deepcopy(model).requires_grad_(False).eval() for name in info.copies}
    params = [p for p in model.parameters() if p.requires_grad]
    # A torch optimizer object: DeepSpeed's own AdamW would JIT-compile FusedAdam (minutes on CPU).
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))  # DeepSpeed steps it after every step
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                                              config=ds_config, dist_init_required=False)
    # Sequence parallelism goes on after every deepcopy of the transformer (its hooks hold process groups).
    sp = enable_sequence_parallel(engine.module, d.sp_group)
    reference = models.reference
    for extra in (policy_copy, reference, *copies.values()):
        if extra is not None:
            enable_sequence_parallel(extra, d.sp_group)
    if models.needs_reference and reference is None:
        reference = AdapterDisabled(engine.module)  # the frozen base weights, no second copy
    return Policy(cfg, d, engine, optimizer, lr_scheduler, policy_copy, copies, reference, sp)
