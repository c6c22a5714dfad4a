"""``train.resume: auto`` never continues another run: a run directory whose config differs in method, model, LoRA or
tree, or whose checkpoint another world size wrote, stops the run before anything loads, and nothing changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from video_branch import train
from video_branch.config import load_config
from video_branch.parallel.groups import Dist

ROOT = Path(__file__).resolve().parents[1]


class ReachedLoading(Exception):
    """Raised where the run would load its models: every check passed."""


@pytest.fixture
def one_rank(monkeypatch):
    """A world of one without a process group, and a stop where the models would load."""
    def fake_dist(*a, **k):
        return Dist(rank=0, world_size=1, local_rank=0, sp_size=1, device=torch.device("cpu"))

    def stop(*a, **k):
        raise ReachedLoading("the run got past its checks to model loading")

    monkeypatch.setattr("video_branch.engine.trainer.init_distributed", fake_dist)
    monkeypatch.setattr("video_branch.engine.trainer.build_models", stop)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_setup):
    d = tmp_path_factory.mktemp("resume")
    return d, tiny_setup(d, "branchgrpo", ["a red square moving down"])


def earlier_run(run: Path, cfg_path: Path, *sets: str, ranks: int = 1) -> None:
    """The files a branchgrpo run leaves after 2 iterations: its resolved config, metrics, checkpoint, final/."""
    run.mkdir(parents=True)
    load_config(cfg_path, [f"train.run_dir={run}", *sets]).save(run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"iteration": 0, "forward_passes": 203}\n'
                                       '{"iteration": 1, "forward_passes": 203}\n')
    tag = run / "checkpoints" / "iter_000002"
    tag.mkdir(parents=True)
    for r in range(ranks):
        (tag / f"rng_rank{r}.pt").write_bytes(b"state")
    (run / "checkpoints" / "latest").write_text("iter_000002\n")
    (run / "final").mkdir()
    (run / "final" / "model_index.json").write_text("{}")


def snapshot(root: Path):
    """Every path beside and below ``root`` with its bytes and mtime (directories by name: the lock file is the one
    thing a run may add)."""
    return {str(p.relative_to(root.parent)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.parent.rglob("*")) if p.name != ".lock"}


@pytest.mark.parametrize("sets, needles", [
    (["method=dancegrpo"], ["method: 'branchgrpo' -> 'dancegrpo'", "tree.roots: 1 -> 16", "tree.split_steps"]),
    (["model.lora.rank=4"], ["model.lora.rank: 0 -> 4"]),
    (["tree.num_steps=10", "tree.split_steps=[0, 2]"], ["tree.num_steps: 20 -> 10"]),
])
def test_resuming_another_runs_directory_stops_and_changes_nothing(setup, tmp_path, capsys, one_rank, sets,
                                                                   needles):
    d, cfg = setup
    run = tmp_path / "runs" / "a"
    earlier_run(run, cfg)
    before = snapshot(run)
    rc = train.main(["--config", str(cfg), "--set", f"train.run_dir={run}", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "error:" in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    assert "train.run_dir" in err[0] and "train.resume: never" in err[0]
    assert snapshot(run) == before  # config.yaml, metrics, checkpoints and final/ untouched, nothing moved aside


def test_same_run_with_more_iterations_still_resumes(setup, tmp_path, one_rank):
    d, cfg = setup
    run = tmp_path / "a"
    earlier_run(run, cfg)
    with pytest.raises(ReachedLoading):  # checks passed: it goes on to load and resume
        train.main(["--config", str(cfg), "--set", f"train.run_dir={run}", "--set", "train.iterations=4",
                    "--set", "model.attention_backend=native"])
    assert (run / "metrics.jsonl").is_file() and not list(tmp_path.glob("a.prev-*"))


def test_resuming_with_another_world_size_is_refused_with_the_limit(setup, tmp_path, capsys, one_rank):
    d, cfg = setup
    run = tmp_path / "a"
    earlier_run(run, cfg, ranks=2)
    rc = train.main(["--config", str(cfg), "--set", f"train.run_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert "written by 2 ranks" in err[0] and "this run has 1" in err[0] and "relaunch with 2 ranks" in err[0]


def test_import_registers_a_custom_reward_before_the_checks(setup, tmp_path, capsys, one_rank, monkeypatch):
    """``--import MODULE`` loads a module that registers a reward, so no launcher script of one's own is needed."""
    d, cfg = setup
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "dist_workers"))
    monkeypatch.setitem(os.environ, "PYTHONWARNINGS", "ignore")
    argv = ["--config", str(cfg), "--set", f"train.run_dir={tmp_path / 'run'}",
            "--set", "reward.components={down_on_ranks: {weight: 1.0, down: []}}"]
    if "fault_rewards" not in sys.modules:
        assert train.main(argv) != 0
        assert "unknown reward 'down_on_ranks'" in capsys.readouterr().err
    with pytest.raises(ReachedLoading):
        train.main(["--import", "fault_rewards", *argv])
