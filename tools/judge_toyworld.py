"""An independent judge of toy-world models: different definitions from the project's ``toyworld`` reward.

    python tools/judge_toyworld.py --base assets/toy_wan --tuned runs/demo/final --json runs/demo/judge.json

It generates the same prompts with the same fresh seeds from both models (by default 16 clips for each held-out
prompt, seeds 777000 + 1000 p + i, which the project's evaluation never uses) and scores every clip 0 or 1 on:

- ``colour``: the nearest of 14 named colours (``NAMED``: the six prompt colours and grey, brown, purple, pink,
  orange, white, black, teal) to the median colour of the foreground pixels of the whole clip is the prompt's;
- ``shape``: the median over frames of the foreground's bounding-box fill is nearest the prompt shape's ideal fill
  (triangle 1/2, circle pi/4, square 1);
- ``direction``: the centroid path (mean of the last three frames minus mean of the first three) points along the
  prompt's direction (its dominant axis and sign) and covers at least a quarter of the world's travel;
- ``overall``: the mean of the three.

The foreground is every pixel more than ``FG_THRESHOLD`` (RGB distance) from the frame's border median, with no
connected-component step; a frame with fewer than ``MIN_PIXELS`` such pixels shows nothing, and a clip that shows
nothing in any frame scores 0 on every term. It imports nothing from ``reward_models``: the only shared code is
sampling (``video_branch.toyworld.generate``) and the prompt grammar.

The report gives each model's mean per term and the paired difference (tuned - base, clip by clip) with its 95%
interval, stratified by prompt (clips are independent within a prompt; the prompt set is fixed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from video_branch.toyworld.grammar import DIRECTIONS, parse_prompt, read_prompt_file  # noqa: E402

NAMED: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 185, 50), "blue": (30, 70, 235), "yellow": (240, 220, 30),
    "cyan": (30, 215, 225), "magenta": (220, 40, 210), "grey": (128, 128, 128), "brown": (135, 80, 35),
    "purple": (120, 40, 165), "pink": (245, 150, 195), "orange": (245, 140, 20), "white": (245, 245, 245),
    "black": (15, 15, 15), "teal": (20, 130, 130),
}
IDEAL_FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}
FG_THRESHOLD = 50.0
MIN_PIXELS = 6
# The world's travel over a clip: 3 px per frame at 64 px, scaled with the frame side.
TRAVEL_PER_FRAME_AT_64 = 3.0
MIN_TRAVEL_SHARE = 0.25
TERMS = ("colour", "shape", "direction", "overall")
Z95 = 1.959963984540054


def foreground(clip: np.ndarray) -> np.ndarray:
    """clip uint8 [T, H, W, 3] -> bool [T, H, W]: pixels far from each frame's border median."""
    x = clip.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    bg = np.median(border, axis=1)  # [T, 3]
    return np.linalg.norm(x - bg[:, None, None, :], axis=-1) > FG_THRESHOLD


