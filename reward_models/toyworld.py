"""``toyworld``: a verifiable reward for the embedded toy world, computed from decoded frames alone.

For a prompt "a <colour> <shape> moving <direction>" and frames uint8 ``[B, T, H, W, 3]`` it returns, per clip, terms
in [0, 1] that a clip cannot raise by fading, shrinking or freezing its object:

- the object: per frame, pixels more than ``MASK_THRESHOLD`` (RGB distance) from the background, the median colour of
  the frame's border, reduced to the largest 8-connected region and, within it, to the pixels above half its own
  contrast (``HALF_CONTRAST``: a blurred edge keeps its place at half contrast); a frame whose region is smaller
  than ``MIN_AREA`` (at 64x64, scaled with the area) shows no object;
- ``colour``: ``exp(-d^2 / (2 * COLOUR_SIGMA^2))``, ``d`` the RGB distance from the object's colour (per frame, the
  median over the object's pixels; averaged over the frames that show it) to the prompt's palette colour. An absolute
  distance, not a choice among the six palette colours: an object faded halfway toward the background, or of an
  off-palette hue (brown for red, purple for magenta), is 60-120 away and scores 0.05-0.5;
- ``shape``: a Gaussian kernel classifier over mask features (``FEATURES``, averaged over the frames that show the
  object) against reference features of each shape: the prompt shape's probability, times the mean over frames of a
  size factor (1 within the world's object sizes, falling in proportion to the area below ``SIZE_TOLERANCE`` times
  the smallest ground-truth area, or above ``SIZE_GROWTH`` times the largest; a frame without an object counts 0).
  References are measured on rendered ground truth at construction time and, from a calibration file
  (``assets/toy_wan/toyworld_reward.json``), on ground truth passed through the model's VAE, with the kernel's
  covariance measured there (within-shape);
- ``direction`` (T > 1): the object centroid's least-squares velocity over the frames that show it, times T - 1,
  projected on the prompt's direction and divided by the ground-truth travel, clipped to [0, 1]: graded, 0 for a
  frozen, perpendicular or backwards object;
- ``temporal_consistency`` (T >= 3): whether one steady object moves smoothly, from its track: the share of frames
  showing it, times a motion gate (travel in any direction, full credit from half the ground-truth travel, so a
  frozen clip scores 0), times its visibility (contrast with the background over ``FULL_CONTRAST``, capped at 1),
  times the steadiness of its area, of its colour and of its path (residual from a constant-velocity fit). It never
  favours a frozen or fainter clip over the moving crisp one;
  ``temporal="flow"`` uses the optical-flow reward ``temporal_consistency`` (motion required) instead;
- ``overall``: the mean of the terms present. Single frames (T = 1) have neither direction nor temporal terms.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from reward_models.registry import register
from video_branch.toyworld.grammar import COLOURS, DIRECTIONS, SHAPES, Prompt, all_prompts, parse_prompt
from video_branch.toyworld.render import HALF_RANGE, expected_displacement, render_batch

FEATURES = ("fill", "top_share", "corner_fill", "cross_moment", "diag_ratio")
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "assets" / "toy_wan" / "toyworld_reward.json"
# Pixels this far (RGB euclidean, 0-255) from the background belong to the object; every palette colour is > 140 away.
MASK_THRESHOLD = 60.0
# ... and, within that region, more than this share of the object's own contrast (its 90th-percentile distance).
HALF_CONTRAST = 0.5
# Frames whose object covers fewer pixels than this (at 64x64) have no object.
MIN_AREA = 12.0
COLOUR_SIGMA = 45.0
SHAPE_SIGMA = 0.08
# Area of a shape relative to its bounding box (2 * half)^2, as rendered.
AREA_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
SIZE_TOLERANCE = 0.75
# Decoding blurs edges outward, so the upper bound is loose: twice the largest ground-truth area.
SIZE_GROWTH = 2.0
# Temporal term: scales of the steadiness factors (log-area std, colour deviation in RGB units, path residual as a
# fraction of the frame side) and the travel, as a share of the ground truth's, that earns full motion credit.
AREA_STEADY = 0.15
COLOUR_STEADY = 20.0
PATH_STEADY = 0.08
MOTION_FULL = 0.5
# An object this far (RGB distance) from the background is fully visible; every palette colour is > 140 away.
FULL_CONTRAST = 120.0


def frame_masks(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Object masks: frames uint8 [N, H, W, 3] -> (bool masks [N, H, W], background colours float [N, 3]).

    Pixels far from the border's median colour, reduced to their largest 8-connected component (stray pixels that
    decoding leaves elsewhere would otherwise stretch the bounding box and pull the centroid), then to the pixels
    of that region above half its own contrast.
    """
    x = frames.float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], dim=1)  # [N, 4(H-1), 3]
    bg = border.median(dim=1).values  # [N, 3]
    dist = (x - bg[:, None, None, :]).norm(dim=-1).numpy()
    raw = (dist > MASK_THRESHOLD).astype(np.uint8)
    out = np.zeros_like(raw)
    for i, m in enumerate(raw):
        if not m.any():
            continue
        region = _largest(m)
        # Half-contrast contour: a blurred edge keeps its position at half the object's own contrast, so corners
        # and extents are measured there rather than at a fixed distance from the background.
        peak = float(np.percentile(dist[i][region], 90))
        if peak * HALF_CONTRAST > MASK_THRESHOLD:
            region = _largest(((dist[i] > peak * HALF_CONTRAST) & region).astype(np.uint8))
        out[i] = region
    return torch.from_numpy(out.astype(bool)), bg


