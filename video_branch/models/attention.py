"""Choosing the attention kernel of a Wan transformer (config key `model.attention_backend`)."""

from __future__ import annotations

import logging

import torch

# Our names -> diffusers' attention-dispatcher names (diffusers.models.attention_dispatch.AttentionBackendName).
ATTENTION_BACKENDS = {"native": "native", "xformers": "xformers", "flash": "flash"}
_GPU_ONLY = {"xformers", "flash"}


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> int:
    """Route every attention processor of `transformer` that goes through diffusers' dispatcher to `backend`.

    `native` is torch's scaled_dot_product_attention and runs anywhere; `xformers` and `flash` need CUDA and their
    packages. Returns the number of processors switched. Processors that do not use the dispatcher (for example a
    sequence-parallel processor that calls its own kernel) are left alone.
    """
    if not isinstance(backend, str) or backend.lower() not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend: unknown backend {backend!r}; "
                         f"accepted: {', '.join(ATTENTION_BACKENDS)}")
    backend = backend.lower()
    if backend in _GPU_ONLY and not torch.cuda.is_available():
        raise RuntimeError(f"model.attention_backend: {backend!r} needs a CUDA GPU, and none is available here; "
                           "use `model.attention_backend: native` on CPU")
    module = getattr(transformer, "module", transformer)  # unwrap a DeepSpeed engine
    if not hasattr(module, "set_attention_backend"):
        raise TypeError(f"set_attention_backend: {type(module).__name__} is not a diffusers model "
                        "(it has no set_attention_backend method)")
    # diffusers checks that the kernel package is installed and raises its own clear error when it is not.
    # Its "experimental feature" notice would otherwise repeat on every model load.
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        module.set_attention_backend(ATTENTION_BACKENDS[backend])
    finally:
        diffusers_logger.setLevel(level)
    return sum(
        1
        for m in module.modules()
        if getattr(getattr(m, "processor", None), "_attention_backend", None) is not None
        and str(getattr(m.processor._attention_backend, "value", m.processor._attention_backend))
        == ATTENTION_BACKENDS[backend]
    )