def judge_clip(clip: np.ndarray, prompt: str) -> dict[str, float]:
    """0/1 scores of one clip uint8 [T, H, W, 3] for ``prompt``."""
    p = parse_prompt(prompt)
    fg = foreground(clip)
    t, h, w = fg.shape
    shown = fg.reshape(t, -1).sum(1) >= MIN_PIXELS
    if not shown.any():
        return {k: 0.0 for k in TERMS}
    pix = clip[fg & shown[:, None, None]].astype(np.float32)
    rgb = np.median(pix, axis=0)
    names = list(NAMED)
    nearest = names[int(np.argmin([np.linalg.norm(rgb - np.asarray(NAMED[n])) for n in names]))]
    fills, cents = [], []
    for i in np.nonzero(shown)[0]:
        ys, xs = np.nonzero(fg[i])
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        fills.append(len(xs) / box)
        cents.append((xs.mean(), ys.mean()))
    fill = float(np.median(fills))
    shape = min(IDEAL_FILL, key=lambda s: abs(IDEAL_FILL[s] - fill))
    cents = np.asarray(cents)
    k = min(3, len(cents) // 2)
    direction = 0.0
    if k >= 1:
        disp = cents[-k:].mean(0) - cents[:k].mean(0)
        ux, uy = DIRECTIONS[p.direction]
        along = disp[0] * ux + disp[1] * uy
        across = abs(disp[0] * uy) + abs(disp[1] * ux)
        travel = TRAVEL_PER_FRAME_AT_64 * (t - 1) * w / 64.0
        direction = float(along > across and along >= MIN_TRAVEL_SHARE * travel)
    out = {"colour": float(nearest == p.colour), "shape": float(shape == p.shape), "direction": direction}
    out["overall"] = (out["colour"] + out["shape"] + out["direction"]) / 3
    return out


def judge(frames: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """frames uint8 [B, T, H, W, 3] -> {term: float [B]}."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[-1] != 3 or len(arr) != len(prompts):
        raise ValueError(f"judge: expected uint8 [B, T, H, W, 3] with one prompt per clip, got {arr.dtype} "
                         f"{arr.shape} and {len(prompts)} prompts")
    rows = [judge_clip(c, p) for c, p in zip(arr, prompts)]
    return {k: np.array([r[k] for r in rows]) for k in TERMS}


def stratified(values: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Mean of group means and its 95% half-width, sqrt(sum_g var_g / n_g) / G (unbiased within-group variance)."""
    ids = np.unique(groups)
    means = [values[groups == g].mean() for g in ids]
    var = sum(values[groups == g].var(ddof=1) / (groups == g).sum() for g in ids)
    se = math.sqrt(var) / len(ids)
    return {"mean": float(np.mean(means)), "ci95": Z95 * se}


def load(model: str):
    from diffusers import WanPipeline

    import video_branch.toyworld  # noqa: F401  (registers ToyVAE for the loader)

    if not (Path(model) / "model_index.json").exists():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
    return WanPipeline.from_pretrained(model, local_files_only=True)


def native_size(model: str) -> tuple[int, int]:
    log = Path(model) / "pretrain_log.json"
    if log.exists():
        a = json.loads(log.read_text())["args"]
        return int(a["frames"]), int(a["size"])
    return 9, 32


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="assets/toy_wan", help="model directory before tuning")
    ap.add_argument("--tuned", default=None, help="model directory after tuning (omit to judge --base alone)")
    ap.add_argument("--prompts", default="assets/prompts/heldout.txt")
    ap.add_argument("--clips-per-prompt", type=int, default=16)
    ap.add_argument("--seed", type=int, default=777_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from video_branch.toyworld.generate import generate, native_text_length

    prompts = read_prompt_file(args.prompts)
    flat = [p for p in prompts for _ in range(args.clips_per_prompt)]
    groups = np.array([g for g in range(len(prompts)) for _ in range(args.clips_per_prompt)])
    seeds = [args.seed + 1000 * g + i for g in range(len(prompts)) for i in range(args.clips_per_prompt)]
    frames, size = native_size(args.base)
    frames, size = args.frames or frames, args.size or size
    models = {"base": args.base} | ({"tuned": args.tuned} if args.tuned else {})
    scores, t0 = {}, time.time()
    for name, path in models.items():
        clips = generate(load(path), flat, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                         num_frames=frames, size=size, max_sequence_length=native_text_length(path))
        scores[name] = judge(clips.numpy(), flat)
    report = {"args": vars(args), "clips": len(flat),
              "models": {n: {k: stratified(v[k], groups) for k in TERMS} for n, v in scores.items()}}
    if args.tuned:
        report["paired_gain"] = {k: stratified(scores["tuned"][k] - scores["base"][k], groups) for k in TERMS}
    print(f"judge on {args.prompts}: {len(flat)} clips per model, seeds from {args.seed} ({time.time() - t0:.0f} s)")
    for k in TERMS:
        line = "  ".join(f"{n} {report['models'][n][k]['mean']:.3f}" for n in models)
        if args.tuned:
            g = report["paired_gain"][k]
            line += f"  gain {g['mean']:+.3f} +- {g['ci95']:.3f}"
        print(f"  {k:10s} {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
