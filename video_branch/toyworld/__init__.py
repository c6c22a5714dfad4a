"""The embedded default: a procedural toy world of coloured shapes moving in a direction, its prompts and VAE.

Importing this package registers ``ToyVAE`` where diffusers' loader finds it, so a pipeline directory whose
``model_index.json`` names ``["video_branch.toyworld.vae", "ToyVAE"]`` loads with ``WanPipeline.from_pretrained``.
"""

from .grammar import COLOURS, DIRECTIONS, SHAPES, Prompt, all_prompts, parse_prompt, split_prompts, vocabulary
from .render import render_batch, render_clip
from .vae import ToyVAE

__all__ = [
    "COLOURS", "DIRECTIONS", "SHAPES", "Prompt", "ToyVAE", "all_prompts", "parse_prompt", "render_batch",
    "render_clip", "split_prompts", "vocabulary",
]
