"""The toyworld reward: ground truth scores near 1, each wrong attribute scores low on its term, direction is graded."""

import json

import cv2
import numpy as np
import pytest
import torch

import reward_models
from reward_models.toyworld import ToyWorldReward, reference_features
from video_branch.toyworld.grammar import BACKGROUND, COLOURS, SHAPES, all_prompts, parse_prompt
from video_branch.toyworld.render import render_batch, render_clip_with_params, shape_coverage

PROMPTS = [p.text for p in all_prompts()]


@pytest.fixture(scope="module")
def rm():
    return ToyWorldReward(calibration=None, temporal=False)


@pytest.fixture(scope="module", params=[32, 64], ids=["32px", "64px"])
def gt(request):
    """Ground truth at the embedded default's frame size (32) and at the size the geometry is defined at (64)."""
    return torch.from_numpy(render_batch(PROMPTS, list(range(500, 500 + len(PROMPTS))), size=request.param))


def _swap(prompt: str, position: int, mapping: dict) -> str:
    words = prompt.split()
    words[position] = mapping[words[position]]
    return " ".join(words)


def test_registered_and_built_through_registry():
    rm = reward_models.build("toyworld", calibration=None, temporal=False)
    assert isinstance(rm, ToyWorldReward)


def test_ground_truth_scores_near_one(rm, gt):
    out = rm(gt, PROMPTS)
    assert set(out) == {"colour", "shape", "direction", "overall"}
    for k, v in out.items():
        assert v.shape == (len(PROMPTS),) and torch.isfinite(v).all()
        assert v.min() > 0.9, (k, v.min())


def test_wrong_colour_scores_low_on_colour_only(rm, gt):
    colours = list(COLOURS)
    wrong = [_swap(p, 1, {c: colours[(i + 1) % len(colours)] for i, c in enumerate(colours)}) for p in PROMPTS]
    out = rm(gt, wrong)
    assert out["colour"].max() < 0.05
    assert out["shape"].min() > 0.9 and out["direction"].min() > 0.9


def test_wrong_shape_scores_low_on_shape_only(rm, gt):
    wrong = [_swap(p, 2, {s: SHAPES[(i + 1) % 3] for i, s in enumerate(SHAPES)}) for p in PROMPTS]
    out = rm(gt, wrong)
    assert out["shape"].max() < 0.05
    assert out["colour"].min() > 0.9


@pytest.mark.parametrize("mapping", [{"left": "right", "right": "left", "up": "down", "down": "up"},
                                     {"left": "up", "up": "right", "right": "down", "down": "left"}])
def test_opposite_and_perpendicular_directions_score_zero(rm, gt, mapping):
    out = rm(gt, [_swap(p, 4, mapping) for p in PROMPTS])
    assert out["direction"].max() < 1e-3
    assert out["colour"].min() > 0.9


def _clip_with_speed(prompt: str, seed: int, fraction: float) -> torch.Tensor:
    """A ground-truth clip re-rendered with its motion scaled by `fraction` around the first frame."""
    clip, params = render_clip_with_params(prompt, seed, size=64)
    p = parse_prompt(prompt)
    start = params.centres[0]
    frames = []
    for t in range(clip.shape[0]):
        cx, cy = start + fraction * (params.centres[t] - start)
        cov = shape_coverage(p.shape, cx, cy, params.half, 64)[..., None]
        img = np.asarray(BACKGROUND, np.float32) * (1 - cov) + np.asarray(COLOURS[p.colour], np.float32) * cov
        frames.append(np.rint(img).astype(np.uint8))
    return torch.from_numpy(np.stack(frames))


def test_direction_is_graded_by_travelled_distance(rm):
    prompts = ["a red circle moving left", "a blue square moving down", "a green triangle moving up"]
    for fraction in (0.0, 0.25, 0.5, 0.75):
        clips = torch.stack([_clip_with_speed(p, 7, fraction) for p in prompts])
        d = rm(clips, prompts)["direction"]
        assert torch.allclose(d, torch.full_like(d, fraction), atol=0.03), (fraction, d)


