"""Wan models: local loading, prompt encoding, latent <-> frame conversion, attention backends, tiny builder."""

from .attention import ATTENTION_BACKENDS, set_attention_backend
from .text import PromptEncoder
from .tiny import build_tiny_wan, build_word_tokenizer, tiny_text_vocab
from .vae import decode_to_frames, encode_frames, latent_stats
from .wan import DTYPES, WanComponents, load_wan, read_model_index, resolve_dtype, velocity

__all__ = [
    "ATTENTION_BACKENDS",
    "DTYPES",
    "PromptEncoder",
    "WanComponents",
    "build_tiny_wan",
    "build_word_tokenizer",
    "decode_to_frames",
    "encode_frames",
    "latent_stats",
    "load_wan",
    "read_model_index",
    "resolve_dtype",
    "set_attention_backend",
    "tiny_text_vocab",
    "velocity",
]
