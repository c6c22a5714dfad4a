"""Held-out evaluation of a toy-world model: generate with a fixed seed list, score with ``toyworld``, mean + 95% CI.

    python -m video_branch.toyworld.evaluate --model assets/toy_wan --prompts assets/prompts/heldout.txt

Clip i of prompt p uses seed ``seed + 1000 * p + i``, so a number is reproducible and comparable across models.
The prompt set is fixed, not sampled, so the confidence interval is the stratified one: clips are independent
within a prompt, and the standard error of the mean over prompts is ``sqrt(sum_p s_p^2 / n_p) / P``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .generate import generate, native_text_length
from .grammar import read_prompt_file
from .render import DEFAULT_FRAMES, DEFAULT_SIZE

Z95 = 1.959963984540054


def stratified_mean_ci(values: torch.Tensor, groups: Sequence[int]) -> dict[str, float]:
    """values [N], groups N group ids (each with >= 2 members) -> {mean, ci95, se}.

    mean is the mean of the group means; se = sqrt(sum_g var_g / n_g) / G with the unbiased within-group variance.
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    ids = sorted(set(groups))
    if len(values) != len(groups):
        raise ValueError(f"stratified_mean_ci: {len(values)} values but {len(groups)} group ids")
    means, var_terms = [], []
    for g in ids:
        v = values[[i for i, x in enumerate(groups) if x == g]]
        if len(v) < 2:
            raise ValueError(f"stratified_mean_ci: group {g!r} has {len(v)} value(s); need at least 2")
        means.append(v.mean())
        var_terms.append(v.var(unbiased=True) / len(v))
    se = math.sqrt(float(sum(var_terms))) / len(ids)
    return {"mean": float(torch.stack(means).mean()), "ci95": Z95 * se, "se": se}


def evaluate(pipe, reward, prompts: list[str], clips_per_prompt: int = 8, seed: int = 0,
             num_inference_steps: int = 20, guidance_scale: float = 4.0, num_frames: int = DEFAULT_FRAMES,
             size: int = DEFAULT_SIZE, max_sequence_length: int = 512) -> dict[str, dict[str, float]]:
    """Generate ``clips_per_prompt`` clips per prompt, score them, and summarise each reward term."""
    flat = [p for p in prompts for _ in range(clips_per_prompt)]
    groups = [i for i in range(len(prompts)) for _ in range(clips_per_prompt)]
    seeds = [seed + 1000 * g + i for g in range(len(prompts)) for i in range(clips_per_prompt)]
    frames = generate(pipe, flat, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      num_frames=num_frames, size=size, max_sequence_length=max_sequence_length)
    scores = reward(frames, flat)
    return {k: stratified_mean_ci(v, groups) for k, v in scores.items()}


def native_clip(model: str) -> tuple[int, int]:
    """(num_frames, size) a toy-world model was pretrained on, from its ``pretrain_log.json`` (written by
    ``tools/pretrain_tiny.py``); the toy world's defaults when the directory has no log."""
    log = Path(model) / "pretrain_log.json"
    if not log.exists():
        return DEFAULT_FRAMES, DEFAULT_SIZE
    try:
        args = json.loads(log.read_text())["args"]
        return int(args["frames"]), int(args["size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{log}: expected a JSON object with args.frames and args.size ({e})") from e


def load_pipeline(model: str):
    """``WanPipeline.from_pretrained`` on a local directory (importing this package registers ToyVAE first)."""
    from diffusers import WanPipeline

    import video_branch.toyworld  # noqa: F401

    if not (Path(model) / "model_index.json").exists():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
    return WanPipeline.from_pretrained(model, local_files_only=True)


def main(argv=None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/toy_wan")
    ap.add_argument("--prompts", default="assets/prompts/heldout.txt")
    ap.add_argument("--clips-per-prompt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="Euler steps (the scheduler's shift is the model's, 3)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's, see --size)")
    ap.add_argument("--size", type=int, default=None,
                    help="frame height and width (default: the model's, from its pretrain_log.json, else 32)")
    ap.add_argument("--temporal", choices=["auto", "on", "flow", "off"], default="auto",
                    help="temporal_consistency in overall: auto/on the reward's track-based term, flow the "
                         "optical-flow reward (motion required), off none")
    ap.add_argument("--calibration", default=None,
                    help="reward calibration JSON (default: <model>/toyworld_reward.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from reward_models.toyworld import ToyWorldReward

    calibration = args.calibration or str(Path(args.model) / "toyworld_reward.json")
    if not Path(calibration).exists():
        calibration = None
    modes = {"auto": None, "on": True, "flow": "flow", "off": False}
    reward = ToyWorldReward(calibration=calibration, temporal=modes[args.temporal])
    pipe = load_pipeline(args.model)
    prompts = read_prompt_file(args.prompts)
    t0 = time.time()
    frames, size = native_clip(args.model)
    args.frames = args.frames or frames
    args.size = args.size or size
    summary = evaluate(pipe, reward, prompts, args.clips_per_prompt, args.seed, args.steps, args.guidance,
                       args.frames, args.size, native_text_length(args.model))
    n = len(prompts) * args.clips_per_prompt
    print(f"{args.model} on {args.prompts}: {n} clips of {args.frames} x {args.size}x{args.size}, {args.steps} Euler "
          f"steps, guidance {args.guidance} ({time.time() - t0:.1f} s)")
    for k, s in summary.items():
        print(f"  {k:22s} {s['mean']:.3f} +- {s['ci95']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "clips": n, "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
