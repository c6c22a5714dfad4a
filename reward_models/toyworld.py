"""``toyworld``: a verifiable reward for the embedded toy world, computed from decoded frames alone.

For a prompt "a <colour> <shape> moving <direction>" and frames uint8 ``[B, T, H, W, 3]`` it returns, per clip:

- ``colour``: the probability of the prompt's colour under a soft nearest-palette rule applied to the mean colour of
  the object's pixels (the largest connected region of pixels far from the background colour, which is the median
  of the frame's border);
- ``shape``: per frame, a kernel classifier over three mask features (bounding-box fill, share of the mask in the
  top half of its box, fill of the box's corners) against reference features of each shape, averaged over frames; a
  frame without an object scores 0. References are measured on rendered ground-truth clips at construction time and,
  when a calibration file is given (or ``assets/toy_wan/toyworld_reward.json`` exists), also on ground-truth clips
  passed through the shipped VAE, whose decoding rounds corners;
- ``direction`` (T > 1 only): the object centroid's least-squares velocity over the frames where it is visible,
  projected on the prompt's direction and divided by the ground-truth travel, clipped to [0, 1]. Full travel the
  right way scores 1, half the travel 0.5, standing still, perpendicular or backwards motion 0: a graded signal;
- ``temporal_consistency`` when ``reward_models.temporal`` is importable (see ``temporal`` below);
- ``overall``: the mean of the terms above that apply. For single frames (T == 1) direction does not apply and is
  left out of the result and of ``overall``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from reward_models.registry import register
from video_branch.toyworld.grammar import COLOURS, DIRECTIONS, SHAPES, Prompt, all_prompts, parse_prompt
from video_branch.toyworld.render import expected_displacement, render_batch

FEATURES = ("fill", "top_share", "corner_fill")
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "assets" / "toy_wan" / "toyworld_reward.json"
# Pixels this far (RGB euclidean, 0-255) from the background belong to the object; every palette colour is > 140 away.
MASK_THRESHOLD = 60.0
# Frames whose object covers fewer pixels than this (at 64x64) have no object.
MIN_AREA = 12.0
COLOUR_SIGMA = 30.0
SHAPE_SIGMA = 0.08


def frame_masks(frames: torch.Tensor) -> torch.Tensor:
    """Object masks: frames uint8 [N, H, W, 3] -> bool [N, H, W].

    Pixels far from the border's median colour, reduced to their largest 8-connected component: stray pixels that
    decoding leaves elsewhere would otherwise stretch the bounding box and pull the centroid.
    """
    x = frames.float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], dim=1)  # [N, 4(H-1), 3]
    bg = border.median(dim=1).values  # [N, 3]
    raw = ((x - bg[:, None, None, :]).norm(dim=-1) > MASK_THRESHOLD).numpy().astype(np.uint8)
    out = np.zeros_like(raw)
    for i, m in enumerate(raw):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 1:
            out[i] = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return torch.from_numpy(out.astype(bool))


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
    empty = area == 0
    feats = [torch.where(empty, torch.zeros_like(f), f) for f in (fill, top_share, corner_fill)]
    return {"area": area, "cx": cx, "cy": cy, "fill": feats[0], "top_share": feats[1], "corner_fill": feats[2]}


def shape_features(frames: torch.Tensor) -> torch.Tensor:
    """frames uint8 [N, H, W, 3] -> features float [N, len(FEATURES)]."""
    g = mask_geometry(frame_masks(frames))
    return torch.stack([g[k] for k in FEATURES], dim=-1)


def reference_features(frames: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, list[float]]:
    """Mean shape features per shape over clips [B, T, H, W, 3] of known prompts (for calibration)."""
    b, t = frames.shape[:2]
    feats = shape_features(frames.reshape(b * t, *frames.shape[2:])).view(b, t, -1)
    out = {}
    for s in SHAPES:
        idx = [i for i, p in enumerate(prompts) if p.shape == s]
        if not idx:
            raise ValueError(f"reference_features: no clip of shape {s!r} among the {b} clips given")
        out[s] = feats[idx].reshape(-1, feats.shape[-1]).mean(dim=0).tolist()
    return out


def rendered_references(num_frames: int = 9, size: int = 64, clips_per_prompt: int = 1) -> dict[str, list[float]]:
    prompts = [p for p in all_prompts() for _ in range(clips_per_prompt)]
    frames = torch.from_numpy(render_batch(prompts, list(range(len(prompts))), num_frames, size))
    return reference_features(frames, prompts)


def shape_probabilities(feats: torch.Tensor, prototypes: dict[str, list[list[float]]]) -> torch.Tensor:
    """Kernel classifier: feats [N, F] -> probabilities [N, len(SHAPES)] (rows sum to 1)."""
    kernels = []
    for s in SHAPES:
        protos = torch.tensor(prototypes[s], dtype=torch.float32).view(-1, feats.shape[-1])  # [P, F]
        d2 = ((feats[:, None, :] - protos[None]) ** 2).sum(-1)  # [N, P]
        kernels.append(torch.exp(-d2 / (2 * SHAPE_SIGMA**2)).sum(-1))
    k = torch.stack(kernels, dim=-1) + 1e-12
    return k / k.sum(dim=-1, keepdim=True)


def colour_probabilities(rgb: torch.Tensor) -> torch.Tensor:
    """Soft nearest palette colour: rgb float [N, 3] (0-255) -> probabilities [N, len(COLOURS)]."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    d2 = ((rgb[:, None, :] - palette[None]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * COLOUR_SIGMA**2), dim=-1)


