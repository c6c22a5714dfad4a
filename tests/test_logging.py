"""reward_curve.png's smoothing and the run logger's plot."""

from __future__ import annotations

import json

import pytest

from video_branch.engine.logging import trailing_mean


def test_trailing_mean_matches_explicit_windows():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for window in (1, 2, 3, 7, 10):
        expected = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                    for i in range(len(values))]
        assert trailing_mean(values, window) == pytest.approx(expected)
    assert trailing_mean([], 3) == []


def test_plot_writes_reward_curve(tmp_path):
    from video_branch.engine.logging import RunLogger

    logger = RunLogger(tmp_path, enabled=True, tensorboard=False)
    rows = [{"iteration": i, "reward_mean": 0.1 * (i % 3), "reward/toyworld/colour": 1.0} for i in range(25)]
    logger.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = logger.plot()
    assert out == tmp_path / "reward_curve.png" and out.stat().st_size > 0
    assert not (tmp_path / "reward_curve.tmp.png").exists()
