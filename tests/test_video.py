"""mp4 writing (H.264, yuv420p, even sizes) and reading (decord at native size, OpenCV resize, clear errors)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from video_branch.video import VideoReadError, pad_to_even, read_video, write_mp4


def _levels(t=9, h=32, w=48):
    """Frame i is a flat grey of level 20 + 25 i: robust to compression, and tells frames apart."""
    levels = 20 + 25 * np.arange(t)
    return np.broadcast_to(levels[:, None, None, None], (t, h, w, 3)).astype(np.uint8).copy(), levels


def _codec(path):
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)  # ffmpeg -i exits 1 without an output
    return out.stderr


@pytest.mark.parametrize("width", [16, 48, 64])  # decord 0.6 cannot copy out native widths 16 and 48
def test_round_trip_is_h264_yuv420p_with_every_frame(tmp_path, width):
    frames, levels = _levels(w=width)
    path = write_mp4(tmp_path / "sub" / "clip.mp4", frames, fps=8)
    info = _codec(path)
    assert "h264" in info and "yuv420p" in info and "8 fps" in info
    back = read_video(path)
    assert back.dtype == np.uint8 and back.shape == frames.shape
    np.testing.assert_allclose(back.reshape(9, -1).mean(1), levels, atol=3)


def test_odd_sizes_are_padded_to_even_with_the_content_kept(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 33, 35, 3), dtype=np.uint8), 5, axis=0)
    frames = np.clip(frames.astype(int), 60, 200).astype(np.uint8)
    padded = pad_to_even(frames)
    assert padded.shape == (5, 34, 36, 3)
    np.testing.assert_array_equal(padded[:, 33, :35], frames[:, 32])  # last row repeated
    np.testing.assert_array_equal(padded[:, :33, 35], frames[:, :, 34])  # last column repeated
    back = read_video(write_mp4(tmp_path / "odd.mp4", frames, fps=4))
    assert back.shape == (5, 34, 36, 3)


def test_num_frames_samples_uniformly_and_size_resizes_after_decoding(tmp_path):
    frames, levels = _levels()
    path = write_mp4(tmp_path / "c.mp4", frames, fps=8)
    three = read_video(path, num_frames=3)
    np.testing.assert_allclose(three.reshape(3, -1).mean(1), levels[[0, 4, 8]], atol=3)
    more = read_video(path, num_frames=17)  # longer than the clip: indices repeat
    np.testing.assert_allclose(more.reshape(17, -1).mean(1), levels[np.linspace(0, 8, 17).round().astype(int)],
                               atol=3)
    for size in [(16, 48), (16, 16), (40, 24)]:  # decord's own resize gets widths 16 and 48 wrong
        small = read_video(path, size=size)
        assert small.shape == (9, *size, 3)
        np.testing.assert_allclose(small.reshape(9, -1).mean(1), levels, atol=3)


def test_missing_empty_and_corrupt_files_raise_video_read_error(tmp_path):
    with pytest.raises(VideoReadError, match="nothere.mp4 does not exist"):
        read_video(tmp_path / "nothere.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.mp4 is empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoReadError, match="junk.mp4 cannot be decoded"):
        read_video(tmp_path / "junk.mp4")
    good = write_mp4(tmp_path / "good.mp4", _levels()[0], fps=8).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 3])
    with pytest.raises(VideoReadError, match="cut.mp4"):
        read_video(tmp_path / "cut.mp4")


def test_write_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((3, 16, 16, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_mp4(tmp_path / "f.mp4", np.zeros((16, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "f.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=0)


def test_reading_a_video_keeps_opencv_png_decoding_working(tmp_path):
    script = (
        "import numpy as np, sys\n"
        "from video_branch.video import read_video, write_mp4\n"
        f"p = write_mp4({str(tmp_path / 'v.mp4')!r}, np.full((5, 32, 32, 3), 99, np.uint8), fps=8)\n"
        "read_video(p)\n"
        "import cv2\n"
        f"cv2.imwrite({str(tmp_path / 'x.png')!r}, np.zeros((8, 8, 3), np.uint8))\n"
        f"sys.exit(0 if cv2.imread({str(tmp_path / 'x.png')!r}) is not None else 1)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
