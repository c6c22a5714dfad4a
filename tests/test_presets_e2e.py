"""Every preset config in configs/tiny trains two iterations on 2 ranks of the embedded default, and the image case
(`video.num_frames: 1`) trains through the same code path with the toy world's single-frame reward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import shared_jobs

from video_branch.config import load_config
from video_branch.config.specs import config_accounting

ROOT = Path(__file__).resolve().parents[1]
# Every preset's config; the demo has its own test and bench.yaml is the method bench's base config (no method).
TINY = sorted(p for p in (ROOT / "configs" / "tiny").glob("*.yaml") if p.stem not in ("demo", "bench"))
pytestmark = pytest.mark.slow
SHRINK = ["train.iterations=2", "train.checkpoint_every=0", "eval.num_prompts=2", "eval.clips_per_prompt=1",
          "eval.num_steps=4", "logging.plot_every=0", "train.dump_trees=true"]


@shared_jobs
def _jobs(d: Path) -> list[str]:
    """Every preset, and the image case, with the SHRINK overrides (run in the session's shared 2-rank launch)."""
    image = d / "image.yaml"
    image.write_text(yaml.safe_dump({"method": "branchgrpo",
                                     "model": {"path": "assets/toy_wan", "max_sequence_length": 16},
                                     "video": {"num_frames": 1, "height": 32, "width": 32},
                                     "reward": {"components": {"toyworld": {"weight": 1.0}}}}))
    return ["@".join([f"{name}={path}", *SHRINK]) for name, path in [*((c.stem, c) for c in TINY), ("image", image)]]


@pytest.fixture(scope="module")
def runs(shared_runs):
    d, out = shared_runs[__name__]
    return out, d / "image.yaml"


@pytest.mark.parametrize("config", TINY, ids=lambda p: p.stem)
def test_preset_runs_two_iterations_on_two_ranks(runs, config):
    out, _ = runs
    run = out / config.stem
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    cfg = load_config(config, SHRINK)
    for r in rows:
        acc = config_accounting(cfg, r["iteration"])
        # Two ranks, one prompt each: per-rank counts equal the per-prompt accounting.
        assert r["forward_passes"] == acc["forward_passes"]
        assert r["trained_edges"] == acc["trained_edges"]
        assert np.isfinite(r["reward_mean"]) and 0.0 <= r["reward/toyworld"] <= 1.0
        if r["trained_edges"]:
            assert r["ratio_max_dev"] < 1e-5
    assert (run / "final" / "model_index.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert {"before", "after"} <= set(summary)


def test_image_case_trains_with_single_frame_reward(runs):
    out, _ = runs
    run = out / "image"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["trained_edges"] == 218 and r["ratio_max_dev"] < 1e-5
        assert "reward/toyworld/colour" in r and "reward/toyworld/shape" in r
        assert "reward/toyworld/direction" not in r or r["reward/toyworld/direction"] is None
    z = np.load(run / "trees" / "iter_000000_rank0.npz")
    assert np.isfinite(z["leaf_reward"][z["depth"] == 20]).all()
