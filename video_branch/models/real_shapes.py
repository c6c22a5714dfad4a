"""Random-weight Wan 2.1 text-to-video directories with the real configurations, for runs at the real shapes offline.

The transformer, VAE and scheduler are the configurations of the released Wan2.1-T2V-1.3B and -14B diffusers
directories (only ``num_layers`` may be lowered); the text encoder keeps UMT5-XXL's output width (4096, which the
transformer's text embedder consumes) but has few layers, few heads and a word-level vocabulary, since UMT5-XXL itself
(5.7 B parameters) does not fit a test. Weights are random: these directories exercise memory, speed and code paths
at the real width, never quality.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers.
_COMMON = {
    "patch_size": (1, 2, 2), "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
    "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
REAL_TRANSFORMERS = {
    "1.3b": {**_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14b": {**_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
# vae/config.json of both releases (the same AutoencoderKLWan).
REAL_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True], "dropout": 0.0}
# UMT5-XXL's output width and layout; depth, heads, feed-forward width and vocabulary are what make it small here.
UMT5_XXL = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24, "vocab_size": 256384,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}
SMALL_TEXT = {**UMT5_XXL, "num_layers": 1, "num_heads": 4, "d_ff": 512, "dropout_rate": 0.0}
# scheduler/scheduler_config.json of the releases (UniPC on flow sigmas, shift 3 at 480p).
REAL_SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
                  "num_train_timesteps": 1000}
SIZES = tuple(REAL_TRANSFORMERS)


def _check_size(size: str) -> str:
    key = str(size).lower()
    if key not in REAL_TRANSFORMERS:
        raise ValueError(f"size: unknown Wan 2.1 size {size!r}; accepted: {', '.join(SIZES)}")
    return key


def transformer_config(size: str, num_layers: int | None = None) -> dict:
    """The real WanTransformer3DModel arguments of ``size`` ('1.3b' or '14b'), optionally with fewer layers."""
    cfg = copy.deepcopy(REAL_TRANSFORMERS[_check_size(size)])
    if num_layers is not None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive integer, got {num_layers!r}")
        cfg["num_layers"] = num_layers
    return cfg


def parameter_count(transformer_kwargs: dict) -> int:
    """Exact parameter count of a WanTransformer3DModel with these arguments (built on the meta device: no memory)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**transformer_kwargs)
    return sum(p.numel() for p in model.parameters())


def build_real_wan(
    out_dir: str | Path,
    size: str = "1.3b",
    *,
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    text_layers: int = 1,
    text_ff: int = 512,
    vae: str = "real",
    seed: int = 0,
) -> Path:
    """Write a diffusers-format Wan 2.1 T2V directory with random weights and the real ``size`` configuration.

    ``num_layers`` lowers the transformer's depth (width, heads and feed-forward stay real); ``dtype`` is the dtype
    the transformer and text encoder are stored in (the VAE is stored in float32, as released); ``text_layers`` and
    ``text_ff`` size the 4096-wide text encoder; ``vae='tiny'`` swaps the real AutoencoderKLWan for a tiny one with
    the same latent layout (16 channels, 8x spatial and 4x temporal compression) when only the transformer matters.
    Returns ``out_dir``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from .tiny import DEFAULT_VAE_KWARGS, build_tiny_wan
    from .wan import resolve_dtype

    tr_cfg = transformer_config(size, num_layers)
    torch_dtype = resolve_dtype(dtype, "dtype")
    if vae not in ("real", "tiny"):
        raise ValueError(f"vae: expected 'real' or 'tiny', got {vae!r}")
    for name, value in (("text_layers", text_layers), ("text_ff", text_ff)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    text_cfg = {k: v for k, v in SMALL_TEXT.items() if k != "vocab_size"}
    text_cfg.update(num_layers=text_layers, d_ff=text_ff)
    vae_kwargs = REAL_VAE if vae == "real" else DEFAULT_VAE_KWARGS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae_module = AutoencoderKLWan(**copy.deepcopy(vae_kwargs))
    pipe = build_tiny_wan(None, seed=seed, transformer_kwargs=tr_cfg, vae=vae_module, text_kwargs=text_cfg)
    pipe.transformer.to(torch_dtype)
    pipe.text_encoder.to(torch_dtype)
    pipe = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                       scheduler=UniPCMultistepScheduler(**REAL_SCHEDULER), transformer=pipe.transformer)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), max_shard_size="2GB")
    return out_dir
