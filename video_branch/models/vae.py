"""Between normalised Wan latents and uint8 frames, with the latent statistics WanPipeline uses.

Works for any VAE with the Wan interface: `config.z_dim`, `config.latents_mean`, `config.latents_std`,
`decode(z).sample` in [-1, 1] shaped [B, 3, T, H, W], and `encode(x).latent_dist` with `mode()` or `mean`.
"""

from __future__ import annotations

import torch

from .wan import module_dtype_device


def latent_stats(vae, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the VAE's raw latents, each [1, z_dim, 1, 1, 1]."""
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype)
    if mean.numel() != z_dim or std.numel() != z_dim:
        raise ValueError(f"VAE config: latents_mean ({mean.numel()}) and latents_std ({std.numel()}) must have "
                         f"z_dim={z_dim} entries")
    return mean.view(1, z_dim, 1, 1, 1), std.view(1, z_dim, 1, 1, 1)


def _chunks(n: int, batch_size: int | None):
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    step = n if batch_size is None else batch_size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


@torch.no_grad()
def decode_to_frames(vae, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Normalised latents [B, z_dim, F', h, w] -> uint8 frames [B, T, H, W, 3] on the latents' device.

    Un-normalises as WanPipeline does (`latents / (1 / std) + mean`, in the VAE's dtype) and maps [-1, 1] to
    0..255 the way diffusers' VideoProcessor does (`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded). Decodes
    `batch_size` clips at a time (all at once when None).
    """
    z_dim = vae.config.z_dim
    if latents.ndim != 5 or latents.shape[1] != z_dim:
        raise ValueError(f"decode_to_frames: latents must be [B, {z_dim}, F, h, w], got {tuple(latents.shape)}")
    dtype, device = module_dtype_device(vae)
    mean, std = latent_stats(vae, device, dtype)
    out = []
    for sl in _chunks(latents.shape[0], batch_size):
        z = latents[sl].to(device=device, dtype=dtype)
        video = vae.decode(z / (1.0 / std) + mean).sample  # [b, 3, T, H, W] in [-1, 1]
        frames = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out.append(frames.permute(0, 2, 3, 4, 1).to(latents.device))
    return torch.cat(out)


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """uint8 frames [B, T, H, W, 3] -> normalised float32 latents [B, z_dim, F', h, w] on the frames' device.

    The inverse of `decode_to_frames`: encode, take the latent distribution's mode (its mean), then
    `(z - mean) / std`.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"encode_frames: frames must be uint8 [B, T, H, W, 3], got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    dtype, device = module_dtype_device(vae)
    mean, std = latent_stats(vae, device)
    out = []
    for sl in _chunks(frames.shape[0], batch_size):
        x = frames[sl].to(device).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0  # [b, 3, T, H, W]
        dist = vae.encode(x).latent_dist
        z = dist.mode() if hasattr(dist, "mode") else dist.mean
        out.append(((z.float() - mean) / std).to(frames.device))
    return torch.cat(out)
