"""Procedural clips: one filled shape of one colour moving in a straight line on a plain (or lightly textured) ground.

Everything is deterministic from a seed. Geometry is defined at 64x64 and scaled with the frame size; edges are
anti-aliased by 4x4 supersampling so that the VAE sees smooth, learnable boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .grammar import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, Prompt, parse_prompt

# At 64 px: half-extent of every shape (its bounding box is 2*HALF wide), and motion per frame.
HALF_RANGE = (13.0, 15.0)
SPEED = 3.0
SUPERSAMPLE = 4
# Frame size of the embedded default (assets/toy_wan): 9 frames of 32x32, a latent of 16 x 3 x 4 x 4 numbers.
DEFAULT_SIZE = 32
DEFAULT_FRAMES = 9


@dataclass(frozen=True)
class ClipParams:
    centres: np.ndarray  # [T, 2] (x, y) in pixels
    half: float
    prompt: Prompt


def expected_displacement(num_frames: int, size: int = 64) -> float:
    """Distance in pixels the object travels from the first to the last frame of a ground-truth clip."""
    return SPEED * (num_frames - 1) * size / 64.0


def sample_params(prompt: Prompt, rng: np.random.Generator, num_frames: int, size: int) -> ClipParams:
    scale = size / 64.0
    half = float(rng.uniform(*HALF_RANGE)) * scale
    travel = expected_displacement(num_frames, size)
    lo, hi = half + 1.0, size - 1.0 - half
    if hi - lo < travel:
        raise ValueError(f"frame size {size} is too small for {num_frames} frames of motion ({travel:.1f} px)")
    dx, dy = DIRECTIONS[prompt.direction]
    # The start is drawn where the whole path stays inside the frame: objects moving left start on the right.
    along = float(rng.uniform(lo, hi - travel))
    across = float(rng.uniform(lo, hi))
    if dx != 0:
        x0 = along if dx > 0 else size - along
        start = np.array([x0, across])
    else:
        y0 = along if dy > 0 else size - along
        start = np.array([across, y0])
    step = SPEED * scale * np.array([dx, dy], dtype=np.float64)
    centres = start[None, :] + np.arange(num_frames)[:, None] * step[None, :]
    return ClipParams(centres=centres, half=half, prompt=prompt)


def shape_coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, [size, size] float32 in [0, 1]."""
    n = SUPERSAMPLE
    offs = (np.arange(n) + 0.5) / n
    coords = (np.arange(size)[:, None] + offs[None, :]).reshape(-1)
    xs = coords[None, :] - cx
    ys = coords[:, None] - cy
    if shape == "circle":
        inside = xs**2 + ys**2 <= half**2
    elif shape == "square":
        inside = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "triangle":
        # Apex up, base down, bounding box 2*half x 2*half centred on (cx, cy).
        t = (ys + half) / (2 * half)
        inside = (t >= 0) & (t <= 1) & (np.abs(xs) <= half * t)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return inside.reshape(size, n, size, n).mean(axis=(1, 3)).astype(np.float32)


def background_image(size: int, texture: str, rng: np.random.Generator) -> np.ndarray:
    base = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (size, size, 3)).copy()
    if texture == "plain":
        return base
    if texture == "noise":
        # Low-amplitude, low-frequency texture: visible but far from every shape colour.
        coarse = rng.normal(0.0, 6.0, size=(size // 8, size // 8, 1)).astype(np.float32)
        return base + np.kron(coarse, np.ones((8, 8, 1), np.float32))
    raise ValueError(f"unknown background {texture!r}; expected 'plain' or 'noise'")


def render_clip(
    prompt: str | Prompt, seed: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    background: str = "plain",
) -> np.ndarray:
    """One clip, uint8 [T, H, W, 3], deterministic from (prompt, seed, num_frames, size, background)."""
    clip, _ = render_clip_with_params(prompt, seed, num_frames, size, background)
    return clip


def render_clip_with_params(
    prompt: str | Prompt, seed: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    background: str = "plain",
) -> tuple[np.ndarray, ClipParams]:
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    rng = np.random.default_rng(seed)
    params = sample_params(prompt, rng, max(num_frames, 9), size) if num_frames == 1 else sample_params(
        prompt, rng, num_frames, size
    )
    bg = background_image(size, background, rng)
    colour = np.asarray(COLOURS[prompt.colour], np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        cov = shape_coverage(prompt.shape, params.centres[t, 0], params.centres[t, 1], params.half, size)[..., None]
        frames[t] = np.clip(np.rint(bg * (1 - cov) + colour * cov), 0, 255).astype(np.uint8)
    return frames, ClipParams(params.centres[:num_frames], params.half, prompt)


def render_batch(
    prompts: Sequence[str | Prompt], seeds: Sequence[int], num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
    background: str = "plain",
) -> np.ndarray:
    """uint8 [B, T, H, W, 3]: ``render_clip`` for each (prompt, seed) pair."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    return np.stack([render_clip(p, int(s), num_frames, size, background) for p, s in zip(prompts, seeds)])


def random_prompts(pool: Sequence[Prompt], n: int, seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]
