"""Sampling clips from a toy-world pipeline with per-clip seeds, and differentiable prompt embeddings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .render import DEFAULT_FRAMES, DEFAULT_SIZE

WAN_TEXT_LENGTH = 512


def native_text_length(model_dir) -> int:
    """How many text tokens a pipeline directory's transformer was trained to read: its tokenizer's
    ``model_max_length`` when that is below 512 (the toy world's model reads prompts zero-padded to 16 tokens:
    ``tools/pretrain_tiny.py --text-pad``), else WanPipeline's 512 (real Wan tokenizers, and tokenizers that leave
    the length unset)."""
    cfg = Path(model_dir) / "tokenizer" / "tokenizer_config.json"
    try:
        value = json.loads(cfg.read_text()).get("model_max_length") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg}: expected a JSON object with model_max_length ({e})") from e
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < WAN_TEXT_LENGTH:
        return value
    return WAN_TEXT_LENGTH


def prompt_embeddings(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
    """[B, L, D] embeddings equal to WanPipeline's (trimmed to each prompt's tokens, zero-padded to L), with grad.

    Tokenising to the longest prompt instead of L is exact: UMT5's attention masks the padding and its position bias
    is relative, so real tokens see the same inputs; it keeps the text encoder cheap enough to train.
    """
    inputs = tokenizer([prompt_clean(p) for p in prompts], padding="longest", truncation=True,
                       max_length=max_sequence_length, add_special_tokens=True, return_attention_mask=True,
                       return_tensors="pt")
    mask = inputs.attention_mask
    hidden = text_encoder(inputs.input_ids, mask).last_hidden_state * mask[..., None].to(torch.float32)
    return F.pad(hidden, (0, 0, 0, max_sequence_length - hidden.shape[1]))


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 20,
             guidance_scale: float = 4.0, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
             batch_size: int = 16, max_sequence_length: int = 512) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] from ``pipe`` (a WanPipeline); clip i depends only on (prompts[i], seeds[i]).
    ``max_sequence_length``: the text length prompts are zero-padded to (WanPipeline's default is 512)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        video = pipe(prompt=list(prompts[i:i + batch_size]), height=size, width=size, num_frames=num_frames,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gens,
                     max_sequence_length=max_sequence_length, output_type="pt").frames  # [b, T, 3, H, W] in [0, 1]
        out.append((video.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2))
    return torch.cat(out)
