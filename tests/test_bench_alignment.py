"""The method-comparison bench (tools/bench_alignment.py): time-to-target ratios and their intervals against hand
computations on synthetic curves, curve aggregation, the report's structure, and resumability on a tiny model.

The statistics are checked against numbers worked out here by hand (crossings, logs, the t quantile 4.302653 for two
degrees of freedom); the end-to-end tests launch the tool as a user would (a subprocess, a tiny random Wan model, the
weight-free temporal reward), interrupt it and continue it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import _bench_common as bc
import bench_alignment as ba


def curve(*points):
    return [{"train_s": float(t), "mean": float(m)} for t, m in points]


# Three seeds of a baseline and a preset, with the crossings worked out by hand:
#   seed 0: target 0.50, baseline reaches it at 120 s; preset crosses between (30, 0.48) and (60, 0.52): 45 s
#   seed 1: target 0.46 (the baseline's final, below its peak); baseline crosses between (50, 0.44) and (100, 0.50)
#           at 50 + 50 * 0.02 / 0.06 = 66.67 s; preset reaches exactly 0.46 at its evaluation at 40 s
#   seed 2: target 0.60, baseline 100 s; preset crosses between (50, 0.5) and (100, 0.7): 75 s
BASE = {0: curve((0, .40), (60, .45), (120, .50)),
        1: curve((0, .40), (50, .44), (100, .50), (150, .46)),
        2: curve((0, .40), (100, .60))}
FAST = {0: curve((0, .40), (30, .48), (60, .52), (120, .55)),
        1: curve((0, .40), (40, .46), (150, .47)),
        2: curve((0, .40), (50, .50), (100, .70))}
HAND_RATIOS = [45 / 120, 40 / (50 + 50 * 0.02 / 0.06), 75 / 100]


def test_seed_ratio_matches_the_hand_computed_crossings():
    for seed, want in zip(BASE, HAND_RATIOS):
        r = ba.seed_ratio(FAST[seed], BASE[seed])
        assert r["status"] == "reached" and r["ratio"] == pytest.approx(want)
        assert r["target"] == BASE[seed][-1]["mean"]
    assert ba.seed_ratio(BASE[1], BASE[1])["ratio"] == pytest.approx(1.0)
    assert ba.seed_ratio(BASE[1], BASE[1])["baseline_time_s"] == pytest.approx(66.6667, abs=1e-3)


def test_ratio_over_seeds_geometric_mean_and_t_interval_on_log_ratios():
    s = ba.ratio_over_seeds([ba.seed_ratio(FAST[k], BASE[k]) for k in BASE])
    logs = [math.log(r) for r in HAND_RATIOS]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert s["geo_mean"] == pytest.approx((HAND_RATIOS[0] * HAND_RATIOS[1] * HAND_RATIOS[2]) ** (1 / 3))
    assert s["ci95_low"] == pytest.approx(math.exp(m - half)) and s["ci95_high"] == pytest.approx(math.exp(m + half))
    assert s["ci95_low"] < min(HAND_RATIOS) and s["ci95_high"] > max(HAND_RATIOS)  # wide with 3 seeds
    assert (s["seeds"], s["reached"], s["not_reached"], s["baseline_flat"]) == (3, 3, 0, 0)
    assert s["ratio_lower_bound"] is None
    one = ba.ratio_over_seeds([ba.seed_ratio(FAST[0], BASE[0])])
    assert one["geo_mean"] == pytest.approx(0.375) and one["ci95_low"] is None and one["ci95_high"] is None


def test_a_preset_that_never_reaches_the_target_gives_only_a_lower_bound():
    slow = curve((0, .40), (65, .45), (130, .49))  # ends below seed 0's target 0.50 after 130 s
    r = ba.seed_ratio(slow, BASE[0])
    assert r["status"] == "not_reached" and r["ratio"] is None
    assert r["ratio_lower_bound"] == pytest.approx(130 / 120)
    s = ba.ratio_over_seeds([r, ba.seed_ratio(FAST[1], BASE[1]), ba.seed_ratio(FAST[2], BASE[2])])
    assert s["geo_mean"] is None and s["ci95_low"] is None and s["ci95_high"] is None
    assert s["ratio_lower_bound"] == pytest.approx((130 / 120 * HAND_RATIOS[1] * HAND_RATIOS[2]) ** (1 / 3))
    assert (s["reached"], s["not_reached"]) == (2, 1)
    assert ba.ratio_text(s).startswith("> 0.") and "not reached in 1/3" in ba.ratio_text(s)


def test_a_baseline_that_ends_at_or_below_its_start_gives_no_ratio():
    flat = curve((0, .50), (60, .55), (120, .45))
    r = ba.seed_ratio(FAST[0], flat)
    assert r["status"] == "baseline_flat" and r["ratio"] is None and r["ratio_lower_bound"] is None
    s = ba.ratio_over_seeds([r, ba.seed_ratio(FAST[2], BASE[2])])
    assert s["baseline_flat"] == 1 and s["geo_mean"] == pytest.approx(0.75) and s["ci95_low"] is None


def test_late_mean_averages_the_last_third_of_the_budget():
    # Budget 180 s, evaluations every 30 s: the last third starts at 120 s, so the points at 120, 150 and 180 count.
    c = curve((0, .40), (30, .70), (60, .42), (90, .44), (120, .46), (150, .50), (180, .45))
    assert ba.late_mean(c, 180.0) == pytest.approx((.46 + .50 + .45) / 3)
    # An early spike does not count; with a single point in the window the late mean is that point.
    assert ba.late_mean(curve((0, .40), (30, .90), (60, .41)), 60.0) == pytest.approx(.41)
    assert ba.late_mean(curve((0, .40), (30, .50), (60, .60)), 60.0, fraction=0.5) == pytest.approx(.55)
    # The clock key is respected (cpu_s instead of train_s).
    pts = [{"cpu_s": 0.0, "mean": .1}, {"cpu_s": 50.0, "mean": .2}, {"cpu_s": 100.0, "mean": .3}]
    assert ba.late_mean(pts, 100.0, key="cpu_s") == pytest.approx(.3)


def test_t_quantiles_and_mean_t_ci():
    assert bc.t975(2) == pytest.approx(4.302653) and bc.t975(10) == pytest.approx(2.228139)
    for df, exact in ((11, 2.200985), (20, 2.085963), (30, 2.042272), (120, 1.979930)):
        assert bc.t975(df) == pytest.approx(exact, abs=2e-4)
    s = bc.mean_t_ci([1.0, 2.0, 6.0, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(3.0) and s["sd"] == pytest.approx(math.sqrt(7.0))
    assert s["ci95"] == pytest.approx(4.302653 * math.sqrt(7.0) / math.sqrt(3))
    assert (s["min"], s["max"]) == (1.0, 6.0)
    assert bc.mean_t_ci([2.0])["ci95"] is None and bc.mean_t_ci([])["mean"] is None


def _run_with(points, ci=0.01):
    """A finished run's curve as the tool stores it: scores of two terms per evaluation."""
    return {"curve": [{"train_s": t, "mean": a, "scores": {"r": a, "r_ci95": ci, "r/x": b, "r/x_ci95": 2 * ci,
                                                          "n": 4}} for t, a, b in points]}


