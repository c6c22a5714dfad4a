"""Writing clips as H.264 mp4 and reading them back as uint8 frames.

Writing goes through imageio's ffmpeg (the imageio-ffmpeg wheel ships an ffmpeg with libx264); H.264 in yuv420p
needs even sizes, so odd frames are padded by repeating the last row / column (never cropped: a 1-pixel crop would
cut labels drawn on the border). Reading goes through decord at the file's native size; a requested size is applied
with OpenCV afterwards because decord's own resize returns wrong shapes for some widths (16, 48).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoReadError(RuntimeError):
    """A video file is missing, empty, or cannot be decoded."""


def _as_uint8_frames(frames) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"write_mp4: frames must be uint8 [T, H, W, 3] with T >= 1, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"write_mp4: frames must be uint8, got {arr.dtype}")
    return arr


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, C] -> [T, H + H % 2, W + W % 2, C], repeating the last row / column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def write_mp4(path, frames, fps: float, quality: float | None = 8.0) -> Path:
    """Write uint8 frames [T, H, W, 3] (numpy or torch) to an H.264 (libx264, yuv420p) mp4 at `fps`.

    Odd heights / widths are padded to even. `quality` is imageio's 0-10 scale (10 best; None leaves ffmpeg's
    default). Parent directories are created. Returns the path.
    """
    import imageio.v2 as imageio

    arr = pad_to_even(_as_uint8_frames(frames))
    if not fps or fps <= 0:
        raise ValueError(f"write_mp4: fps must be > 0, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: we already made the size even; imageio's default (16) would rescale the frames.
    writer = imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=float(fps), codec="libx264",
                                pixelformat="yuv420p", quality=quality, macro_block_size=1,
                                ffmpeg_log_level="error")
    try:
        for frame in arr:
            writer.append_data(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return path


def resize_frames(frames: np.ndarray, size: tuple[int, int], interpolation: int | None = None) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, height, width, 3] with OpenCV; `size` is (height, width).

    Default interpolation: area averaging when shrinking, bilinear when enlarging.
    """
    import cv2

    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"resize_frames: size must be positive (height, width), got {size}")
    if frames.shape[1:3] == (height, width):
        return frames
    if interpolation is None:
        shrinking = height * width < frames.shape[1] * frames.shape[2]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=interpolation) for f in frames])


# decord 0.6 fails at some native widths (16, 48) with this check; the clip is fine, only decord's copy is not.
_DECORD_SIZE_BUG = "from_size == to_size"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def _indices(total: int, num_frames: int | None) -> np.ndarray:
    if num_frames is None:
        return np.arange(total)
    return np.linspace(0, total - 1, int(num_frames)).round().astype(np.int64)


def _read_decord(path: Path, num_frames: int | None) -> np.ndarray:
    # OpenCV must load its libpng / zlib before decord's: the other order breaks cv2.imread of PNG files for the
    # rest of the process ("libpng error: bad parameters to zlib").
    import cv2  # noqa: F401
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    if total < 1:
        raise VideoReadError(f"video {path} has no frames")
    return reader.get_batch(_indices(total, num_frames).tolist()).asnumpy()


def _read_ffmpeg(path: Path, num_frames: int | None) -> np.ndarray:
    """Every frame through imageio-ffmpeg's pipe (iterated: imageio's reader reports an infinite length)."""
    import imageio_ffmpeg

    try:
        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(gen)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in gen]
    except Exception as err:
        raise VideoReadError(f"video {path} cannot be decoded: {_first_line(err)}") from err
    if not frames:
        raise VideoReadError(f"video {path} has no frames")
    return np.stack(frames)[_indices(len(frames), num_frames)]


def read_video(path, num_frames: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a video file to uint8 [T, H, W, 3] (RGB), with decord (ffmpeg where decord's width bug hits).

    num_frames: sample that many frames uniformly over the clip (``linspace(0, T-1, n).round()``; indices repeat
    when the clip is shorter); None keeps every frame. size: (height, width) to resize to after decoding.
    Raises VideoReadError naming the file when it is missing, empty or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video {path} does not exist")
    if path.stat().st_size == 0:
        raise VideoReadError(f"video {path} is empty (0 bytes)")
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) < 1):
        raise ValueError(f"read_video: num_frames must be a positive int or None, got {num_frames!r}")
    try:
        frames = _read_decord(path, num_frames)
    except VideoReadError:
        raise
    except Exception as err:  # decord raises its own DECORDError / RuntimeError for corrupt containers
        if _DECORD_SIZE_BUG not in str(err):
            raise VideoReadError(f"video {path} cannot be decoded: {_first_line(err)}") from err
        frames = _read_ffmpeg(path, num_frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoReadError(f"video {path} decoded to an unexpected shape {frames.shape}")
    if size is not None:
        frames = resize_frames(frames, size)
    return np.ascontiguousarray(frames, dtype=np.uint8)
