"""Faults on 2 ranks under the deepspeed launcher: a reward that is down on one rank, in training, in held-out
evaluation and across a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_workers" / "fault_rewards.py"
pytestmark = pytest.mark.slow
LEAVES = 16  # branchgrpo: 16 leaves per prompt, one prompt per rank
# Small trees keep the launch short: 6 steps, splits at 0, 1, 2, 3 (16 leaves).
SMALL = ["tree.num_steps=6", "tree.split_steps=[0,1,2,3]", "optim.micro_batch=64", "train.checkpoint_every=1",
         "logging.plot_every=0"]
REWARD = "reward.components={down_on_ranks: {weight: 1.0, down: [1]}}"


def launch(cfg, *sets, timeout=600):
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(WORKER), "--config", str(cfg), *[a for s in (*SMALL, *sets) for a in ("--set", s)]]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def down_on_rank1(tmp_path_factory, tiny_setup):
    """Two iterations with the reward down on rank 1 from the start, then the same run extended to three (the
    first iteration after the resume again scores nothing on rank 1, and the "before" evaluation is not rerun)."""
    d = tmp_path_factory.mktemp("down")
    cfg = tiny_setup(d, "branchgrpo", ["a red square moving down", "a blue circle moving left"])
    run = d / "run"
    first = launch(cfg, f"train.run_dir={run}", "train.iterations=2", REWARD)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    before_resume = rows(run)
    second = launch(cfg, f"train.run_dir={run}", "train.iterations=3", REWARD)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return run, before_resume, first, second


def test_reward_down_on_one_rank_trains_on_and_counts_its_leaves(down_on_rank1):
    run, before_resume, _, second = down_on_rank1
    assert [r["iteration"] for r in before_resume] == [0, 1]
    assert "at iteration 2" in second.stdout + second.stderr
    got = rows(run)
    assert [r["iteration"] for r in got] == [0, 1, 2]
    for r in got:
        assert r["invalid_leaves"] == LEAVES  # rank 1's leaves, every iteration, the resumed one included
        assert r["reward_mean"] is not None and 0 < r["reward_mean"] < 1  # rank 0's valid leaves
        for k in ("reward/down_on_ranks", "reward/down_on_ranks/brightness", "reward/down_on_ranks/contrast"):
            assert r[k] is not None, k
        assert "reward/down_on_ranks/down_on_ranks" not in r


def test_evaluation_with_one_rank_failing_keeps_clips_paired(down_on_rank1):
    """Held-out clips of rank 1 are NaN in every term, in their place: arrays of equal length, no stray key."""
    run, *_ = down_on_rank1
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    for ev in (before, after):
        per = ev["per_clip"]
        assert set(per) == {"down_on_ranks", "down_on_ranks/brightness", "down_on_ranks/contrast",
                            "down_on_ranks/overall"}
        assert {len(v) for v in per.values()} == {2}  # 2 held-out prompts x 1 clip, in order
        for v in per.values():
            assert v[0] is not None and v[0] == v[0] and (v[1] is None or v[1] != v[1])  # rank 1's clip is NaN
        assert ev["n"] == 2 and ev["valid"] == {k: 1 for k in per}
    change = after["change"]
    assert set(change) == {k for k in before["per_clip"]} | {k + "_ci95" for k in before["per_clip"]}
