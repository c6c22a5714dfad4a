"""The benchmark tools: variant parsing, FLOP counting, time to target, and both tools run end to end on a tiny model.

The end-to-end runs launch the tools as a user would (a subprocess each, tiny random Wan model, weight-free temporal
reward) and check their JSON against the preset accounting and against their own raw measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import _bench_common as bc
import bench_alignment
import bench_iteration


# ------------------------------------------------------------------------------------------------ pure pieces
def test_parse_variant_label_preset_and_overrides():
    assert bc.parse_variant("dancegrpo") == bc.Variant("dancegrpo", "dancegrpo", ())
    v = bc.parse_variant("tf1=dancegrpo+prune.timestep_fraction=1.0+prune.exclude_last_step=false")
    assert v == bc.Variant("tf1", "dancegrpo", ("prune.timestep_fraction=1.0", "prune.exclude_last_step=false"))
    v = bc.parse_variant("mixgrpo+tree.window.size=2")
    assert (v.label, v.preset, v.overrides) == ("mixgrpo+tree.window.size=2", "mixgrpo", ("tree.window.size=2",))


def test_parse_variants_rejects_unknown_presets_bad_overrides_and_duplicate_labels():
    from video_branch.config import ConfigError

    with pytest.raises(ConfigError, match="branchgrpo"):
        bc.parse_variant("branchgrp")
    with pytest.raises(ValueError, match="not key=value"):
        bc.parse_variant("dancegrpo+prune.width")
    with pytest.raises(ValueError, match="repeated"):
        bc.parse_variants("dancegrpo,dancegrpo")


def test_variant_config_applies_preset_then_overrides(tmp_path):
    v = bc.parse_variant("tf1=dancegrpo+prune.timestep_fraction=1.0")
    cfg = bc.variant_config(str(ROOT / "configs/tiny/branchgrpo.yaml"), v, ["train.seed=7"], tmp_path / "r")
    assert cfg.method == "dancegrpo" and cfg.tree.roots == 16  # the preset, not the base file's method
    assert cfg.prune.timestep_fraction == 1.0 and cfg.train.seed == 7 and cfg.train.run_dir == str(tmp_path / "r")


def test_count_flops_matches_hand_counts_for_linear_and_cpu_attention():
    lin = torch.nn.Linear(24, 40, bias=False)
    x = torch.randn(5, 24)
    assert bench_iteration.count_flops(lambda: lin(x)) == 2 * 5 * 24 * 40
    q = torch.randn(2, 3, 7, 8)  # [B, heads, L, head_dim]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert bench_iteration.count_flops(lambda: sdpa(q, q, q)) == 2 * (2 * 2 * 3 * 7 * 7 * 8)  # QK^T and PV


def test_time_to_target_interpolates_the_first_crossing():
    curve = [{"train_s": 0.0, "mean": 0.2}, {"train_s": 60.0, "mean": 0.3}, {"train_s": 120.0, "mean": 0.5},
             {"train_s": 180.0, "mean": 0.4}]
    t = bench_alignment.time_to_target(curve, 0.4)
    assert t["at_eval_s"] == 120.0
    assert t["interpolated_s"] == pytest.approx(60.0 + (0.4 - 0.3) / (0.5 - 0.3) * 60.0)
    assert bench_alignment.time_to_target(curve, 0.6) == {"at_eval_s": None, "interpolated_s": None}
    assert bench_alignment.time_to_target(curve, 0.1) == {"at_eval_s": 0.0, "interpolated_s": 0.0}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, tiny_setup):
    d = tmp_path_factory.mktemp("bench")
    cfg = tiny_setup(d, "dancegrpo", ["a green triangle moving up", "a red square moving down"],
                     extra_yaml="optim: {micro_batch: 256}\n")
    return d, cfg


def _run(tool, *args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env, check=False)
    assert r.returncode == 0, f"{tool} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.slow
def test_bench_iteration_reports_accounting_medians_and_ratios(tiny_bench, tmp_path):
    _, cfg = tiny_bench
    out = tmp_path / "it.json"
    _run("bench_iteration.py", "--config", str(cfg), "--presets", "dancegrpo,branchgrpo_mix", "--iterations", "1",
         "--warmup", "0", "--compute-layers", "1", "--compute-heads", "2", "--compute-head-dim", "16",
         "--compute-ffn", "64", "--out", str(out))
    res = json.loads(out.read_text())
    assert set(res["settings"]) == {"tiny", "compute"}
    assert res["settings"]["compute"]["forward"]["transformer"]["num_layers"] == 1
    for s in res["settings"].values():
        dance, mix = s["presets"]["dancegrpo"], s["presets"]["branchgrpo_mix"]
        # Counts come from the metrics rows; they must equal the presets' accounting (16 leaves each).
        assert (dance["median"]["forward_passes"], dance["median"]["trained_edges"]) == (320, 176)
        assert (mix["median"]["forward_passes"], mix["median"]["trained_edges"]) == (203, 34)
        for p in (dance, mix):
            assert len(p["runs"]) == 1 and p["leaves"] == 16
            run = p["runs"][0]
            assert run["iter_s"] >= run["rollout_s"] + run["reward_s"] + run["train_s"] - 1e-6
            assert p["rollout_flops"] == pytest.approx(s["forward"]["flops_per_sample"] * run["forward_passes"])
            assert p["rollout_fraction_of_matmul_peak"] == pytest.approx(
                p["rollout_flops"] / run["rollout_s"] / s["matmul"]["peak_flops_per_s"])
        assert dance["ratio_to_baseline"]["iter_ratio"] == 1.0
        assert mix["ratio_to_baseline"]["iter_ratio"] == pytest.approx(
            mix["runs"][0]["iter_s"] / dance["runs"][0]["iter_s"])
        assert mix["ratio_to_baseline"]["rollout_per_leaf_ratio"] == pytest.approx(
            mix["runs"][0]["rollout_s"] / dance["runs"][0]["rollout_s"])
        assert mix["ratio_to_baseline"]["forward_pass_ratio"] == pytest.approx(203 / 320)
        assert 0.0 <= s["forward"]["matrix_share"]["share"] <= 1.0
    goal_presets = {(g["setting"], g["preset"]) for g in res["goals"]}
    assert goal_presets == {("tiny", "branchgrpo_mix"), ("compute", "branchgrpo_mix")}


@pytest.mark.slow
def test_bench_alignment_budget_curves_target_and_plot(tiny_bench, tmp_path):
    _, cfg = tiny_bench
    out = tmp_path / "al.json"
    minutes = 0.05
    _run("bench_alignment.py", "--config", str(cfg), "--presets", "dancegrpo,branchgrpo", "--minutes", str(minutes),
         "--eval-every-s", "1000", "--seeds", "0", "--out", str(out))
    res = json.loads(out.read_text())
    runs = res["runs"]["0"]
    target = runs["dancegrpo"]["curve"][-1]["mean"]
    for r in runs.values():
        assert r["metric"] == "temporal_consistency"
        assert r["train_s"] >= minutes * 60 and r["iterations"] == len(r["rows"]) >= 1
        # Training time is the sum of iteration times, evaluation excluded.
        assert r["train_s"] == pytest.approx(sum(row["iter_s"] for row in r["rows"]))
        assert [p["train_s"] for p in r["curve"]] == [0.0, r["train_s"]]  # start and end of the budget
        assert r["final"]["mean"] == r["curve"][-1]["mean"] and r["target"] == target
    # Same weights and evaluation seeds: every preset starts from the same held-out reward.
    assert runs["dancegrpo"]["curve"][0]["mean"] == runs["branchgrpo"]["curve"][0]["mean"]
    assert res["summary"]["dancegrpo"]["final_mean"] == target
    assert Path(res["plot"]).stat().st_size > 0
