"""Export a trained policy as a diffusers-format Wan directory (``final/``) that WanPipeline loads.

A LoRA policy is written twice: merged into ``final/transformer`` and as the adapter alone in ``final/lora`` (the
file ``WanPipeline.load_lora_weights`` reads)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import deepspeed
import torch.distributed as dist

from .lora import adapter_metadata, diffusers_lora_state, is_lora, merged_transformer, save_diffusers_lora


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_files_only(src: Path):
    """A copytree ``ignore`` that keeps what makes the model: ``model_index.json`` and the component folders it
    names, except the transformer (written from the policy). The source directory's other files (its own
    evaluations, training logs, plots) describe the base model, not the trained one."""
    components = {k for k, v in json.loads((src / "model_index.json").read_text()).items()
                  if isinstance(v, list) and len(v) == 2 and None not in v}

    def ignore(folder, names):
        if Path(folder) != src:
            return []
        return [n for n in names if n != "model_index.json" and (n not in components or n == "transformer")]

    return ignore


def export_pipeline_dir(module, src_dir, out: Path, *, is_main: bool, zero3: bool, lora_scale: float = 0.0) -> Path:
    """Copy the source model directory ``src_dir`` and replace its transformer by ``module``'s weights (gathered
    under ZeRO-3 when ``zero3``); a LoRA ``module`` is merged with ``lora_scale`` (alpha / rank).

    Collective: every rank calls it; the main rank writes. The directory appears atomically (written as
    ``.partial``).
    """
    out = Path(out)
    src = Path(src_dir)
    tmp = out.with_name(out.name + ".partial")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=_model_files_only(src))
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if is_main:
            target = module
            if is_lora(module):  # merged weights in transformer/, the adapter alone in lora/ (diffusers' format)
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                save_diffusers_lora(diffusers_lora_state(module), adapter_metadata(module), tmp / "lora")
                target = merged_transformer(module, state, lora_scale)
            target.save_pretrained(tmp / "transformer", safe_serialization=True)
    _barrier()
    if is_main:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