def _largest(m: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a uint8 mask, as bool (all False when the mask is empty)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(m.shape, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def mask_geometry(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame geometry of masks bool [N, H, W]: area, centroid (cx, cy), and the shape features, each [N].

    Features of an empty mask are 0; callers check ``area``.
    """
    n, h, w = mask.shape
    m = mask.float()
    area = m.sum(dim=(1, 2))
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    safe = area.clamp_min(1.0)
    cx = (m * xs).sum(dim=(1, 2)) / safe
    cy = (m * ys).sum(dim=(1, 2)) / safe
    big = float(max(h, w) + 1)
    x0 = torch.where(mask, xs.expand(n, h, w), torch.full_like(m, big)).amin(dim=(1, 2)) - 0.5
    x1 = torch.where(mask, xs.expand(n, h, w), torch.full_like(m, -big)).amax(dim=(1, 2)) + 0.5
    y0 = torch.where(mask, ys.expand(n, h, w), torch.full_like(m, big)).amin(dim=(1, 2)) - 0.5
    y1 = torch.where(mask, ys.expand(n, h, w), torch.full_like(m, -big)).amax(dim=(1, 2)) + 0.5
    bw, bh = (x1 - x0).clamp_min(1.0), (y1 - y0).clamp_min(1.0)
    fill = area / (bw * bh)
    mid = ((y0 + y1) / 2).view(n, 1, 1)
    top_share = (m * (ys < mid).float()).sum(dim=(1, 2)) / safe
    # Corner regions: the outer quarter of the box along both axes.
    in_x = (xs < (x0 + bw / 4).view(n, 1, 1)) | (xs > (x1 - bw / 4).view(n, 1, 1))
    in_y = (ys < (y0 + bh / 4).view(n, 1, 1)) | (ys > (y1 - bh / 4).view(n, 1, 1))
    inside = (xs > x0.view(n, 1, 1)) & (xs < x1.view(n, 1, 1)) & (ys > y0.view(n, 1, 1)) & (ys < y1.view(n, 1, 1))
    corner = (in_x & in_y & inside).float()
    corner_fill = (m * corner).sum(dim=(1, 2)) / corner.sum(dim=(1, 2)).clamp_min(1.0)
    # mu22 / (mu20 mu02) of the mask: 1 for an axis-aligned box, 2/3 for a disc, lower for a triangle.
    dx, dy = xs - cx.view(n, 1, 1), ys - cy.view(n, 1, 1)
    mu20 = (m * dx**2).sum(dim=(1, 2)) / safe
    mu02 = (m * dy**2).sum(dim=(1, 2)) / safe
    mu22 = (m * dx**2 * dy**2).sum(dim=(1, 2)) / safe
    cross = mu22 / (mu20 * mu02).clamp_min(1e-6)
    # Reach along the diagonals over reach along the axes, from the centroid: sqrt(2) for a box, 1 for a disc.
    neg = torch.full_like(m, -1.0)
    axis = torch.where(mask, torch.maximum(dx.abs(), dy.abs()) + 0.5, neg).amax(dim=(1, 2))
    diag = torch.where(mask, torch.maximum((dx + dy).abs(), (dx - dy).abs()) / math.sqrt(2) + 0.5, neg).amax(dim=(1, 2))
    diag_ratio = diag / axis.clamp_min(1.0)
    empty = area == 0
    feats = [torch.where(empty, torch.zeros_like(f), f) for f in (fill, top_share, corner_fill, cross, diag_ratio)]
    return {"area": area, "cx": cx, "cy": cy, **dict(zip(FEATURES, feats))}


def shape_features(frames: torch.Tensor) -> torch.Tensor:
    """frames uint8 [N, H, W, 3] -> features float [N, len(FEATURES)]."""
    g = mask_geometry(frame_masks(frames)[0])
    return torch.stack([g[k] for k in FEATURES], dim=-1)


def reference_features(frames: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, list[float]]:
    """Mean shape features per shape over clips [B, T, H, W, 3] of known prompts (for calibration)."""
    return reference_statistics(frames, prompts)[0]


def reference_statistics(frames: torch.Tensor, prompts: Sequence[Prompt]) -> tuple[dict[str, list[float]],
                                                                                  list[list[float]]]:
    """(mean clip features per shape, pooled within-shape covariance of clip features) over clips of known prompts.

    A clip's features are the mean over the frames that show an object (as the reward classifies them)."""
    b, t = frames.shape[:2]
    flat = frames.reshape(b * t, *frames.shape[2:])
    mask, _ = frame_masks(flat)
    g = mask_geometry(mask)
    feats = torch.stack([g[k] for k in FEATURES], dim=-1).view(b, t, -1)
    present = (g["area"] >= MIN_AREA * flat.shape[1] * flat.shape[2] / 4096.0).view(b, t)
    w = present.float()
    clip = (w[..., None] * feats).sum(1) / w.sum(1).clamp_min(1.0)[:, None]
    shown = present.any(1)
    means, resid = {}, []
    for s in SHAPES:
        idx = [i for i, p in enumerate(prompts) if p.shape == s and shown[i]]
        if not idx:
            raise ValueError(f"reference_features: no clip of shape {s!r} showing an object among the {b} given")
        rows = clip[idx]
        means[s] = rows.mean(dim=0).tolist()
        resid.append(rows - rows.mean(dim=0))
    r = torch.cat(resid)
    return means, (r.T @ r / max(1, len(r))).tolist()


def rendered_references(num_frames: int = 9, size: int = 64, clips_per_prompt: int = 1) -> dict[str, list[float]]:
    prompts = [p for p in all_prompts() for _ in range(clips_per_prompt)]
    frames = torch.from_numpy(render_batch(prompts, list(range(len(prompts))), num_frames, size))
    return reference_features(frames, prompts)


def shape_probabilities(feats: torch.Tensor, prototypes: dict[str, list[list[float]]],
                        covariance: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian kernel classifier: feats [N, F] -> probabilities [N, len(SHAPES)] (rows sum to 1).

    ``covariance`` [F, F]: the kernel's (the within-shape covariance of decoded ground truth); default
    ``SHAPE_SIGMA^2`` times the identity."""
    f = feats.shape[-1]
    cov = torch.eye(f) * SHAPE_SIGMA**2 if covariance is None else torch.as_tensor(covariance, dtype=torch.float32)
    prec = torch.linalg.inv(cov)
    kernels = []
    for s in SHAPES:
        protos = torch.tensor(prototypes[s], dtype=torch.float32).view(-1, f)  # [P, F]
        d = feats[:, None, :] - protos[None]  # [N, P, F]
        d2 = torch.einsum("npf,fg,npg->np", d, prec, d)
        kernels.append(torch.exp(-d2 / 2).sum(-1))
    k = torch.stack(kernels, dim=-1) + 1e-12
    return k / k.sum(dim=-1, keepdim=True)


def colour_match(rgb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Absolute colour match: rgb, target float [N, 3] (0-255) -> exp(-d^2 / (2 sigma^2)) [N]."""
    d2 = ((rgb - target) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * COLOUR_SIGMA**2))


def size_factor(area: torch.Tensor, shapes: Sequence[str], size: int) -> torch.Tensor:
    """area float [B, T] (pixels), the prompts' shapes, frame side -> [B, T] in [0, 1]: 1 within the world's object
    sizes, proportional to the area below SIZE_TOLERANCE x the smallest and above SIZE_GROWTH x the largest."""
    scale = size / 64.0
    ratio = torch.tensor([AREA_RATIO[s] for s in shapes], dtype=torch.float32)[:, None]
    lo = ratio * (2 * HALF_RANGE[0] * scale) ** 2 * SIZE_TOLERANCE
    hi = ratio * (2 * HALF_RANGE[1] * scale) ** 2 * SIZE_GROWTH
    return torch.minimum(torch.ones_like(area), torch.minimum(area / lo, hi / area.clamp_min(1e-6)))


def direction_scores(cx: torch.Tensor, cy: torch.Tensor, present: torch.Tensor, unit: torch.Tensor,
                     travel: float) -> torch.Tensor:
    """Graded direction term.

    cx, cy: centroids float [B, T]; present: bool [B, T] (object visible); unit: [B, 2] prompt direction (x right,
    y down); travel: ground-truth displacement from first to last frame in pixels. Returns [B] in [0, 1]: the
    least-squares velocity over visible frames times (T - 1), projected on ``unit``, over ``travel``; 0 when fewer
    than two frames show the object.
    """
    disp, ok = _track_fit(cx, cy, present)[:2]
    score = ((disp * unit).sum(-1) / travel).clamp(0.0, 1.0)
    return torch.where(ok, score, torch.zeros_like(score))


def _track_fit(cx: torch.Tensor, cy: torch.Tensor, present: torch.Tensor):
    """Least-squares constant-velocity fit of centroid tracks [B, T] over the present frames.

    Returns (displacement over T - 1 frames [B, 2], fit defined [B] bool, rms residual in pixels [B])."""
    b, t = cx.shape
    w = present.float()
    n = w.sum(dim=1)
    tt = torch.arange(t, dtype=torch.float32).expand(b, t)
    tmean = (w * tt).sum(1) / n.clamp_min(1)
    dt = (tt - tmean[:, None]) * w
    var = (dt * dt).sum(1)
    vel, res2 = [], torch.zeros(b)
    for c in (cx, cy):
        cmean = (w * c).sum(1) / n.clamp_min(1)
        v = (dt * (c - cmean[:, None])).sum(1) / var.clamp_min(1e-8)
        vel.append(v)
        res2 = res2 + (w * (c - cmean[:, None] - v[:, None] * (tt - tmean[:, None])) ** 2).sum(1)
    ok = (n >= 2) & (var > 0)
    return torch.stack(vel, dim=-1) * (t - 1), ok, (res2 / n.clamp_min(1)).sqrt()


def temporal_scores(geo: dict[str, torch.Tensor], rgb: torch.Tensor, contrast: torch.Tensor, present: torch.Tensor,
                    travel: float, size: int) -> torch.Tensor:
    """Track-based temporal consistency, [B] in [0, 1] (module docstring). geo values, contrast (RGB distance of the
    object's colour from the background) and present [B, T]; rgb [B, T, 3]."""
    b, t = present.shape
    w = present.float()
    n = w.sum(1)
    disp, ok, resid = _track_fit(geo["cx"], geo["cy"], present)
    motion = (disp.norm(dim=-1) / (MOTION_FULL * travel)).clamp(0.0, 1.0)
    log_area = torch.log(geo["area"].clamp_min(1.0))
    la_mean = (w * log_area).sum(1) / n.clamp_min(1)
    la_std = ((w * (log_area - la_mean[:, None]) ** 2).sum(1) / n.clamp_min(1)).sqrt()
    c_mean = (w[..., None] * rgb).sum(1) / n.clamp_min(1)[:, None]
    c_dev = (w * (rgb - c_mean[:, None]).norm(dim=-1)).sum(1) / n.clamp_min(1)
    steady = torch.exp(-(la_std / AREA_STEADY + c_dev / COLOUR_STEADY + resid / (PATH_STEADY * size)) / 3)
    visible = ((w * contrast).sum(1) / n.clamp_min(1) / FULL_CONTRAST).clamp(0.0, 1.0)
    score = (n / t) * motion * visible * steady
    return torch.where(ok, score, torch.zeros_like(score))


@register("toyworld")
class ToyWorldReward:
    """Callable ``rm(frames uint8 [B, T, H, W, 3], prompts)
    -> {colour, shape, direction, [temporal_consistency], overall}``.

    calibration: path of a JSON file ``{"shape_prototypes": {shape: [[features], ...]}, "feature_covariance": ...}``
    measured on decoded ground-truth clips (written by ``tools/pretrain_tiny.py``); ``"auto"`` uses
    ``assets/toy_wan/toyworld_reward.json`` when it exists; ``None`` uses rendered references only.
    temporal: ``None`` or ``True`` includes the track-based ``temporal_consistency`` (T >= 3), ``"flow"`` the
    optical-flow reward ``temporal_consistency`` with motion required, ``False`` leaves it out.
    """

    def __init__(self, calibration: str | None = "auto", temporal: bool | str | None = None):
        rendered = rendered_references()
        self.prototypes: dict[str, list[list[float]]] = {s: [rendered[s]] for s in SHAPES}
        self.covariance: torch.Tensor | None = None
        path = DEFAULT_CALIBRATION if calibration == "auto" else calibration
        if path is not None and (calibration != "auto" or Path(path).exists()):
            self._load_calibration(Path(path))
        if temporal not in (None, True, False, "flow"):
            raise ValueError(f"toyworld: temporal must be None, True, False or 'flow', got {temporal!r}")
        self.temporal = temporal is not False
        self.flow = None
        if temporal == "flow":
            from reward_models.temporal import TemporalConsistency

            self.flow = TemporalConsistency(require_motion=True)

    def _load_calibration(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"toyworld reward calibration file {path} does not exist")
        data = json.loads(path.read_text())
        protos = data.get("shape_prototypes")
        if not isinstance(protos, dict) or set(protos) != set(SHAPES):
            raise ValueError(f"{path}: 'shape_prototypes' must map each of {list(SHAPES)} to feature lists")
        for s in SHAPES:
            rows = protos[s] if isinstance(protos[s][0], list) else [protos[s]]
            for r in rows:
                if len(r) != len(FEATURES):
                    raise ValueError(f"{path}: prototype for {s!r} has {len(r)} features, expected {FEATURES} "
                                     "(rewrite it with tools/pretrain_tiny.py --calibrate-only)")
            self.prototypes[s].extend(rows)
        if "feature_covariance" in data:
            cov = torch.tensor(data["feature_covariance"], dtype=torch.float32)
            if cov.shape != (len(FEATURES), len(FEATURES)) or not bool((torch.linalg.eigvalsh(cov) > 0).all()):
                raise ValueError(f"{path}: 'feature_covariance' must be a positive definite {len(FEATURES)} x "
                                 f"{len(FEATURES)} matrix")
            self.covariance = cov

    def __call__(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"toyworld reward expects frames uint8 [B, T, H, W, 3], got {frames.dtype} "
                             f"{tuple(frames.shape)}")
        b, t, h, w, _ = frames.shape
        if len(prompts) != b:
            raise ValueError(f"toyworld reward got {b} clips but {len(prompts)} prompts")
        parsed = [parse_prompt(p) for p in prompts]
        flat = frames.reshape(b * t, h, w, 3)
        mask, bg = frame_masks(flat)
        geo = mask_geometry(mask)
        present = (geo["area"] >= MIN_AREA * h * w / 4096.0).view(b, t)
        track = {k: v.view(b, t) for k, v in geo.items()}

        # Per-frame object colour: the median over the object's pixels (anti-aliased edges do not pull it).
        masked = torch.where(mask[..., None], flat.float(), torch.tensor(float("nan")))
        rgb = masked.view(b * t, h * w, 3).nanmedian(dim=1).values.nan_to_num(0.0).view(b, t, 3)
        wp = present.float()
        clip_rgb = (wp[..., None] * rgb).sum(1) / wp.sum(1).clamp_min(1.0)[:, None]
        target = torch.tensor([COLOURS[p.colour] for p in parsed], dtype=torch.float32)
        colour = colour_match(clip_rgb, target)
        colour = torch.where(present.any(1), colour, torch.zeros_like(colour))

        feats = torch.stack([geo[k] for k in FEATURES], dim=-1)
        sidx = torch.tensor([SHAPES.index(p.shape) for p in parsed])
        # The clip's shape: features averaged over the frames that show the object (one frame's decoding noise does
        # not decide it), classified once; every frame then counts with its size factor, absent frames as 0.
        clip_feats = (wp[..., None] * feats.view(b, t, -1)).sum(1) / wp.sum(1).clamp_min(1.0)[:, None]
        probs = shape_probabilities(clip_feats, self.prototypes, self.covariance)
        sized = size_factor(track["area"], [p.shape for p in parsed], w)
        shape = probs[torch.arange(b), sidx] * (sized * wp).mean(dim=1)

        out = {"colour": colour, "shape": shape}
        if t > 1:
            unit = torch.tensor([DIRECTIONS[p.direction] for p in parsed], dtype=torch.float32)
            travel = expected_displacement(t, w)
            out["direction"] = direction_scores(track["cx"], track["cy"], present, unit, travel)
            if self.temporal and t >= 3:
                if self.flow is not None:
                    out["temporal_consistency"] = self.flow(frames, prompts)["temporal_consistency"].float()
                else:
                    contrast = (rgb - bg.view(b, t, 3)).norm(dim=-1)
                    out["temporal_consistency"] = temporal_scores(track, rgb, contrast, present, travel, w)
        for k, v in out.items():
            bad = ~torch.isfinite(v)
            if bad.any():
                warnings.warn(f"toyworld reward: term {k!r} is not finite for clips {bad.nonzero().flatten().tolist()}"
                              " (reported as NaN)", RuntimeWarning, stacklevel=2)
                out[k] = torch.where(bad, torch.full_like(v, float("nan")), v)
        out["overall"] = torch.stack(list(out.values()), dim=0).mean(dim=0)
        return out