def test_grid_curves_interpolate_and_take_intervals_over_seeds_or_over_clips():
    assert ba.eval_grid(60, 30) == [0, 30, 60] and ba.eval_grid(50, 30) == [0, 30, 50]
    a = _run_with([(0, .4, .1), (32, .5, .2), (61, .6, .3)])
    b = _run_with([(0, .4, .1), (31, .44, .3), (62, .52, .2)])
    g = ba.grid_curves([a, b], [0, 30, 60])
    assert set(g) == {"r", "r/x"}
    ya = [.4, .4 + .1 * 30 / 32, .5 + .1 * 28 / 29]
    yb = [.4, .4 + .04 * 30 / 31, .44 + .08 * 29 / 31]
    assert g["r"]["runs"] == [pytest.approx(ya), pytest.approx(yb)]
    assert g["r"]["mean"] == pytest.approx([(x + y) / 2 for x, y in zip(ya, yb)])
    assert g["r"]["ci95"][0] == pytest.approx(0.0)
    assert g["r"]["ci95"][2] == pytest.approx(12.706205 * abs(ya[2] - yb[2]) / 2)  # sd = |a - b| / sqrt 2
    assert g["r"]["band"] == "seeds"
    one = ba.grid_curves([a], [0, 30, 60])
    assert one["r"]["band"] == "held-out clips" and one["r/x"]["ci95"] == pytest.approx([0.02] * 3)


def test_plan_rotates_the_preset_order_per_seed():
    vs = [bc.Variant(k, k) for k in ("dancegrpo", "mixgrpo", "nft")]
    order = [(s, v.label) for s, v in ba.plan(vs, [0, 1, 2, 3])]
    assert order[:6] == [(0, "dancegrpo"), (0, "mixgrpo"), (0, "nft"), (1, "mixgrpo"), (1, "nft"), (1, "dancegrpo")]
    assert order[9:] == [(3, "dancegrpo"), (3, "mixgrpo"), (3, "nft")]
    assert sorted(order) == sorted((s, k) for s in range(4) for k in ("dancegrpo", "mixgrpo", "nft"))


