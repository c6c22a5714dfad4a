"""ToyVAE: a small convolutional VAE with AutoencoderKLWan's interface and latent shape, for the toy world.

Latents are ``[B, z_dim, 1 + (F - 1) / 4, H / 8, W / 8]`` like Wan's VAE: the first frame is encoded on its own (it is
repeated three times in front, as Wan's causal padding does) and every following group of four frames becomes one
latent frame. ``encode`` returns a diagonal Gaussian posterior, ``decode`` returns frames in [-1, 1]; the config
carries ``z_dim``, ``latents_mean``, ``latents_std``, ``scale_factor_temporal`` and ``scale_factor_spatial``, which is
all that WanPipeline and our loader read. It exists because AutoencoderKLWan trained from scratch learns the
background long before the objects (docs/TOYWORLD.md), while this network reconstructs toy clips in minutes.
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

# Each latent frame covers 4 video frames; the input is folded by 2x2 pixels, so the first convolution runs at H/2.
TIME_FOLD = 4
SPACE_FOLD = 2
FRAME_CHANNELS = 32


def fold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """Space/time-to-depth: [B, C, T, H, W] -> [B, C*ft*fs*fs, T/ft, H/fs, W/fs]."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def unfold(x: torch.Tensor, c: int, ft: int, fs: int) -> torch.Tensor:
    """Inverse of ``fold``: [B, c*ft*fs*fs, T, H, W] -> [B, c, T*ft, H*fs, W*fs]."""
    b, _, t, h, w = x.shape
    x = x.view(b, c, ft, fs, fs, t, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, t * ft, h * fs, w * fs)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]: every latent frame is one 2D image (time is already in the channels)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU()]


class ToyVAE(ModelMixin, ConfigMixin):
    """2D convolutions over folded time: each group of 4 frames and each 2x2 pixel block are channels of one image;
    the decoder ends with a per-frame head at H/2.

    CPU cost is what matters here: 2D convolutions on a handful of channels are several times cheaper than 3D ones,
    and a full-resolution 3D convolution costs more than this whole network.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        z_dim: int = 16,
        channels: tuple[int, ...] = (64, 128),
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scale_factor_temporal: int = 4,
        scale_factor_spatial: int = 8,
        position_code: float = 0.0,
    ):
        super().__init__()
        if scale_factor_temporal != TIME_FOLD or scale_factor_spatial != 8:
            raise ValueError("ToyVAE: only scale_factor_temporal=4 and scale_factor_spatial=8 are implemented")
        if len(channels) != 2:
            raise ValueError(f"ToyVAE: channels must have 2 entries (H/2-H/4 and H/8 widths), got {channels}")
        c1, c2 = channels
        folded = 3 * TIME_FOLD * SPACE_FOLD * SPACE_FOLD
        self.encoder = nn.Sequential(
            *_block(folded, c1), *_block(c1, c1, 2), *_block(c1, c2, 2), *_block(c2, c2),
            nn.Conv2d(c2, 2 * z_dim, 3, 1, 1),
        )
        self.decoder = nn.Sequential(
            *_block(z_dim, c2), *_block(c2, c2),
            nn.Upsample(scale_factor=2, mode="nearest"), *_block(c2, c1),
            nn.Upsample(scale_factor=2, mode="nearest"), *_block(c1, c1),
            nn.Conv2d(c1, TIME_FOLD * FRAME_CHANNELS, 3, 1, 1),
        )
        # Per-frame head: the four frames of a latent frame are split apart and each is sharpened on its own at H/2,
        # so one frame's edges are not a compromise between the positions of its neighbours.
        self.frame_head = nn.Sequential(
            nn.SiLU(), *_block(FRAME_CHANNELS, FRAME_CHANNELS),
            nn.Conv2d(FRAME_CHANNELS, 3 * SPACE_FOLD * SPACE_FOLD, 3, 1, 1),
        )
        self.z_dim = z_dim

    def position_offset(self, h: int, w: int) -> torch.Tensor:
        """The latent's position code, [1, z_dim, 1, h, w]: ``position_code`` x a fixed pattern of the latent cell's
        column (channels 0-7) and row (8-15), in units of ``latents_std`` (zero when ``position_code`` is 0).

        The encoder adds it and the decoder removes it, so reconstructions are unchanged; a WanTransformer3DModel has
        no absolute position of its own (rotary positions are relative, its patch embedding is translation
        equivariant), and on noisy inputs it cannot tell where a token is. With the code, the normalised latent
        ``(z - mean) / std`` carries ``position_code`` x the pattern at every cell, visible through the noise.
        """
        a = float(self.config.position_code)
        out = torch.zeros(1, self.z_dim, 1, h, w)
        if a == 0.0:
            return out
        for c in range(self.z_dim):
            column = c % 16 < 8
            n = w if column else h
            pos = (torch.arange(n, dtype=torch.float32) + 0.5) / n
            wave = torch.cos(math.pi * ((c % 8) // 2 + 1) * pos + (c % 2) * math.pi / 2)
            out[0, c, 0] = wave.view(1, w) if column else wave.view(h, 1)
        std = self.config.latents_std
        if std is not None:
            out = out * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        return a * out

    def _check(self, x: torch.Tensor, what: str, channels: int) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"ToyVAE.{what}: expected [B, {channels}, T, H, W], got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x [B, 3, F, H, W] in [-1, 1], F = 4k + 1, H and W multiples of 8 -> posterior over
        [B, z, k + 1, H/8, W/8]."""
        self._check(x, "encode", 3)
        f, h, w = x.shape[2:]
        if (f - 1) % 4 or h % 8 or w % 8:
            raise ValueError(f"ToyVAE.encode: frames must be 4k+1 and H, W multiples of 8; got F={f}, H={h}, W={w}")
        x = torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], dim=2)
        h = _batch_to_frames(self.encoder(_frames_to_batch(fold(x, TIME_FOLD, SPACE_FOLD))), x.shape[0])
        if self.config.position_code:
            off = self.position_offset(h.shape[3], h.shape[4]).to(h)
            h = torch.cat([h[:, : self.z_dim] + off, h[:, self.z_dim:]], dim=1)
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """z [B, z_dim, k + 1, h, w] -> frames [B, 3, 4k + 1, 8h, 8w] clamped to [-1, 1]."""
        self._check(z, "decode", self.z_dim)
        out = self.decode_unclamped(z.to(self.dtype)).clamp(-1.0, 1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output before clamping (training uses it so saturated pixels still get gradients)."""
        b, _, t, h, w = z.shape
        if self.config.position_code:
            z = z - self.position_offset(h, w).to(z)
        y = self.decoder(_frames_to_batch(z))  # [B*t, 4 * FRAME_CHANNELS, 4h, 4w]
        y = y.view(b * t * TIME_FOLD, FRAME_CHANNELS, 4 * h, 4 * w)
        y = self.frame_head(y).view(b, t, TIME_FOLD, 3, SPACE_FOLD, SPACE_FOLD, 4 * h, 4 * w)
        # -> [B, 3, t * 4, 8h, 8w]
        y = y.permute(0, 3, 1, 2, 6, 4, 7, 5).reshape(b, 3, t * TIME_FOLD, 8 * h, 8 * w)
        return y[:, :, 3:]

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
