"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN_PROMPTS = ("a red circle moving left", "a blue square moving right")


def write_tiny_setup(d: Path, method: str, heldout: list[str], extra_yaml: str = "", clips_per_prompt: int = 1) -> Path:
    """A tiny random Wan model in ``d/model``, two training prompts, ``heldout`` prompts and a run config at
    ``d/<method>.yaml`` (5 frames of 32x32, temporal-consistency reward, one CPU thread); returns the config path."""
    from video_branch.models.tiny import build_tiny_wan

    build_tiny_wan(d / "model", seed=0)
    (d / "train.txt").write_text("".join(p + "\n" for p in TRAIN_PROMPTS))
    (d / "heldout.txt").write_text("".join(p + "\n" for p in heldout))
    cfg = d / f"{method}.yaml"
    cfg.write_text(f"""method: {method}
model: {{path: {d / 'model'}, max_sequence_length: 16}}
video: {{num_frames: 5, height: 32, width: 32}}
reward: {{components: {{temporal_consistency: {{weight: 1.0}}}}}}
{extra_yaml}train: {{prompt_file: {d / 'train.txt'}, cpu_threads: 1}}
eval: {{prompt_file: {d / 'heldout.txt'}, clips_per_prompt: {clips_per_prompt}, num_steps: 2}}
""")
    return cfg


@pytest.fixture(scope="session")
def tiny_setup():
    """``write_tiny_setup`` (a function fixture, so module- and function-scoped fixtures can both build one)."""
    return write_tiny_setup
