"""Train on short text sequences with the exact cross-attention of WanPipeline's 512-token padded prompts.

WanPipeline zero-pads prompt embeddings to 512 tokens; every padding token maps to the same key and value, so the
softmax over 512 - n identical keys equals the softmax over fewer copies whose logits are raised by
log((512 - n) / copies). Training on ``n_max + 1`` tokens with that bias gives the same loss and gradients as the
full sequence at a fraction of the cost (the text MLP and key/value projections dominate a tiny model's step).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


class _BiasedCrossAttn(WanAttnProcessor):
    def __init__(self, holder: dict):
        super().__init__()
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.holder["bias"], rotary_emb)


def short_embeddings(tokenizer, text_encoder, prompts, full_length: int = 512):
    """(embeds [B, S, D], bias [B, 1, 1, S]) with S = longest prompt + 1; padded slots carry log-count biases."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer([prompt_clean(p) for p in prompts], padding="longest", truncation=True, max_length=full_length,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask
    hidden = text_encoder(inputs.input_ids, mask).last_hidden_state * mask[..., None].to(torch.float32)
    hidden = F.pad(hidden, (0, 0, 0, 1))
    mask = F.pad(mask, (0, 1))
    n = mask.sum(dim=1, keepdim=True).float()
    pads = hidden.shape[1] - n
    bias = torch.where(mask.bool(), torch.zeros_like(n), torch.log((full_length - n) / pads))
    return hidden, bias[:, None, None, :]


@contextmanager
def short_text_attention(transformer, bias: torch.Tensor | None = None):
    """Within the context, cross-attention adds ``holder['bias']`` (set it per batch) to its logits."""
    holder = {"bias": bias}
    saved = dict(transformer.attn_processors)
    procs = {k: (_BiasedCrossAttn(holder) if ".attn2." in k else v) for k, v in saved.items()}
    transformer.set_attn_processor(procs)
    try:
        yield holder
    finally:
        transformer.set_attn_processor(saved)


