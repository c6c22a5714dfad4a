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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a process group's or a launcher's master port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ one shared 2-rank launch
ROOT = Path(__file__).resolve().parents[1]
_SHARED_JOBS = {}


def shared_jobs(provider):
    """Register ``provider(d) -> [job, ...]`` for the calling test module: it writes what its jobs need under the
    fresh directory ``d`` and returns ``tests/dist_workers/train_presets.py`` jobs (``NAME=CONFIG[@key=value...]``).
    The jobs of every module that registered some run in the session's one 2-rank launch (``shared_runs``), so the
    launcher's and the ranks' start-up is paid once; job NAME trains into ``shared_runs[module][1] / NAME``."""
    _SHARED_JOBS[provider.__module__] = provider
    return provider


@pytest.fixture(scope="session")
def shared_runs(request, tmp_path_factory):
    """One ``deepspeed --num_gpus 2 tests/dist_workers/train_presets.py`` launch running, one after the other, the
    jobs of the registered modules that have a selected test using this fixture; ``{module: (d, runs)}``."""
    import os
    import subprocess
    import sys

    wanted = sorted({item.module.__name__ for item in request.session.items
                     if "shared_runs" in getattr(item, "fixturenames", ()) and getattr(item, "module", None)
                     and item.module.__name__ in _SHARED_JOBS})
    out = tmp_path_factory.mktemp("shared_runs")
    jobs, dirs = [], {}
    for mod in wanted:
        d = tmp_path_factory.mktemp(mod)
        dirs[mod] = (d, out / mod)
        jobs += [f"{mod}/{job}" for job in _SHARED_JOBS[mod](d)]  # run directory out/<module>/<NAME>
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist_workers" / "train_presets.py"), str(out), *jobs]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return dirs
