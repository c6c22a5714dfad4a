"""tools/judge_toyworld.py: an independent 0/1 judge of toy-world clips (its own palette, foreground and rules)."""

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from video_branch.toyworld.grammar import BACKGROUND, COLOURS, SHAPES, all_prompts, parse_prompt
from video_branch.toyworld.render import render_batch, render_clip_with_params, shape_coverage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import judge_toyworld as J  # noqa: E402

PROMPTS = [p.text for p in all_prompts()]


def _swap(prompt: str, position: int, mapping: dict) -> str:
    words = prompt.split()
    words[position] = mapping[words[position]]
    return " ".join(words)


def test_does_not_import_the_project_reward():
    tree = ast.parse((ROOT / "tools" / "judge_toyworld.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names and not any(n.startswith("reward_models") for n in names), names


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_scores_one_and_wrong_words_zero(size):
    gt = render_batch(PROMPTS, list(range(300, 300 + len(PROMPTS))), size=size)
    out = J.judge(gt, PROMPTS)
    for k in J.TERMS:
        assert out[k].min() == 1.0, k
    colours = list(COLOURS)
    wrong_colour = [_swap(p, 1, {c: colours[(i + 1) % 6] for i, c in enumerate(colours)}) for p in PROMPTS]
    assert J.judge(gt, wrong_colour)["colour"].max() == 0.0
    wrong_shape = [_swap(p, 2, {s: SHAPES[(i + 1) % 3] for i, s in enumerate(SHAPES)}) for p in PROMPTS]
    assert J.judge(gt, wrong_shape)["shape"].max() == 0.0
    backwards = [_swap(p, 4, {"left": "right", "right": "left", "up": "down", "down": "up"}) for p in PROMPTS]
    assert J.judge(gt, backwards)["direction"].max() == 0.0


def test_faded_and_off_palette_objects_lose_colour_and_frozen_ones_direction():
    gt = render_batch(PROMPTS[:24], list(range(24)), size=32)
    bg = np.asarray(BACKGROUND, np.float32)
    faded = np.rint(bg + 0.35 * (gt.astype(np.float32) - bg)).astype(np.uint8)
    assert J.judge(faded, PROMPTS[:24])["colour"].mean() < 0.2
    frozen = np.repeat(gt[:, :1], gt.shape[1], axis=1)
    assert J.judge(frozen, PROMPTS[:24])["direction"].max() == 0.0
    # A red circle drawn brown is judged brown.
    clip, params = render_clip_with_params("a red circle moving left", 0, size=32)
    brown = []
    for t in range(clip.shape[0]):
        cov = shape_coverage("circle", *params.centres[t], params.half, 32)[..., None]
        brown.append(np.rint(bg * (1 - cov) + np.array([140, 78, 38], np.float32) * cov).astype(np.uint8))
    assert J.judge(np.stack(brown)[None], ["a red circle moving left"])["colour"][0] == 0.0


def test_empty_clip_scores_zero():
    empty = np.full((1, 9, 32, 32, 3), 128, np.uint8)
    out = J.judge(empty, ["a red circle moving left"])
    assert all(out[k][0] == 0.0 for k in J.TERMS)


def test_stratified_interval_by_hand():
    vals = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    out = J.stratified(vals, groups)
    # both groups: mean 2/3, variance 1/3 over 3 clips -> se = sqrt(2 * (1/3) / 3) / 2
    assert out["mean"] == pytest.approx(2 / 3)
    assert out["ci95"] == pytest.approx(1.959964 * math.sqrt(2 / 9) / 2, rel=1e-5)


def test_judge_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        J.judge(np.zeros((1, 9, 32, 32, 3), np.float32), ["a red circle moving left"])
    with pytest.raises(ValueError, match="a red blob"):
        J.judge(np.zeros((1, 9, 32, 32, 3), np.uint8), ["a red blob moving left"])


def test_cli_compares_two_models_on_the_same_seeds(tmp_path):
    from video_branch.models.tiny import build_tiny_wan
    from video_branch.toyworld import ToyVAE
    from video_branch.toyworld.grammar import vocabulary

    vae = ToyVAE(channels=(8, 8), latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    build_tiny_wan(tmp_path / "m", vocab=vocabulary(), vae=vae)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    report = J.main(["--base", str(tmp_path / "m"), "--tuned", str(tmp_path / "m"), "--prompts", str(prompts),
                     "--clips-per-prompt", "2", "--steps", "2", "--json", str(tmp_path / "j.json")])
    assert report["clips"] == 4 and (tmp_path / "j.json").exists()
    for k in J.TERMS:  # the same model on the same seeds: exactly no gain
        assert report["paired_gain"][k] == {"mean": 0.0, "ci95": 0.0}
    assert parse_prompt("a red circle moving left")