def test_quick_and_full_defaults():
    q = ba.parse_args(["--quick", "--seeds", "5,6"])
    assert (q.seeds, q.minutes, q.eval_every_s) == ([5], 1 / 3, 10.0)
    f = ba.parse_args([])
    assert (f.seeds, f.minutes, f.eval_every_s) == ([0, 1, 2], 3.0, 30.0)
    assert f.presets.split(",") == ["dancegrpo", "flowgrpo", "mixgrpo", "branchgrpo", "branchgrpo_deppru",
                                    "branchgrpo_widpru", "branchgrpo_mix", "vgrpo", "nft", "pro_grpo"]
    with pytest.raises(SystemExit):
        ba.parse_args(["--seeds", "1,1"])


# ------------------------------------------------------------------------------------------------ report structure
def _synthetic_result(spec, finals, leaves=16, fwd=320):
    """A finished run's bench_result.json with three evaluations, built as train_run writes one."""
    curve_ = []
    for i, m in enumerate(finals):
        scores = {"temporal_consistency": m, "temporal_consistency_ci95": 0.01, "n": 2,
                  "per_clip": {"temporal_consistency": [m, m]}}
        curve_.append({"train_s": spec["eval_every_s"] * i, "cpu_s": 1.5 * spec["eval_every_s"] * i, "iteration": i,
                       "mean": m, "ci95": 0.01, "n": 2, "scores": scores, "leaves": leaves * i,
                       "forward_passes": fwd * i})
    n = len(finals) - 1
    return {"spec": spec, "label": spec["label"], "preset": spec["preset"], "overrides": spec["overrides"],
            "seed": spec["seed"], "metric": spec["metric"], "clock": spec["clock"], "budget_s": spec["budget_s"],
            "iterations": n, "train_s": curve_[-1]["train_s"], "cpu_s": curve_[-1]["cpu_s"],
            "leaves_per_iteration": leaves, "leaves": leaves * n, "forward_passes": fwd * n, "median_iter_s": 1.0,
            "before": {"mean": finals[0], "ci95": 0.01}, "final": {"mean": finals[-1], "ci95": 0.01, "n": 2},
            "curve": curve_, "rows": [{"iteration": i, "iter_s": spec["eval_every_s"]} for i in range(n)]}


def _specs(argv):
    args = ba.parse_args(argv)
    variants = bc.parse_variants(args.presets)
    work = Path(args.work_dir)
    out = {}
    for seed, v in ba.plan(variants, args.seeds):
        cfg = bc.variant_config(args.config, v, [f"train.seed={seed}"], ba.run_dir_of(work, v.label, seed))
        out[(seed, v.label)] = ba.run_spec(args, v, seed, cfg, ba.default_metric(cfg))
    return out