def test_single_frame_leaves_direction_out(rm, gt):
    out = rm(gt[:, :1], PROMPTS)
    assert "direction" not in out
    assert torch.allclose(out["overall"], (out["colour"] + out["shape"]) / 2)
    assert out["colour"].min() > 0.9 and out["shape"].min() > 0.9


def test_empty_clip_scores_zero_without_nan(rm):
    empty = torch.full((2, 9, 64, 64, 3), 128, dtype=torch.uint8)
    out = rm(empty, ["a red circle moving left", "a cyan square moving up"])
    for v in out.values():
        assert torch.equal(v, torch.zeros(2))


def test_overall_is_mean_of_terms(rm, gt):
    out = rm(gt[:6], PROMPTS[:6])
    assert torch.allclose(out["overall"], (out["colour"] + out["shape"] + out["direction"]) / 3)


def test_temporal_term_is_track_based_by_default_and_flow_on_request(gt):
    out = ToyWorldReward(calibration=None)(gt[:4], PROMPTS[:4])
    assert "temporal_consistency" in out and out["temporal_consistency"].min() > 0.8
    terms = [out[k] for k in ("colour", "shape", "direction", "temporal_consistency")]
    assert torch.allclose(out["overall"], torch.stack(terms).mean(0))
    flow = ToyWorldReward(calibration=None, temporal="flow")(gt[:2], PROMPTS[:2])
    expected = reward_models.build("temporal_consistency", require_motion=True)(gt[:2], PROMPTS[:2])
    assert torch.allclose(flow["temporal_consistency"], expected["temporal_consistency"].float())
    with pytest.raises(ValueError, match="temporal"):
        ToyWorldReward(calibration=None, temporal="optical")


def _rerender(prompt: str, seed: int, size: int, *, half_scale: float = 1.0, jitter: float = 0.0,
              colour=None) -> torch.Tensor:
    """A ground-truth clip drawn again from its own parameters with the object scaled, its path jittered (pixels,
    alternating sign) or its colour replaced: an independent reference for the anti-gaming tests."""
    clip, params = render_clip_with_params(prompt, seed, size=size)
    p = parse_prompt(prompt)
    rgb = np.asarray(COLOURS[p.colour] if colour is None else colour, np.float32)
    frames = []
    for t in range(clip.shape[0]):
        cx, cy = params.centres[t] + jitter * (-1) ** t
        cov = shape_coverage(p.shape, cx, cy, params.half * half_scale, size)[..., None]
        frames.append(np.rint(np.asarray(BACKGROUND, np.float32) * (1 - cov) + rgb * cov).astype(np.uint8))
    return torch.from_numpy(np.stack(frames))