def direction_scores(cx: torch.Tensor, cy: torch.Tensor, present: torch.Tensor, unit: torch.Tensor,
                     travel: float) -> torch.Tensor:
    """Graded direction term.

    cx, cy: centroids float [B, T]; present: bool [B, T] (object visible); unit: [B, 2] prompt direction (x right,
    y down); travel: ground-truth displacement from first to last frame in pixels. Returns [B] in [0, 1]: the
    least-squares velocity over visible frames times (T - 1), projected on ``unit``, over ``travel``; 0 when fewer
    than two frames show the object.
    """
    b, t = cx.shape
    w = present.float()
    n = w.sum(dim=1)
    tt = torch.arange(t, dtype=torch.float32).expand(b, t)
    tmean = (w * tt).sum(1) / n.clamp_min(1)
    dt = (tt - tmean[:, None]) * w
    var = (dt * dt).sum(1)
    vel = []
    for c in (cx, cy):
        cmean = (w * c).sum(1) / n.clamp_min(1)
        vel.append((dt * (c - cmean[:, None])).sum(1) / var.clamp_min(1e-8))
    disp = torch.stack(vel, dim=-1) * (t - 1)  # [B, 2]
    score = ((disp * unit).sum(-1) / travel).clamp(0.0, 1.0)
    return torch.where((n >= 2) & (var > 0), score, torch.zeros_like(score))


@register("toyworld")
class ToyWorldReward:
    """Callable ``rm(frames uint8 [B, T, H, W, 3], prompts)
    -> {colour, shape, direction, [temporal_consistency], overall}``.

    calibration: path of a JSON file ``{"shape_prototypes": {shape: [[features], ...]}}`` measured on decoded
    ground-truth clips (written by ``tools/pretrain_tiny.py``); ``"auto"`` uses ``assets/toy_wan/toyworld_reward.json``
    when it exists; ``None`` uses rendered references only.
    temporal: ``None`` includes ``temporal_consistency`` when ``reward_models.temporal`` is importable, ``True``
    requires it, ``False`` leaves it out.
    """

    def __init__(self, calibration: str | None = "auto", temporal: bool | None = None):
        rendered = rendered_references()
        self.prototypes: dict[str, list[list[float]]] = {s: [rendered[s]] for s in SHAPES}
        path = DEFAULT_CALIBRATION if calibration == "auto" else calibration
        if path is not None and (calibration != "auto" or Path(path).exists()):
            self._load_calibration(Path(path))
        self.temporal = self._build_temporal(temporal)

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
                    raise ValueError(f"{path}: prototype for {s!r} has {len(r)} features, expected {FEATURES}")
            self.prototypes[s].extend(rows)

    @staticmethod
    def _build_temporal(temporal: bool | None):
        if temporal is False:
            return None
        try:
            import reward_models.temporal  # noqa: F401  (registers temporal_consistency)
        except ModuleNotFoundError as e:
            if temporal:
                raise ModuleNotFoundError(f"toyworld(temporal=True) needs reward_models.temporal: {e}") from e
            return None
        from reward_models.registry import build

        return build("temporal_consistency")

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
        mask = frame_masks(flat)
        geo = mask_geometry(mask)
        present = (geo["area"] >= MIN_AREA * h * w / 4096.0).view(b, t)

        pix = (flat.float() * mask[..., None].float()).sum(dim=(1, 2)).view(b, t, 3)
        area = geo["area"].view(b, t)
        rgb = pix.sum(1) / area.sum(1).clamp_min(1.0)[:, None]
        cidx = torch.tensor([list(COLOURS).index(p.colour) for p in parsed])
        colour = colour_probabilities(rgb)[torch.arange(b), cidx]
        colour = torch.where(present.any(1), colour, torch.zeros_like(colour))

        feats = torch.stack([geo[k] for k in FEATURES], dim=-1)
        sidx = torch.tensor([SHAPES.index(p.shape) for p in parsed])
        probs = shape_probabilities(feats, self.prototypes).view(b, t, -1)
        per_frame = probs[torch.arange(b), :, sidx] * present.float()
        shape = per_frame.mean(dim=1)

        out = {"colour": colour, "shape": shape}
        if t > 1:
            unit = torch.tensor([DIRECTIONS[p.direction] for p in parsed], dtype=torch.float32)
            travel = expected_displacement(t, w)
            out["direction"] = direction_scores(geo["cx"].view(b, t), geo["cy"].view(b, t), present, unit, travel)
            if self.temporal is not None:
                tc = self.temporal(frames, prompts)["temporal_consistency"].float()
                out["temporal_consistency"] = tc
        out["overall"] = torch.stack(list(out.values()), dim=0).mean(dim=0)
        return out