def test_report_from_run_files_structure_targets_and_pending(tmp_path, tiny_setup):
    cfg = tiny_setup(tmp_path, "dancegrpo", ["a green triangle moving up"])
    work = tmp_path / "work"
    argv = ["--config", str(cfg), "--presets", "dancegrpo,fast=branchgrpo_mix,slow=nft", "--seeds", "0,1",
            "--minutes", "1", "--eval-every-s", "30", "--work-dir", str(work), "--out", str(tmp_path / "r.json")]
    specs = _specs(argv)
    curves = {"dancegrpo": {0: (.40, .45, .50), 1: (.40, .46, .48)},
              "fast": {0: (.40, .45, .55), 1: (.40, .48, .52)},
              "slow": {0: (.40, .41, .42), 1: (.40, .42, .43)}}
    for (seed, label), spec in specs.items():
        if (seed, label) == (1, "slow"):
            continue  # an unfinished run: its directory holds leftovers but no result
        bc.write_json_atomic(ba.run_dir_of(work, label, seed) / ba.RESULT,
                             _synthetic_result(spec, curves[label][seed]))
    (ba.run_dir_of(work, "slow", 1)).mkdir(parents=True)
    (ba.run_dir_of(work, "slow", 1) / ba.CURVE).write_text('{"torn": ')
    res = ba.main([*argv, "--report-only"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"].keys() == res["summary"].keys() == {"dancegrpo", "fast", "slow"}
    assert saved["pending"] == [{"seed": 1, "label": "slow"}] and saved["runs_trained_now"] == 0
    assert Path(saved["plot"]).stat().st_size > 0
    fast, base, slow = (saved["summary"][k] for k in ("fast", "dancegrpo", "slow"))
    # fast, seed 0: target 0.50 (dancegrpo reaches it at its 60 s evaluation), crossed between (30, 0.45) and
    # (60, 0.55) at 30 + 30 * 0.05 / 0.10 = 45 s; seed 1: target 0.48, dancegrpo crosses between (30, 0.46) and
    # (60, 0.48) at 60 s, fast reaches exactly 0.48 at its 30 s evaluation. Ratios 0.75 and 0.5.
    r = fast["time_to_target_ratio"]
    assert r["ratios"] == [pytest.approx(0.75), pytest.approx(0.5)]
    logs = [math.log(0.75), math.log(0.5)]
    half = 12.706205 * abs(logs[0] - logs[1]) / math.sqrt(2) / math.sqrt(2)
    assert r["geo_mean"] == pytest.approx(math.sqrt(0.375))
    assert (r["ci95_low"], r["ci95_high"]) == (pytest.approx(math.exp(sum(logs) / 2 - half)),
                                              pytest.approx(math.exp(sum(logs) / 2 + half)))
    assert base["time_to_target_ratio"]["ratios"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert slow["seeds"] == [0] and slow["time_to_target_ratio"]["not_reached"] == 1
    assert slow["time_to_target_ratio"]["ratio_lower_bound"] == pytest.approx(60 / 60)
    # Final held-out reward over seeds, spread, and gains per 1,000 leaves and per forward pass (2 iterations of
    # 16 leaves and 320 forward passes).
    assert fast["final"]["mean"] == pytest.approx(0.535) and fast["final"]["sd"] == pytest.approx(0.015 * math.sqrt(2))
    assert fast["final"]["min"] == pytest.approx(0.52) and fast["final"]["max"] == pytest.approx(0.55)
    assert fast["gain_per_1k_leaves"]["mean"] == pytest.approx((0.15 + 0.12) / 2 / 32 * 1000)
    assert fast["gain_per_forward_pass"]["mean"] == pytest.approx((0.15 + 0.12) / 2 / 640)
    # Late mean (budget 60 s: only the 60 s evaluation is in the last third) and its difference to dancegrpo's in
    # the same seed: seed 0 0.55 - 0.50, seed 1 0.52 - 0.48.
    assert fast["late"]["mean"] == pytest.approx(0.535)
    assert fast["late_minus_baseline"]["mean"] == pytest.approx(0.045)
    assert fast["late_minus_baseline"]["ci95"] == pytest.approx(12.706205 * 0.005 * math.sqrt(2) / math.sqrt(2))
    assert base["late_minus_baseline"]["mean"] == pytest.approx(0.0)
    change = saved["summary"]["fast"]["paired_change_per_seed"]["1"]
    assert change["temporal_consistency"] == pytest.approx(0.12) and change["temporal_consistency_ci95"] == 0.0
    assert set(saved["curves"]["fast"]) == {"temporal_consistency"}
    c = saved["curves"]["fast"]["temporal_consistency"]
    assert c["t"] == [0, 30, 60] and c["mean"] == pytest.approx([0.40, 0.465, 0.535]) and c["band"] == "seeds"
    assert saved["curves"]["slow"]["temporal_consistency"]["band"] == "held-out clips"
    run = saved["runs"]["0"]["fast"]
    assert run["target"] == 0.50 and run["time_to_target"]["interpolated_s"] == pytest.approx(45.0)
    assert run["time_to_target_status"] == "reached"
    assert saved["goal"] is None  # branchgrpo_deppru is not among these presets
    # A finished run whose settings differ from the invocation's stops the bench instead of being mixed in.
    with pytest.raises(SystemExit, match="other settings.*budget_s"):
        ba.main([*argv[:-4], "--minutes", "2", *argv[-4:], "--report-only"])


def test_goal_needs_three_seeds_and_every_ratio_within_the_bound():
    per_seed = {"branchgrpo_deppru": {0: {"ratio": 0.5}, 1: {"ratio": 0.59}, 2: {"ratio": 0.61}}}
    presets = {"branchgrpo_deppru": {"time_to_target_ratio": {"geo_mean": 0.566}}}
    g = ba.goal_check(presets, "dancegrpo", per_seed)
    assert g["assessable"] and not g["met"] and g["bound"] == 0.6
    per_seed["branchgrpo_deppru"][2]["ratio"] = 0.6
    assert ba.goal_check(presets, "dancegrpo", per_seed)["met"]
    del per_seed["branchgrpo_deppru"][2]
    g = ba.goal_check(presets, "dancegrpo", per_seed)
    assert not g["assessable"] and not g["met"]
    assert ba.goal_check(presets, "mixgrpo", per_seed) is None


# ------------------------------------------------------------------------------------------------ resumability
def _cmd(cfg, work, out, *extra):
    return [sys.executable, str(ROOT / "tools" / "bench_alignment.py"), "--config", str(cfg), "--presets",
            "dancegrpo,branchgrpo_mix", "--seeds", "0", "--minutes", "0.04", "--eval-every-s", "1.2",
            "--work-dir", str(work), "--out", str(out), *extra]


ENV = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV, check=False)
    assert r.returncode == 0, f"failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.slow
def test_interrupted_bench_keeps_finished_runs_and_restarts_the_interrupted_one(tmp_path, tiny_setup, capsys,
                                                                                monkeypatch):
    cfg = tiny_setup(tmp_path, "dancegrpo", ["a green triangle moving up"], extra_yaml="optim: {micro_batch: 256}\n")
    work, out = tmp_path / "work", tmp_path / "al.json"
    first, second = ba.run_dir_of(work, "dancegrpo", 0), ba.run_dir_of(work, "branchgrpo_mix", 0)

    # 1. Only the first run, then stop (as an interruption between runs would).
    _run(_cmd(cfg, work, out, "--max-runs", "1"))
    assert (first / ba.RESULT).is_file() and not (second / ba.RESULT).exists()
    assert json.loads(out.read_text())["pending"] == [{"seed": 0, "label": "branchgrpo_mix"}]
    kept = ((first / ba.RESULT).read_bytes(), (first / ba.RESULT).stat().st_mtime_ns,
            (first / "metrics.jsonl").read_text())

    # 2. Continue, and kill the process in the middle of the second run (after its first evaluation).
    p = subprocess.Popen(_cmd(cfg, work, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and p.poll() is None:
            if (second / ba.CURVE).is_file() and (second / ba.CURVE).read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the bench ended before it could be interrupted"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert not (second / ba.RESULT).exists(), "killed mid-run, so the run must not count as finished"
    partial = (second / ba.CURVE).read_text().count("\n")

    # 3. Rerun: the finished run is kept as it was, the interrupted one starts again from its first iteration.
    r = _run(_cmd(cfg, work, out))
    assert "1 finished runs kept" in r.stdout and "[1/1] branchgrpo_mix seed 0" in r.stdout
    assert "dancegrpo seed 0: training" not in r.stdout
    assert ((first / ba.RESULT).read_bytes(), (first / ba.RESULT).stat().st_mtime_ns,
            (first / "metrics.jsonl").read_text()) == kept
    res = json.loads((second / ba.RESULT).read_text())
    iters = [json.loads(x)["iteration"] for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(res["iterations"])) and res["iterations"] >= 1
    lines = (second / ba.CURVE).read_text().splitlines()
    assert len(lines) == len(res["curve"]) >= partial and json.loads(lines[0])["train_s"] == 0.0
    assert res["train_s"] >= 0.04 * 60 and res["train_s"] == pytest.approx(sum(x["iter_s"] for x in res["rows"]))
    assert res["leaves"] == 16 * res["iterations"]
    assert res["forward_passes"] == sum(x["forward_passes"] for x in res["rows"])
    rep = json.loads(out.read_text())
    assert rep["pending"] == [] and rep["runs_trained_now"] == 1 and set(rep["summary"]) == {"dancegrpo",
                                                                                             "branchgrpo_mix"}
    # Same weights and held-out seeds: both presets start from the same held-out reward.
    assert rep["runs"]["0"]["dancegrpo"]["curve"][0]["mean"] == rep["runs"]["0"]["branchgrpo_mix"]["curve"][0]["mean"]
    for term, c in rep["curves"]["dancegrpo"].items():
        assert c["t"] == ba.eval_grid(0.04 * 60, 1.2) and c["band"] == "held-out clips", term

    # 4. Nothing left to do: a rerun trains nothing; other settings on the same work directory are refused. Neither
    # trains, so the tool's main runs in this process (the same argv as the command line; a SystemExit with a message
    # is what the interpreter prints to stderr with exit status 1).
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    rep = ba.main(_cmd(cfg, work, out)[2:])
    assert "0 to run" in capsys.readouterr().out and rep["runs_trained_now"] == 0
    assert json.loads(out.read_text())["runs_trained_now"] == 0
    with pytest.raises(SystemExit) as bad:
        ba.main(_cmd(cfg, work, out, "--set", "optim.lr=3e-4")[2:])
    msg = bad.value.code
    assert isinstance(msg, str) and "other settings" in msg and "common_overrides" in msg
