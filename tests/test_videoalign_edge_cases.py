"""VideoAlign's choices at the edges, each stated against the released code (its vision_process.py, inference.py,
train_reward.py and trainer.py, transformers 4.45)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import reward_models
from reward_models.videoalign import frame_count, multi_pts_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_reward_videoalign as checkpoint  # noqa: E402

released = checkpoint.released  # the tiny release fixture

pytestmark = pytest.mark.filterwarnings("ignore")


def _clip(t, seed=0, size=56):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, t, size, size, 3), generator=g, dtype=torch.uint8)


def _variant(released, tmp_path, name, data=None, model=None, drop=()):
    """A copy of the tiny LoRA release whose model_config.json has some data_config / model_config keys changed
    (``drop``: model_config keys removed)."""
    root = tmp_path / name
    shutil.copytree(released["lora"], root)
    cfg = json.loads((root / "model_config.json").read_text())
    cfg["data_config"].update(data or {})
    cfg["model_config"].update(model or {})
    for key in drop:
        del cfg["model_config"][key]
    (root / "model_config.json").write_text(json.dumps(cfg))
    return str(root)


def _build(released, path=None, **options):
    options.setdefault("dtype", "float32")
    return reward_models.build("videoalign", path=path or released["lora"], base_model=released["base"],
                               min_pixels=3136, **options)


# ---------------------------------------------------------------------------------------------- frame counts
def test_a_single_frame_is_refused_as_by_the_released_code():
    # smart_nframes: max_frames = floor(min(768, 1) / 2) * 2 = 0 -> 0 frames; nframes=2 -> 1: both ValueError.
    with pytest.raises(ValueError, match="at least 2"):
        frame_count(1, 16.0, 2.0, None)
    with pytest.raises(ValueError, match="at least 2"):
        frame_count(1, 16.0, 2.0, 2)


def test_a_single_frame_clip_raises_a_clear_error(released):
    with pytest.raises(ValueError, match="1 frame.*at least 2"):
        _build(released)(_clip(1), ["an image"])


def test_two_and_three_frame_clips_give_two_frames(released):
    # fps sampling: min(max(n, 4), floor(T / 2) * 2) = 2 for T = 2 and 3.
    assert frame_count(2, 16.0, 2.0, None) == 2
    assert frame_count(3, 16.0, 2.0, None) == 2
    rm = _build(released)
    assert rm.frame_indices(3).tolist() == [0, 2]
    assert rm.preprocess(_clip(3), ["p"])["video_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56: 4x4 patches


def test_fps_sampling_counts():
    # T / video_fps * fps, clamped to [4, min(768, T) rounded down to even], rounded to even.
    assert frame_count(4, 16.0, 2.0, None) == 4
    assert frame_count(5, 16.0, 2.0, None) == 4
    assert frame_count(81, 16.0, 2.0, None) == 10
    assert frame_count(2000, 1.0, 2.0, None) == 768


def test_num_frames_rounding_and_the_clip_length():
    # round(n / 2) * 2 with Python's half-to-even rounding: 3 -> 4, 5 -> 4, 7 -> 8; then at most T.
    assert frame_count(9, 16.0, 2.0, 2) == 2
    assert frame_count(9, 16.0, 2.0, 3) == 4
    assert frame_count(9, 16.0, 2.0, 5) == 4
    assert frame_count(9, 16.0, 2.0, 7) == 8
    assert frame_count(6, 16.0, 2.0, 12) == 6  # more than the clip has: the whole clip
    with pytest.raises(ValueError, match="at least 2"):
        frame_count(9, 16.0, 2.0, 1)  # round(0.5) = 0
    # Above an odd clip length the count is odd, which 2-frame patches cannot hold (the released processor fails).
    with pytest.raises(ValueError, match="num_frames=12 exceeds the clip's 9 frames"):
        frame_count(9, 16.0, 2.0, 12)


# -------------------------------------------------------------------------------------- fps and num_frames
def test_a_frame_count_in_the_config_wins_over_an_explicit_fps(released, tmp_path):
    path = _variant(released, tmp_path, "nframes", data={"num_frames": 6})
    rm = _build(released, path, fps=8.0)
    assert rm.frame_indices(81).tolist() == torch.linspace(0, 80, 6).round().long().tolist()
    assert len(_build(released, path).frame_indices(81)) == 6


def test_fps_and_num_frames_together_are_refused(released):
    with pytest.raises(ValueError, match="fps.*or num_frames.*not both"):
        _build(released, fps=4.0, num_frames=8)


def test_the_clip_frame_rate_of_a_call_decides_the_count(released):
    rm = _build(released, video_fps=16.0)
    assert len(rm.frame_indices(80)) == 10
    assert len(rm.frame_indices(80, video_fps=8.0)) == 20
    clip = _clip(40, seed=3)
    a, b = rm(clip, ["p"], video_fps=4.0), rm(clip, ["p"], video_fps=16.0)
    assert float(a["VQ"][0]) != float(b["VQ"][0])  # 20 frames vs 4
    with pytest.raises(ValueError, match="video_fps"):
        rm(clip, ["p"], video_fps=0.0)


# ------------------------------------------------------------------------------------------------ multi_pts
def _multi_pts_by_hand(total, video_fps):
    # vision_process._read_video_decord, sample_type 'multi_pts', transcribed.
    n = int(total * 8 // video_fps)
    idx = torch.linspace(0, total - 1, n).round().long().tolist()
    pts = torch.linspace(3, int(n - 3 - 1), 4).round().long().tolist()
    out = []
    for pt in pts:
        out.extend(idx[pt - 3:pt + 3])
    return out


def test_multi_pts_takes_four_windows_of_six_frames_at_8_fps():
    for total, vfps in ((81, 16.0), (49, 24.0), (33, 8.0), (10, 8.0), (200, 30.0)):
        got = multi_pts_indices(total, vfps).tolist()
        assert got == _multi_pts_by_hand(total, vfps) and len(got) == 24, (total, vfps)
    # 81 frames at 16 fps: 40 resampled frames, windows centred at 3, 14, 25, 36.
    assert multi_pts_indices(81, 16.0).tolist()[:7] == [0, 2, 4, 6, 8, 10, 23]


def test_multi_pts_from_the_config_is_used_and_short_clips_are_refused(released, tmp_path):
    path = _variant(released, tmp_path, "multi", data={"sample_type": "multi_pts"})
    rm = _build(released, path, video_fps=16.0)
    assert rm.sample_type == "multi_pts"
    assert rm.frame_indices(81).tolist() == _multi_pts_by_hand(81, 16.0)
    assert rm.preprocess(_clip(81), ["p"])["video_grid_thw"].tolist()[0][0] == 12
    # 9 frames at 16 fps are 4 frames at 8 fps: the released windows would run off the clip.
    with pytest.raises(ValueError, match="multi_pts.*at least 7"):
        rm(_clip(9), ["p"])
    with pytest.raises(ValueError, match="sample_type"):
        _build(released, sample_type="random")


# ----------------------------------------------------------------------------------------- special tokens
def test_use_special_tokens_decides_the_read_out_over_reward_token(released, tmp_path):
    # The released model sets reward_token = "special" whenever special token ids exist (use_special_tokens).
    path = _variant(released, tmp_path, "last_but_special", model={"use_special_tokens": True,
                                                                    "reward_token": "last"})
    rm = _build(released, path)
    assert rm.reward_token == "special"
    ref = _build(released)
    clip = _clip(6, seed=4)
    assert float(rm(clip, ["p"])["MQ"][0]) == float(ref(clip, ["p"])["MQ"][0])


def test_special_read_out_without_special_tokens_is_refused(released, tmp_path):
    # use_special_tokens defaults to False in the released ModelConfig: no reward tokens, no special read-out.
    off = _variant(released, tmp_path, "off", model={"use_special_tokens": False, "reward_token": "special"})
    unset = _variant(released, tmp_path, "unset", model={"reward_token": "special"}, drop=("use_special_tokens",))
    for path in (off, unset):
        with pytest.raises(ValueError, match="use_special_tokens"):
            _build(released, path)


# ---------------------------------------------------------------------------------------------------- dtype
def test_auto_dtype_follows_the_checkpoint_config_on_the_cpu(released, tmp_path):
    # The fixture's model_config says torch_dtype: bfloat16, as the release does.
    rm = _build(released, dtype="auto", device="cpu")
    assert rm.dtype == torch.bfloat16
    assert {p.dtype for p in rm.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(rm(_clip(6), ["p"])["Overall"]).all()
    fp32 = _variant(released, tmp_path, "fp32", model={"torch_dtype": "float32"})
    assert _build(released, fp32, dtype="auto", device="cpu").dtype == torch.float32
    unset = _variant(released, tmp_path, "unset", model={"torch_dtype": None})
    assert _build(released, unset, dtype="auto", device="cpu").dtype == torch.float32
    # An explicit dtype is what is used (the released class keeps the config's dtype when asked for float32).
    assert _build(released, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        _build(released, dtype="fp8")
