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


def test_heldout_series_reads_eval_rows_with_their_intervals():
    from video_branch.engine.logging import heldout_series

    rows = [
        {"name": "before", "iteration": 0, "toyworld": 0.5, "toyworld_ci95": 0.02, "toyworld/colour": 0.9,
         "toyworld/colour_ci95": 0.01, "toyworld/overall": 0.5, "toyworld/overall_ci95": 0.02, "n": 192},
        {"name": "after", "iteration": 100, "toyworld": 0.7, "toyworld_ci95": 0.03, "toyworld/colour": 0.8,
         "toyworld/colour_ci95": 0.04, "toyworld/overall": 0.7, "toyworld/overall_ci95": 0.03, "n": 192},
        # a resumed run evaluates iteration 100 again: the later row is the one kept
        {"name": "after", "iteration": 100, "toyworld": 0.6, "toyworld_ci95": 0.05, "toyworld/colour": 0.7,
         "toyworld/colour_ci95": 0.06, "toyworld/overall": 0.6, "toyworld/overall_ci95": 0.05, "n": 192},
    ]
    series = heldout_series(rows)
    assert set(series) == {"colour", "overall"}  # the reward's own total is its overall; "n" has no interval
    assert series["colour"] == ([0, 100], [0.9, 0.7], [0.01, 0.06])
    assert series["overall"] == ([0, 100], [0.5, 0.6], [0.02, 0.05])
    two = heldout_series([{"iteration": 0, "a/x": 1.0, "a/x_ci95": 0.1, "b/y": 2.0, "b/y_ci95": 0.2}])
    assert set(two) == {"a/x", "b/y"}  # with two rewards the names keep their prefixes


def test_plot_adds_a_heldout_panel_when_the_run_has_evaluations(tmp_path):
    from PIL import Image

    from video_branch.engine.logging import RunLogger

    logger = RunLogger(tmp_path, enabled=True, tensorboard=False)
    rows = [{"iteration": i, "reward_mean": 0.1 * (i % 3), "reward/toyworld/colour": 1.0} for i in range(25)]
    logger.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    width_alone = Image.open(logger.plot()).size[0]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"iteration": 0, "toyworld/colour": 0.9,
                                                     "toyworld/colour_ci95": 0.01}) + "\n")
    assert Image.open(logger.plot()).size[0] > 1.5 * width_alone
