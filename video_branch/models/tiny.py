"""A tiny, randomly initialised Wan text-to-video model built from Wan's own classes, entirely offline.

Tests build it in milliseconds and the embedded default model is built through it with its own sizes, so the real
loading, sampling and saving code paths run without any download.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: the layout T5 configs and WanPipeline assume

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "magenta", "cyan", "pink", "white", "black", "grey",
            "gray", "brown"]
_SHAPES = ["circle", "square", "triangle", "disc", "disk", "dot", "ball", "box", "rectangle", "star", "shape", "object"]
_DIRECTIONS = ["left", "right", "up", "down", "upward", "upwards", "downward", "downwards", "leftward", "leftwards",
               "rightward", "rightwards"]
_GLUE = ["a", "an", "the", "is", "moving", "moves", "move", "goes", "going", "sliding", "slides", "travelling",
         "traveling", "drifting", "to", "toward", "towards", "from", "across", "on", "in", "of", "and", "with",
         "background", "plain", "small", "large", "big", "slowly", "quickly", "fast", "slow", "still", "static",
         "top", "bottom", "side", "frame", "video", "clip"]

# Characters let words outside the vocabulary still tokenize (to letters) rather than collapse to <unk>.
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"

DEFAULT_TRANSFORMER_KWARGS = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
    "out_channels": 16, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
}
DEFAULT_VAE_KWARGS = {
    "base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
DEFAULT_TEXT_KWARGS = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0}


def tiny_text_vocab() -> list[str]:
    """The default word list: the toy world's colours, shapes, directions and the words that glue prompts together."""
    return list(dict.fromkeys(_GLUE + _COLOURS + _SHAPES + _DIRECTIONS))


def build_word_tokenizer(vocab: list[str] | None = None) -> T5Tokenizer:
    """An offline unigram T5 tokenizer in which every word of `vocab` is one token (case-sensitive).

    Ids: 0 <pad>, 1 </s>, 2 <unk>, 3 the bare word boundary, then one id per word in order, then single characters
    as a fallback for unknown words.
    """
    words = tiny_text_vocab() if vocab is None else list(vocab)
    bad = [w for w in words if not isinstance(w, str) or not w or any(c.isspace() for c in w) or w in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"vocab: entries must be non-empty single words and not special tokens; got {bad[:5]}")
    words = list(dict.fromkeys(words))
    # Whole-word pieces score far above spelling a word out, so the unigram model picks one token per known word.
    pieces = [(t, 0.0) for t in SPECIAL_TOKENS] + [("\u2581", -5.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    known = {p for p, _ in pieces}
    pieces += [(c, -10.0) for c in _CHARACTERS if c not in known]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _merged(defaults: dict, overrides: dict | None, name: str) -> dict:
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"{name} must be a dict of constructor arguments, got {type(overrides).__name__}")
    return copy.deepcopy({**defaults, **(overrides or {})})


def build_tiny_wan(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    vocab: list[str] | None = None,
    transformer_kwargs: dict | None = None,
    vae: torch.nn.Module | None = None,
    vae_kwargs: dict | None = None,
    text_kwargs: dict | None = None,
    shift: float = 3.0,
) -> WanPipeline:
    """Build a tiny random WanPipeline (and save it to `out_dir` in diffusers format when given).

    `transformer_kwargs`, `vae_kwargs` (AutoencoderKLWan) and `text_kwargs` (UMT5Config) override the defaults key by
    key. `vae` supplies a ready VAE module instead of a new AutoencoderKLWan (same interface: `config.z_dim`,
    `config.latents_mean`, `config.latents_std`, `encode`, `decode`). The transformer's `text_dim` follows the text
    encoder's `d_model` unless given.
    """
    if vae is not None and vae_kwargs is not None:
        raise ValueError("build_tiny_wan: pass either vae (a module) or vae_kwargs (AutoencoderKLWan sizes), not both")
    tokenizer = build_word_tokenizer(vocab)
    text_cfg = _merged(DEFAULT_TEXT_KWARGS, text_kwargs, "text_kwargs")
    text_cfg.setdefault("vocab_size", len(tokenizer))
    if text_cfg["vocab_size"] < len(tokenizer):
        raise ValueError(f"text_kwargs['vocab_size']={text_cfg['vocab_size']} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    tr_cfg = _merged(DEFAULT_TRANSFORMER_KWARGS, transformer_kwargs, "transformer_kwargs")
    tr_cfg.setdefault("text_dim", text_cfg["d_model"])
    if tr_cfg["text_dim"] != text_cfg["d_model"]:
        raise ValueError(f"transformer_kwargs['text_dim']={tr_cfg['text_dim']} must equal the text encoder's "
                         f"d_model={text_cfg['d_model']}")

    # Fork the RNG so building a model never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**tr_cfg)
        torch.manual_seed(seed + 1)
        if vae is None:
            vae = AutoencoderKLWan(**_merged(DEFAULT_VAE_KWARGS, vae_kwargs, "vae_kwargs"))
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(**text_cfg))

    z_dim = vae.config.z_dim
    if not (transformer.config.in_channels == transformer.config.out_channels == z_dim):
        raise ValueError(f"transformer in/out channels ({transformer.config.in_channels}, "
                         f"{transformer.config.out_channels}) must equal the VAE's z_dim={z_dim}")
    vae.eval()
    text_encoder.eval()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        transformer=transformer,
    )
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir))
    return pipe
