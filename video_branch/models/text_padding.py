"""Exact cross-attention to zero-padded prompts, computed on a short text sequence.

WanPipeline zero-pads every prompt embedding to 512 tokens, and Wan models are trained on that. All padding rows are
the same vector, so after the text projection they give cross-attention identical keys and values: a softmax over
``full - n`` identical padding keys equals a softmax over ``m`` copies whose logits are raised by
``log((full - n) / m)``. With prompts encoded to a short length ``L`` (``model.max_sequence_length``) and
``model.text_pad_to: 512``, cross-attention adds that bias on the padding slots and returns what the model would with
512 tokens, at a fraction of the cost (the key/value projections of the text dominate a small model's step).

Padding rows are recognised as exact zero rows of ``encoder_hidden_states``, which is how PromptEncoder and
WanPipeline pad. A prompt needs at least one padding slot: raise ``model.max_sequence_length`` otherwise.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


class PaddedTextAttnProcessor(WanAttnProcessor):
    """Wan cross-attention (attn2) with an additive logit bias set per forward by :func:`enable_padded_text`."""

    def __init__(self, backend=None):
        super().__init__()
        self._attention_backend = backend
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def padding_bias(encoder_hidden_states: torch.Tensor, full_length: int) -> torch.Tensor:
    """``[B, 1, 1, L]`` logit bias: 0 on real tokens, ``log((full - n) / (L - n))`` on the ``L - n`` padding rows.

    encoder_hidden_states: ``[B, L, D]`` raw prompt embeddings with zero rows as padding.
    """
    b, length, _ = encoder_hidden_states.shape
    if length >= full_length:
        return torch.zeros(b, 1, 1, length, dtype=encoder_hidden_states.dtype, device=encoder_hidden_states.device)
    pad = (encoder_hidden_states == 0).all(dim=-1)  # [B, L]
    n_pad = pad.sum(dim=1, keepdim=True)
    if bool((n_pad == 0).any()):
        raise ValueError(f"a prompt fills all {length} text tokens, so the padding up to model.text_pad_to="
                         f"{full_length} cannot be represented: raise model.max_sequence_length")
    n_real = length - n_pad
    bias = torch.log((full_length - n_real).double() / n_pad.double())
    out = torch.where(pad, bias, torch.zeros_like(bias))
    return out[:, None, None, :].to(encoder_hidden_states.dtype)


def _set_bias(module, args, kwargs):
    ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    bias = None if ehs is None else padding_bias(ehs, module._padded_text_length)
    for block in module.blocks:
        block.attn2.processor.bias = bias
    return None


def enable_padded_text(transformer, full_length: int) -> None:
    """Install the processors and the hook on a WanTransformer3DModel (a deepcopy keeps working: the hook writes into
    the processors of the module it is called on)."""
    if full_length <= 0 or getattr(transformer, "_padded_text_length", None) is not None:
        return
    if not math.isfinite(full_length):
        raise ValueError(f"model.text_pad_to must be a positive integer, got {full_length}")
    for block in transformer.blocks:
        old = block.attn2.processor
        block.attn2.set_processor(PaddedTextAttnProcessor(getattr(old, "_attention_backend", None)))
    transformer._padded_text_length = int(full_length)
    transformer.register_forward_pre_hook(_set_bias, with_kwargs=True)
