"""Runs that must not go on: every leaf invalid for iterations in a row, and a second run in a directory whose
first run is still alive (its launcher killed, its ranks orphaned)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_workers" / "fault_rewards.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
SMALL = ["tree.num_steps=6", "tree.split_steps=[0,1,2,3]", "optim.micro_batch=64", "logging.plot_every=0",
         "train.checkpoint_every=0"]
pytestmark = pytest.mark.slow


def _sets(*sets):
    return [a for s in (*SMALL, *sets) for a in ("--set", s)]


def _env():
    return dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")


def _session(sid):
    """The live processes of session ``sid`` (a launcher started with start_new_session, and its ranks)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                state = (p / "stat").read_text().rsplit(") ", 1)[1].split()[0]
                if os.getsid(int(p.name)) == sid and state != "Z":
                    pids.append(int(p.name))
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
    return sorted(pids)


def test_a_run_with_no_valid_leaf_stops_with_a_clear_error(tmp_path, tiny_setup):
    cfg = tiny_setup(tmp_path, "branchgrpo", ["a red square moving down"])
    run = tmp_path / "run"
    cmd = [sys.executable, str(WORKER), "--config", str(cfg),
           *_sets(f"train.run_dir={run}", "reward.components={down_on_ranks: {weight: 1.0, down: [0]}}",
                  "train.iterations=5")]  # train.max_invalid_iterations: its default, 3
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    errors = [x for x in r.stderr.splitlines() if "error:" in x]
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(errors) == 1 and "iterations 0-2" in errors[0] and "train.max_invalid_iterations=3" in errors[0], errors
    assert "Traceback" not in r.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["iteration"], row["valid_leaves"], row["invalid_leaves"]) for row in rows] == [
        (0, 0, 16), (1, 0, 16), (2, 0, 16)]
    assert not (run / "final").exists()  # nothing was learned, so nothing is exported


def test_second_run_is_refused_while_an_orphaned_rank_holds_the_directory(tmp_path, tiny_setup):
    cfg = tiny_setup(tmp_path, "branchgrpo", ["a red square moving down"])
    run = tmp_path / "run"
    sets = _sets(f"train.run_dir={run}", "train.iterations=200")

    def launch():
        return [str(DEEPSPEED), "--num_gpus", "1", "--master_port", str(free_port()), "--module", "video_branch.train",
                "--config", str(cfg), *sets]

    first = subprocess.Popen(launch(), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.5)
        assert metrics.is_file(), "the first run did not train an iteration in time"
        os.kill(first.pid, signal.SIGKILL)  # the launcher alone; its rank lives on, training
        first.wait()
        orphans = _session(first.pid)
        assert orphans, "no rank outlived the launcher"
        before = sorted(p.name for p in run.iterdir())
        second = subprocess.Popen(launch(), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        try:
            out, err = second.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            second.communicate()
            raise AssertionError("the second run was not refused: it ran on in the first run's directory") from None
        assert second.returncode != 0
        errors = [x for x in err.splitlines() if "error:" in x]
        assert len(errors) == 1 and "is in use by another run" in errors[0], err[-3000:]
        assert any(f"(pid {p} on " in errors[0] for p in orphans), (orphans, errors[0])
        assert "loading the models" not in out
        assert sorted(p.name for p in run.iterdir()) == before and not list(tmp_path.glob("run.prev-*"))
        assert set(_session(first.pid)) == set(orphans)  # and the first run's processes were left alone
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the orphaned rank is still in the launcher's session
        except ProcessLookupError:
            pass
