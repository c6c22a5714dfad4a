"""Temporal consistency of a clip, from optical flow alone (no weights).

For every pair of consecutive frames ``(t, t+1)`` we compute OpenCV DIS flow forwards ``F_t`` (t -> t+1) and
backwards ``G_t`` (t+1 -> t) on grey frames, and a validity mask ``M_t``: pixels whose forward-backward round trip
returns home (Sundaram et al. 2010, used by Ruder et al. 2016 and Lai et al. 2018):
``|F + G(x+F)|^2 <= 0.01 (|F|^2 + |G(x+F)|^2) + 0.5`` (pixel units), among those whose target ``x + F`` lies
inside the frame (content that left the frame carries no evidence and is skipped).
``W_t`` is frame ``t+1`` warped back onto frame ``t`` along ``F_t``. Frames are RGB in [0, 1]; flows are divided by
the frame's shorter side so that every term is resolution-free.

Per clip (means over the T-1 pairs, or the T-2 triples for smoothness):

- ``warp``       = exp(-rmse / warp_scale), rmse = sqrt(mean over in-frame pixels and channels of (I_t - W_t)^2)
                   (the warping error of the video-consistency literature). Pixels that fail the round trip count
                   with the error ``occlusion_penalty``, so a clip whose flow cannot be trusted anywhere (a cut, a
                   shuffle) cannot score well by having nothing left to compare.
- ``flicker``    = exp(-|mean residual| / flicker_scale): the part of the motion-compensated residual ``I_t - W_t``
                   that is uniform over the frame (a global brightness or colour jump), L2 over channels.
- ``smoothness`` = exp(-accel / smooth_scale), accel = mean over in-frame pixels of |F_{t+1}(x + F_t(x)) - F_t(x)|
                   (where the round trip fails, the larger of that and |F_t(x)|): consecutive flow fields agree
                   along the trajectory, so jerky or shuffled motion scores low.
- ``dynamic``    = 1 - exp(-motion / motion_scale), motion = mean flow magnitude: 0 for a frozen clip.
- ``temporal_consistency`` = (warp * flicker * smoothness)^(1/3), times ``dynamic`` when ``require_motion``
  (default), so a frozen video, perfectly consistent, still scores about 0.

All scores lie in [0, 1]. A clip needs at least 3 frames (two flows are compared for smoothness); fewer frames
(images, T = 1) raise ``ValueError``: temporal terms are undefined there, and a silent NaN would hide a config
mistake. Non-finite flows make that sample NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List

import cv2
import numpy as np
import torch

from .registry import register

KEYS = ("warp", "flicker", "smoothness", "dynamic", "temporal_consistency")
_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def _grey(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] float RGB in [0, 1] -> contiguous uint8 grey [H, W] (DIS works on 8-bit grey)."""
    g = frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114
    return np.ascontiguousarray(np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float32 pixel coordinates [H, W], built once per frame size (read-only)."""
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx.setflags(write=False)
    gy.setflags(write=False)
    return gx, gy


def _sample(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """img [H, W, C] (or [H, W]) sampled at x + flow(x), bilinear, border replicated. flow [H, W, 2] in pixels."""
    gx, gy = _pixel_grid(*flow.shape[:2])
    return cv2.remap(img, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def fb_masks(fwd: np.ndarray, bwd: np.ndarray):
    """Forward-backward consistency and in-frame masks.

    fwd: [H, W, 2] flow t -> t+1 (pixels); bwd: [H, W, 2] flow t+1 -> t. Returns two bool [H, W] arrays:
    ``consistent`` where the round trip closes (``|F + G(x+F)|^2 <= 0.01 (|F|^2 + |G(x+F)|^2) + 0.5``) and ``inside``
    where ``x + F`` lies inside the frame (elsewhere the content left the frame: no evidence either way).
    """
    h, w = fwd.shape[:2]
    bwd_at = _sample(bwd, fwd)
    err = np.sum((fwd + bwd_at) ** 2, axis=-1)
    bound = 0.01 * (np.sum(fwd**2, axis=-1) + np.sum(bwd_at**2, axis=-1)) + 0.5
    gx, gy = _pixel_grid(h, w)
    tx, ty = gx + fwd[..., 0], gy + fwd[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return err <= bound, inside


def clip_terms(
    clip: np.ndarray,
    dis,
    *,
    warp_scale: float,
    flicker_scale: float,
    smooth_scale: float,
    motion_scale: float,
    occlusion_penalty: float,
) -> Dict[str, float]:
    """Raw temporal terms of one clip.

    clip: float32 [T, H, W, 3] RGB in [0, 1], T >= 3. Returns ``warp, flicker, smoothness, dynamic`` in [0, 1]
    (see the module docstring for the definitions).
    """
    t_len, h, w = clip.shape[:3]
    side = float(min(h, w))
    greys = [_grey(f) for f in clip]
    fwds, masks, sq_err, dc_res, motion = [], [], [], [], []
    for t in range(t_len - 1):
        fwd = dis.calc(greys[t], greys[t + 1], None)
        bwd = dis.calc(greys[t + 1], greys[t], None)
        consistent, inside = fb_masks(fwd, bwd)
        mask = consistent & inside
        warped = _sample(clip[t + 1], fwd)
        res = clip[t] - warped  # [H, W, 3]
        per_px = np.mean(res**2, axis=-1)
        # In-frame pixels failing the round trip count with a fixed error, so an untrustworthy flow cannot hide the
        # mismatch; pixels whose content left the frame carry no evidence and are skipped.
        per_px = np.where(consistent, per_px, occlusion_penalty**2)
        sq_err.append(float(per_px[inside].mean()) if inside.any() else occlusion_penalty**2)
        dc = res[mask].mean(axis=0) if mask.any() else res.reshape(-1, 3).mean(axis=0)
        dc_res.append(float(np.linalg.norm(dc)))
        motion.append(float(np.mean(np.linalg.norm(fwd, axis=-1))) / side)
        fwds.append(fwd)
        masks.append((consistent, inside))
    accel = []
    for t in range(t_len - 2):
        nxt = _sample(fwds[t + 1], fwds[t])
        diff = np.linalg.norm(nxt - fwds[t], axis=-1) / side
        consistent, inside = masks[t]
        # Where the first flow is untrustworthy the comparison means nothing; count it as a jerk of the flow's size.
        jerk = np.where(consistent, diff, np.maximum(diff, np.linalg.norm(fwds[t], axis=-1) / side))
        accel.append(float(jerk[inside].mean()) if inside.any() else float(jerk.mean()))
    rmse = math.sqrt(float(np.mean(sq_err)))
    return {
        "warp": math.exp(-rmse / warp_scale),
        "flicker": math.exp(-float(np.mean(dc_res)) / flicker_scale),
        "smoothness": math.exp(-float(np.mean(accel)) / smooth_scale),
        "dynamic": 1.0 - math.exp(-float(np.mean(motion)) / motion_scale),
    }


def combine(terms: Dict[str, float], require_motion: bool) -> float:
    """Overall score: geometric mean of warp, flicker, smoothness; gated by ``dynamic`` when motion is required."""
    base = (terms["warp"] * terms["flicker"] * terms["smoothness"]) ** (1.0 / 3.0)
    return base * terms["dynamic"] if require_motion else base


@register("temporal_consistency")
class TemporalConsistency:
    """Weight-free temporal consistency reward: ``rm(frames uint8 [B,T,H,W,3], prompts) -> dict of Tensor[B]``.

    Options: ``require_motion`` (gate by the dynamic degree), ``max_side`` (frames larger than this are downscaled
    before flow, for speed), ``preset`` (DIS preset: ultrafast | fast | medium), and the scales of each term (see the
    module docstring; flow-based scales are fractions of the frame's shorter side per frame).
    """

    def __init__(
        self,
        require_motion: bool = True,
        max_side: int = 256,
        preset: str = "medium",
        warp_scale: float = 0.1,
        flicker_scale: float = 0.05,
        smooth_scale: float = 0.01,
        motion_scale: float = 0.005,
        occlusion_penalty: float = 0.25,
    ):
        if preset not in _PRESETS:
            raise ValueError(f"temporal_consistency: preset must be one of {sorted(_PRESETS)}, got {preset!r}")
        for name, val in (("warp_scale", warp_scale), ("flicker_scale", flicker_scale),
                          ("smooth_scale", smooth_scale), ("motion_scale", motion_scale)):
            if not val > 0:
                raise ValueError(f"temporal_consistency: {name} must be > 0, got {val!r}")
        if int(max_side) < 16:
            raise ValueError(f"temporal_consistency: max_side must be >= 16, got {max_side!r}")
        self.require_motion = bool(require_motion)
        self.max_side = int(max_side)
        self.preset = preset
        self.scales = dict(warp_scale=float(warp_scale), flicker_scale=float(flicker_scale),
                           smooth_scale=float(smooth_scale), motion_scale=float(motion_scale),
                           occlusion_penalty=float(occlusion_penalty))

    def _prepare(self, clip: np.ndarray) -> np.ndarray:
        t, h, w = clip.shape[:3]
        scale = self.max_side / max(h, w)
        out = clip.astype(np.float32) / 255.0
        if scale < 1.0:
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            out = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in out])
        return out

    def __call__(self, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"temporal_consistency: frames must be a uint8 tensor [B, T, H, W, 3], got "
                             f"{getattr(frames, 'shape', type(frames))}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"temporal_consistency: frames must be uint8, got {frames.dtype}")
        if frames.shape[1] < 3:
            raise ValueError(f"temporal_consistency: needs clips of at least 3 frames, got T={frames.shape[1]} "
                             "(temporal terms are undefined for images; leave this reward out when num_frames < 3)")
        dis = cv2.DISOpticalFlow_create(_PRESETS[self.preset])
        arr = frames.cpu().numpy()
        out = {k: torch.full((arr.shape[0],), float("nan")) for k in KEYS}
        for b in range(arr.shape[0]):
            terms = clip_terms(self._prepare(arr[b]), dis, **self.scales)
            if not all(math.isfinite(v) for v in terms.values()):
                continue
            terms["temporal_consistency"] = combine(terms, self.require_motion)
            for k in KEYS:
                out[k][b] = min(1.0, max(0.0, terms[k]))
        return out
