"""Prompt embeddings for Wan, computed exactly as WanPipeline does and cached per prompt string.

RL revisits the same prompts every epoch and encodes the empty negative prompt every step; the text encoder is
frozen, so each distinct prompt is encoded once.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .wan import module_dtype_device


class PromptEncoder:
    """`encode(prompts) -> [B, L, D]` with L = max_sequence_length; positions past a prompt's tokens are zero."""

    def __init__(
        self,
        text_encoder: torch.nn.Module,
        tokenizer,
        max_sequence_length: int = 512,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        enc_dtype, enc_device = module_dtype_device(text_encoder)
        self._encoder_device = enc_device
        self.device = torch.device(device) if device is not None else enc_device
        self.dtype = dtype if dtype is not None else enc_dtype
        self._cache: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # forward passes of the text encoder (one per batch of new prompts)

    def __len__(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        """Mirror of WanPipeline._get_t5_prompt_embeds: [B, L, D], each row trimmed to its tokens, zero-padded."""
        L = self.max_sequence_length
        inputs = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=L,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        hidden = self.text_encoder(ids.to(self._encoder_device), mask.to(self._encoder_device)).last_hidden_state
        self.encoder_calls += 1
        hidden = hidden.to(dtype=self.dtype, device=self.device)
        # The encoder still writes vectors at padded positions; Wan was trained with them zeroed.
        rows = [h[:n] for h, n in zip(hidden, seq_lens)]
        return torch.stack([torch.cat([r, r.new_zeros(L - r.shape[0], r.shape[1])]) for r in rows])

    def encode(self, prompts: list[str] | tuple[str, ...] | str) -> torch.Tensor:
        """Embeddings [B, L, D] for `prompts` (a single string counts as one prompt); new prompts in one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"PromptEncoder.encode: prompts must be strings, got {bad[:3]!r}")
        if len(prompts) == 0:
            raise ValueError("PromptEncoder.encode: empty prompt list")
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            for p, emb in zip(new, self._encode_uncached(new)):
                self._cache[p] = emb
        # A fresh tensor, so a caller writing into it cannot corrupt the cache.
        return torch.stack([self._cache[p] for p in prompts])

    def negative(self, prompt: str = "", batch_size: int = 1) -> torch.Tensor:
        """The classifier-free-guidance embedding of `prompt` (default empty), repeated: [batch_size, L, D]."""
        if not isinstance(prompt, str):
            raise TypeError(f"PromptEncoder.negative: prompt must be a string, got {type(prompt).__name__}")
        return self.encode([prompt] * batch_size)
