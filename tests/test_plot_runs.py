"""plot_runs: curves read from metrics.jsonl (resume duplicates, torn lines, wall-clock sums) and the PNG."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    if "plot_runs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "tools" / "plot_runs.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["plot_runs"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["plot_runs"]


def _run(folder, name, rewards, iter_s, method=None, extra=""):
    d = folder / name
    d.mkdir()
    lines = [json.dumps({"iteration": i, "reward_mean": r, "reward/toyworld": r / 2, "iter_s": s})
             for i, (r, s) in enumerate(zip(rewards, iter_s))]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    if method:
        (d / "config.yaml").write_text(f"method: {method}\nmodel:\n  path: x\n")
    return d


def test_curves_follow_iterations_and_summed_iteration_time(tmp_path):
    pr = _tool()
    # Iteration 1 appears twice (a resume rewrote it) and the last line is torn.
    run = _run(tmp_path, "a", [0.1, 0.2, 0.4], [2.0, 3.0, 5.0],
               extra=json.dumps({"iteration": 1, "reward_mean": 0.25, "iter_s": 4.0}) + '\n{"iteration": 3, "rew')
    its, secs, vals = pr.curve(pr.read_rows(run), "reward_mean")
    np.testing.assert_array_equal(its, [0, 1, 2])
    np.testing.assert_allclose(secs, [2.0, 6.0, 11.0])
    np.testing.assert_allclose(vals, [0.1, 0.25, 0.4])
    # A metric missing in some rows keeps the time of the rows it has.
    rows = pr.read_rows(run)
    rows[0].pop("reward/toyworld")
    its, secs, vals = pr.curve(rows, "reward/toyworld")
    np.testing.assert_array_equal(its, [2])  # row 1 was replaced by the resumed row, which lacks it
    np.testing.assert_allclose(secs, [11.0])


def test_ema_is_debiased():
    pr = _tool()
    # acc: 0.5, then 0.25 + 1.5 = 1.75; debiased by 1 - 0.5 and 1 - 0.25.
    np.testing.assert_allclose(pr.ema(np.array([1.0, 3.0]), 0.5), [1.0, 1.75 / 0.75])
    np.testing.assert_allclose(pr.ema(np.array([2.0, 2.0, 2.0]), 0.9), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(pr.ema(np.array([1.0, 5.0]), 0.0), [1.0, 5.0])


def test_figure_draws_each_run_against_iteration_and_time(tmp_path):
    pr = _tool()
    a = _run(tmp_path, "a", [0.1, 0.2, 0.4], [60.0, 60.0, 60.0], method="branchgrpo")
    b = _run(tmp_path, "b", [0.3, 0.1], [30.0, 90.0])
    fig = pr.plot([a, b], ["reward_mean", "reward/toyworld"])
    (ax_it, ax_t), (ax2_it, _) = fig.axes[:2], fig.axes[2:4]
    assert [line.get_label() for line in ax_it.lines] == ["a (branchgrpo)", "b"]
    np.testing.assert_allclose(ax_it.lines[1].get_xdata(), [0, 1])
    np.testing.assert_allclose(ax_it.lines[1].get_ydata(), [0.3, 0.1])
    np.testing.assert_allclose(ax_t.lines[0].get_xdata(), [1.0, 2.0, 3.0])  # minutes: 180 s in all
    assert "minutes" in ax_t.get_xlabel()
    np.testing.assert_allclose(ax2_it.lines[0].get_ydata(), [0.05, 0.1, 0.2])
    assert ax2_it.get_ylabel() == "reward/toyworld"


def test_cli_writes_a_png_for_two_runs(tmp_path):
    import cv2

    a = _run(tmp_path, "a", [0.1, 0.2, 0.4], [1.0, 1.0, 1.0])
    b = _run(tmp_path, "b", [0.3, 0.1, 0.5], [2.0, 2.0, 2.0])
    out = tmp_path / "plots" / "runs.png"
    cmd = [sys.executable, str(ROOT / "tools" / "plot_runs.py"), str(a), str(b), "--smooth", "0.5", "--out", str(out),
           "--dpi", "50"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    img = cv2.imread(str(out))
    assert img is not None and img.shape[:2] == (round(3.6 * 50), 11 * 50)


def test_errors_name_the_run_or_option(tmp_path, capsys):
    pr = _tool()
    a = _run(tmp_path, "a", [0.1], [1.0])
    (tmp_path / "empty").mkdir()
    assert pr.main([str(a), str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert pr.main([str(a), str(tmp_path / "empty")]) == 2
    assert "empty has no metrics.jsonl" in capsys.readouterr().err
    assert pr.main([str(a), "--metric", "reward/nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "--metric reward/nope: no run has it" in capsys.readouterr().err
    assert pr.main([str(a), "--label", "x", "--label", "y"]) == 2
    assert pr.main([str(a), "--smooth", "1.5"]) == 2
    with pytest.raises(SystemExit):
        pr.main([])
