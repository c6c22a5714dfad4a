"""Checks of rewards' files that need no weights, run before a training run loads anything (``registry.check``).

VideoAlign's directory layout (``model_config.json``, ``checkpoint-*``, the local Qwen2-VL base model with its
``preprocessor_config.json``) is read with the same helpers its constructor uses, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Optional

from .registry import register_check


@register_check("videoalign")
def check_videoalign(path: str, base_model: Optional[str] = None, checkpoint_step: Optional[int] = None,
                     **_options) -> None:
    import os

    from . import videoalign as va

    if not os.path.isdir(path):
        raise FileNotFoundError(f"videoalign: checkpoint directory {path} does not exist")
    cfg = va._read_model_config(path)
    va._checkpoint_files(va._find_checkpoint(path, checkpoint_step))
    va.VisionSpec.load(va._resolve_base(path, cfg, base_model))
