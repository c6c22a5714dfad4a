"""Export a trained policy as a diffusers-format Wan directory (``final/``) that WanPipeline loads.

A LoRA policy is written twice: merged into ``final/transformer`` and as the adapter alone in ``final/lora`` (the
file ``WanPipeline.load_lora_weights`` reads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def export_pipeline_dir(trainer, out: Path) -> Path:
    """Copy the source model directory and replace its transformer by the trained weights (gathered under ZeRO-3).

    Collective: every rank calls it; rank 0 writes. The directory appears atomically (written as ``.partial``).
    """
    import deepspeed

    from .lora import (
        adapter_metadata,
        diffusers_lora_state,
        is_lora,
        lora_scale,
        merged_transformer,
        save_diffusers_lora,
    )

    out = Path(out)
    src = Path(trainer.cfg.model.path)
    tmp = out.with_name(out.name + ".partial")
    module = trainer.engine.module
    rank0 = trainer.dist.is_main
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("transformer"))
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=trainer.cfg.parallel.zero_stage == 3):
        if rank0:
            target = module
            if is_lora(module):  # merged weights in transformer/, the adapter alone in lora/ (diffusers' format)
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                save_diffusers_lora(diffusers_lora_state(module), adapter_metadata(module), tmp / "lora")
                target = merged_transformer(module, state, lora_scale(trainer.cfg.model.lora))
            target.save_pretrained(tmp / "transformer", safe_serialization=True)
    _barrier()
    if rank0:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
