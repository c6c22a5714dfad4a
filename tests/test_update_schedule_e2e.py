"""Mini-batch update schedules end to end on 2 ranks (DeepSpeed ZeRO-3 over gloo): the first step is on-policy, the
later steps see moved weights (nonzero ratio deviation, the clip acts), and the lockstep check holds.

The session's shared distributed launch (``tests/dist_workers/train_presets.py``, see ``shared_runs`` in conftest.py)
runs an edge-shuffled tree (BranchGRPO) and a chain-grouped sequential group (DanceGRPO), the latter also with
GRPO-Guard's ratio normalisation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from video_branch.config import load_config
from video_branch.config.specs import update_schedule

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "tests"))
from conftest import shared_jobs
from test_train_e2e import metrics

JOBS = {
    # 14 edges per tree (splits at steps 0 and 1 of 4), a step every 4 edges: 4, 4, 4, 2.
    "tree": ["method=branchgrpo", "tree.num_steps=4", "tree.split_steps=[0, 1]", "optim.minibatch=4",
             "optim.micro_batch=3"],
    # 6 chains of 3 trained edges (last step not trained, timestep fraction 1), 2 chains per step.
    "chains": ["method=dancegrpo", "tree.roots=6", "tree.num_steps=4", "prune.timestep_fraction=1.0",
               "optim.minibatch=2", "optim.micro_batch=4"],
    # GRPO-Guard: the old means of the second mini-batch come from a forward on the rollout's weights.
    "guard": ["method=dancegrpo", "tree.roots=4", "tree.num_steps=4", "prune.timestep_fraction=1.0",
              "objective.ratio_norm=true", "optim.minibatch=2", "optim.micro_batch=4"],
}
STEPS = {"tree": 4, "chains": 3, "guard": 2}


@shared_jobs
def _shared(d: Path) -> list[str]:
    """The tiny model, prompts and base config in ``d``; the jobs run in the session's shared 2-rank launch."""
    from video_branch.models.tiny import build_tiny_wan

    build_tiny_wan(d / "model", seed=0)
    (d / "train.txt").write_text("a red circle moving left\na blue square moving right\n")
    (d / "heldout.txt").write_text("a red square moving down\n")
    cfg = d / "c.yaml"
    cfg.write_text(
        f"""model: {{path: {d / 'model'}, max_sequence_length: 16}}
video: {{num_frames: 5, height: 32, width: 32}}
reward: {{components: {{temporal_consistency: {{weight: 1.0}}}}}}
optim: {{lr: 3.0e-3}}
train: {{iterations: 2, prompt_file: {d / 'train.txt'}, checkpoint_every: 0}}
eval: {{prompt_file: {d / 'heldout.txt'}, clips_per_prompt: 1, num_steps: 2, num_prompts: 1}}
logging: {{plot_every: 0, tensorboard: false}}
"""
    )
    return [f"{name}={cfg}@" + "@".join(o) for name, o in JOBS.items()]


@pytest.fixture(scope="module")
def runs(shared_runs):
    d, out = shared_runs[__name__]
    return out, d / "c.yaml"


@pytest.mark.parametrize("name", list(JOBS))
def test_minibatch_steps_on_two_ranks(runs, name):
    out, cfg = runs
    rows = metrics(out / name)
    assert [r["iteration"] for r in rows] == [0, 1]
    sched = update_schedule(load_config(cfg, JOBS[name]))
    assert sched["optimizer_steps"] == STEPS[name]
    for r in rows:
        # DeepSpeed's own step counter moved once per mini-batch.
        assert r["optimizer_steps"] == sched["optimizer_steps"]
        assert len(r["step_ratio_max_dev"]) == len(r["step_clip_frac"]) == sched["optimizer_steps"]
        assert r["ratio_max_dev"] < 1e-5 and r["step_ratio_max_dev"][0] < 1e-5  # the first step is on-policy
        assert r["step_clip_frac"][0] == 0.0
        later = np.array(r["step_ratio_max_dev"][1:])
        assert (later > 1e-5).all()  # later steps see the moved weights
        assert r["ratio_max_dev_later"] > 1e-5
        assert r["clip_frac_later"] > 0  # and the clip acts
        assert np.isfinite(r["loss"]) and r["skipped_updates"] == 0
        assert r["trained_edges"] == sched["units"]
    print(name, [(r["ratio_max_dev"], r["ratio_max_dev_later"], r["clip_frac_later"]) for r in rows])


def test_micro_batching_inside_a_minibatch_leaves_the_update_unchanged(runs, tmp_path):
    """Three edges per backward call or the whole mini-batch in one: the same optimizer steps (the accumulation
    boundary is the mini-batch's end, and each micro-batch weighs its share)."""
    from safetensors.torch import load_file

    _, cfg = runs
    # Both single-rank runs, one after the other in one process (tests/dist_workers/train_presets.py).
    shared = ["train.iterations=1", "eval.num_steps=1", *JOBS["tree"][:-1]]
    jobs = ["@".join([f"mb{mb}={cfg}", *shared, f"optim.micro_batch={mb}"]) for mb in (3, 100)]
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_workers" / "train_presets.py"), str(tmp_path),
                        *jobs], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    finals = []
    for mb in (3, 100):
        run = tmp_path / f"mb{mb}"
        assert [row["iteration"] for row in metrics(run)] == [0]
        finals.append(load_file(str(next((run / "final" / "transformer").glob("*.safetensors")))))
    base = load_file(str(next((cfg.parent / "model" / "transformer").glob("*.safetensors"))))
    moved = max(float((finals[0][k] - base[k]).abs().max()) for k in base)
    diff = max(float((finals[0][k] - finals[1][k]).abs().max()) for k in base)
    assert moved > 1e-3 and diff < 1e-3 * moved