def _faded(frames: torch.Tensor, keep: float) -> torch.Tensor:
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)
    return (bg + keep * (frames.float() - bg)).round().to(torch.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_faded_shrunk_and_frozen_clips_score_lower_overall(size):
    rm = ToyWorldReward(calibration=None)
    seeds = list(range(700, 700 + len(PROMPTS)))
    clean = torch.from_numpy(render_batch(PROMPTS, seeds, size=size))
    base = rm(clean, PROMPTS)["overall"]
    faded = rm(_faded(clean, 0.6), PROMPTS)
    shrunk = rm(torch.stack([_rerender(p, s, size, half_scale=0.6) for p, s in zip(PROMPTS, seeds)]), PROMPTS)
    frozen = rm(clean[:, :1].expand_as(clean).contiguous(), PROMPTS)
    for name, out in (("faded", faded), ("shrunk", shrunk), ("frozen", frozen)):
        assert (out["overall"] < base - 0.05).all(), (name, (base - out["overall"]).min())
    assert faded["colour"].max() < 0.7 and shrunk["shape"].max() < 0.8
    assert frozen["direction"].max() == 0 and frozen["temporal_consistency"].max() == 0


@pytest.mark.parametrize("prompt,off", [("a red circle moving left", (140, 75, 40)),       # brown
                                        ("a magenta square moving up", (125, 40, 160)),     # purple
                                        ("a blue triangle moving down", (105, 110, 150)),   # greyish blue
                                        ("a yellow circle moving right", (245, 150, 30))])  # orange
def test_off_palette_hues_score_low_on_colour(prompt, off):
    rm = ToyWorldReward(calibration=None, temporal=False)
    clips = torch.stack([_rerender(prompt, 3, 32), _rerender(prompt, 3, 32, colour=off)])
    colour = rm(clips, [prompt, prompt])["colour"]
    assert colour[0] > 0.95 and colour[1] < 0.5, colour


def test_temporal_prefers_the_moving_crisp_clip():
    rm = ToyWorldReward(calibration=None)
    prompts = PROMPTS[::6]
    seeds = list(range(40, 40 + len(prompts)))
    clean = torch.from_numpy(render_batch(prompts, seeds, size=32))
    tc = rm(clean, prompts)["temporal_consistency"]
    faint = rm(_faded(clean, 0.45), prompts)["temporal_consistency"]
    frozen = rm(clean[:, :1].expand_as(clean).contiguous(), prompts)["temporal_consistency"]
    jittered = rm(torch.stack([_rerender(p, s, 32, jitter=2.0) for p, s in zip(prompts, seeds)]), prompts)
    flicker = clean.clone()
    flicker[:, 1::2] = _faded(clean[:, 1::2], 0.55)
    flickering = rm(flicker, prompts)["temporal_consistency"]
    assert (faint <= tc + 1e-6).all() and (frozen == 0).all()
    assert (jittered["temporal_consistency"] < tc - 0.1).all()
    assert (flickering < tc - 0.1).all()


def test_unparseable_prompt_raises_naming_it(rm, gt):
    with pytest.raises(ValueError, match="a red blob moving left"):
        rm(gt[:1], ["a red blob moving left"])
    with pytest.raises(ValueError, match="jumping"):
        rm(gt[:1], ["a red circle jumping"])


def test_bad_frames_raise(rm, gt):
    with pytest.raises(ValueError, match="uint8"):
        rm(gt.float(), PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        rm(gt[:2], PROMPTS[:3])


def _blur(frames: torch.Tensor) -> torch.Tensor:
    size = frames.shape[-2]
    arr = frames.numpy().reshape(-1, size, size, 3)
    out = np.stack([cv2.GaussianBlur(f, (0, 0), 1.6 * size / 64) for f in arr])
    return torch.from_numpy(out).view_as(frames)


def test_calibration_on_degraded_clips_restores_shape_scores(rm, gt, tmp_path):
    # Blurring rounds corners as VAE decoding does; references measured on blurred ground truth fix the shape term.
    blurred = _blur(gt)
    parsed = [parse_prompt(p) for p in PROMPTS]
    ref = reference_features(blurred, parsed)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"shape_prototypes": {s: [ref[s]] for s in SHAPES}}))
    calibrated = ToyWorldReward(calibration=str(path), temporal=False)
    test = _blur(torch.from_numpy(render_batch(PROMPTS, list(range(900, 900 + len(PROMPTS))), size=gt.shape[-2])))
    before = rm(test, PROMPTS)["shape"].mean()
    after = calibrated(test, PROMPTS)["shape"].mean()
    assert after > 0.9 and after > before


def test_bad_calibration_file_raises(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"shape_prototypes": {"circle": [[0.1, 0.2, 0.3]]}}))
    with pytest.raises(ValueError, match="shape_prototypes"):
        ToyWorldReward(calibration=str(path), temporal=False)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ToyWorldReward(calibration=str(tmp_path / "missing.json"), temporal=False)
