import math

import cv2
import numpy as np
import pytest
import torch

import reward_models
from reward_models.temporal import KEYS, fb_masks


def _texture(h=64, w=96, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 1.5)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _pan(frames=16, seed=0, offsets=None):
    """A 64x64 window sliding over a textured image: 1 pixel per frame unless offsets are given."""
    tex = _texture(seed=seed)
    offsets = range(frames) if offsets is None else offsets
    return np.stack([tex[:, x:x + 64] for x in offsets])


def _score(clips, **options):
    rm = reward_models.build("temporal_consistency", **options)
    return rm(torch.from_numpy(np.stack(clips)), [""] * len(clips))


def test_acceptance_pan_beats_shuffled_noisy_and_static():
    pan = _pan()
    shuffled = pan[np.random.default_rng(1).permutation(len(pan))]
    noisy = np.clip(pan + np.random.default_rng(2).normal(0, 20, pan.shape), 0, 255).astype(np.uint8)
    static = np.repeat(pan[:1], len(pan), axis=0)
    out = _score([pan, shuffled, noisy, static])
    overall = out["temporal_consistency"]
    assert overall[0] > overall[1] + 0.3
    assert overall[0] > overall[2] + 0.1
    assert overall[3] < overall[0] - 0.5
    for k in KEYS:
        assert out[k].shape == (4,)
        assert torch.all((out[k] >= 0) & (out[k] <= 1)), k


def test_static_clip_is_perfectly_consistent_but_gated_by_motion():
    static = np.repeat(_pan(1), 8, axis=0)
    gated = _score([static])
    free = _score([static], require_motion=False)
    # Identical frames: zero flow, zero residual, so every consistency term is exactly 1 ...
    for k in ("warp", "flicker", "smoothness"):
        assert gated[k][0].item() == pytest.approx(1.0, abs=1e-6)
    assert gated["dynamic"][0].item() == pytest.approx(0.0, abs=1e-6)
    # ... and only the motion requirement pulls the overall score down.
    assert gated["temporal_consistency"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert free["temporal_consistency"][0].item() == pytest.approx(1.0, abs=1e-6)


def test_dynamic_degree_matches_the_pan_speed():
    out = _score([_pan(9)], motion_scale=0.005)
    # 1 pixel per frame on a 64-pixel side: motion 1/64, dynamic = 1 - exp(-(1/64) / 0.005).
    assert out["dynamic"][0].item() == pytest.approx(1 - math.exp(-(1 / 64) / 0.005), abs=0.01)


def test_each_term_catches_its_own_defect():
    pan = _pan(12)
    jerky = _pan(offsets=np.cumsum([0, 1, 3, 0, 2, 1, 4, 0, 1, 3, 0, 2]))
    flicker = np.clip(pan * np.array([1.0, 1.2] * 6)[:, None, None, None], 0, 255).astype(np.uint8)
    out = _score([pan, jerky, flicker])
    # Jerky motion is still a clean warp (every step is a pure shift) but consecutive flows disagree.
    assert out["warp"][1] > 0.9
    assert out["smoothness"][1] < out["smoothness"][0] - 0.5
    # A global brightness jump every other frame is what flicker measures.
    assert out["flicker"][2] < out["flicker"][0] - 0.5
    assert out["smoothness"][0] > 0.9 and out["warp"][0] > 0.9 and out["flicker"][0] > 0.9


def test_forward_backward_mask_by_hand():
    h, w = 6, 8
    right = np.zeros((h, w, 2), np.float32)
    right[..., 0] = 1.0
    consistent, inside = fb_masks(right, -right)
    assert consistent.all()
    # x + 1 leaves the frame only in the last column.
    assert not inside[:, -1].any() and inside[:, :-1].all()
    # Forward and backward flows both pointing right: the round trip misses by 2 px (4 > 0.01 * 2 + 0.5).
    consistent, _ = fb_masks(right, right)
    assert not consistent.any()


def test_fewer_than_three_frames_raise():
    with pytest.raises(ValueError, match="at least 3 frames"):
        _score([_pan(1)])
    with pytest.raises(ValueError, match="uint8"):
        reward_models.build("temporal_consistency")(torch.zeros(1, 4, 8, 8, 3), [""])


def test_bad_option_is_named():
    with pytest.raises(ValueError, match="preset"):
        reward_models.build("temporal_consistency", preset="slow")


def test_scores_a_batch_of_16_clips():
    clips = [_pan(9, seed=s) for s in range(16)]
    rm = reward_models.build("temporal_consistency")
    out = rm(torch.from_numpy(np.stack(clips)), [""] * 16)
    assert out["temporal_consistency"].shape == (16,)
    assert torch.isfinite(out["temporal_consistency"]).all()
