"""End-to-end training runs: the launcher contract, the run directory, resume after SIGKILL, faults, the image case.

These launch real processes (DeepSpeed ZeRO-3 over gloo on the CPU) and are marked slow; `make test` still runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
REQUIRED_KEYS = {"iteration", "reward_mean", "rollout_s", "reward_s", "train_s", "iter_s", "forward_passes",
                 "trained_edges", "ratio_max_dev", "loss", "grad_norm", "lr"}
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["TQDM_DISABLE"] = "1"
    return env


def launch(config, *overrides, ranks=2, timeout=600, check=True):
    """Run a training job as a user would: the deepspeed launcher for 2 ranks, python -m for one."""
    sets = [a for o in overrides for a in ("--set", o)]
    if ranks > 1:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "video_branch.train", "--config", str(config), *sets]
    else:
        cmd = [sys.executable, "-m", "video_branch.train", "--config", str(config), *sets]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random Wan directory, prompt files and a config using the weight-free temporal reward."""
    from video_branch.models.tiny import build_tiny_wan

    d = tmp_path_factory.mktemp("tiny")
    build_tiny_wan(d / "model", seed=0)
    (d / "train.txt").write_text("a red circle moving left\na blue square moving right\na green triangle moving up\n")
    (d / "heldout.txt").write_text("a red square moving down\na blue circle moving left\n")
    cfg = d / "c.yaml"
    cfg.write_text(
        f"""method: branchgrpo
model: {{path: {d / 'model'}, max_sequence_length: 16}}
video: {{num_frames: 9, height: 32, width: 32}}
reward: {{components: {{temporal_consistency: {{weight: 1.0}}}}}}
optim: {{micro_batch: 64, lr: 1.0e-4}}
train: {{iterations: 2, prompt_file: {d / 'train.txt'}, checkpoint_every: 1}}
eval: {{prompt_file: {d / 'heldout.txt'}, clips_per_prompt: 1, num_steps: 4}}
logging: {{plot_every: 1}}
"""
    )
    return d, cfg


def test_two_ranks_write_the_run_directory_contract(tiny_setup, tmp_path):
    d, cfg = tiny_setup
    run = tmp_path / "run"
    launch(cfg, f"train.run_dir={run}", "train.dump_trees=true")
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert "reward/temporal_consistency" in r
        assert r["forward_passes"] == 203 and r["trained_edges"] == 218
        assert r["ratio_max_dev"] < 1e-5  # on-policy check at the first inner step
    assert (run / "config.yaml").is_file() and (run / "reward_curve.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_000002"
    # Tree dump: one file per iteration and rank, with the contract's arrays.
    for it in (0, 1):
        for rank in (0, 1):
            z = np.load(run / "trees" / f"iter_{it:06d}_rank{rank}.npz")
            for key in ("tree", "parent", "depth", "step", "sde", "logp", "leaf_reward", "value", "advantage",
                        "trained"):
                assert z[key].shape == (218 + 1,), key
            assert int(z["trained"].sum()) == 218
            assert (np.isnan(z["leaf_reward"][z["depth"] < 20]).all()
                    and np.isfinite(z["leaf_reward"][z["depth"] == 20]).all())
    # final/ loads with diffusers and generates a clip.
    import diffusers
    import torch

    pipe = diffusers.WanPipeline.from_pretrained(str(run / "final"))
    out = pipe("a red circle moving left", num_frames=5, height=32, width=32, num_inference_steps=2,
               guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert np.asarray(out).shape == (1, 5, 32, 32, 3)


def test_sigkill_after_first_checkpoint_resumes_at_next_iteration(tiny_setup, tmp_path):
    d, cfg = tiny_setup
    run = tmp_path / "run"
    args = [sys.executable, "-m", "video_branch.train", "--config", str(cfg), "--set", f"train.run_dir={run}",
            "--set", "train.iterations=4", "--set", "train.checkpoint_every=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 400
    while time.time() < deadline and not latest.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    assert latest.is_file(), "no checkpoint was written in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved < 4
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at iteration {saved}" in r.stdout + r.stderr
    its = [row["iteration"] for row in metrics(run)]
    assert its == list(range(4)), its  # every iteration exactly once, none lost, none repeated


def test_failing_reward_sample_is_excluded_not_faked(tiny_setup, tmp_path):
    """A reward that raises for one sample gives NaN for it; the trainer excludes it and counts it."""
    d, cfg = tiny_setup
    run = tmp_path / "run"
    script = tmp_path / "run_flaky.py"
    script.write_text(
        f"""
import sys, torch
from reward_models.registry import register

CALLS = {{"single": 0}}

@register("flaky_test")
class Flaky:
    # Raises on every batched call; scored one by one, the 5th single-sample call fails (the 3rd training leaf:
    # held-out evaluation before training makes 2 single calls first).

    def __call__(self, frames, prompts):
        if frames.shape[0] > 1:
            raise RuntimeError("simulated batch failure")
        CALLS["single"] += 1
        if CALLS["single"] == 5:
            raise RuntimeError("simulated sample failure")
        return {{"flaky_test": frames.float().mean(dim=(1, 2, 3, 4)) / 255.0}}

from video_branch.train import main
sys.exit(main(["--config", {str(cfg)!r}, "--set", "train.run_dir={run}",
               "--set", "reward.components={{flaky_test: {{weight: 1.0}}}}",
               "--set", "train.prompt_file={d / 'heldout.txt'}", "--set", "train.dump_trees=true",
               "--set", "train.iterations=1"]))
"""
    )
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    row = metrics(run)[0]
    z = np.load(run / "trees" / "iter_000000_rank0.npz")
    leaves = z["depth"] == 20
    bad = np.nonzero(leaves & np.isnan(z["leaf_reward"]))[0]
    assert len(bad) == 1 and row["invalid_leaves"] == 1
    assert bad[0] == np.nonzero(leaves)[0][2]  # the third leaf, and only it
    assert z["advantage"][bad[0]] == 0  # excluded: no signal, but the edge still runs (lockstep)
    assert np.isfinite(z["advantage"]).all() and np.isfinite(z["leaf_reward"][leaves]).sum() == 15
    # Walk up: the chain above the failed leaf has no valid leaf (NaN value, zero advantage); the last split's parent
    # (depth 9) fuses only its other, valid leaf.
    n = bad[0]
    while z["depth"][n] > 9:
        n = z["parent"][n]
        if z["depth"][n] >= 10:
            assert np.isnan(z["value"][n]) and z["advantage"][n] == 0
    below = [m for m in np.nonzero(leaves)[0] if m != bad[0] and _ancestor(z["parent"], m, 9, z["depth"]) == n]
    assert len(below) == 1
    assert np.isclose(z["value"][n], z["leaf_reward"][below[0]], atol=1e-6)


def _ancestor(parent, node, depth, depths):
    while depths[node] > depth:
        node = parent[node]
    return node


@pytest.mark.parametrize(
    "broken, needle",
    [("empty_prompts", "holds no prompts"), ("missing_prompts", "train.prompt_file not found"),
     ("missing_vae", "component 'vae'")],
)
def test_bad_inputs_stop_with_a_clear_message(tiny_setup, tmp_path, broken, needle):
    import shutil

    d, cfg = tiny_setup
    sets = [f"train.run_dir={tmp_path / 'run'}"]
    if broken == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n\n")
        sets.append(f"train.prompt_file={tmp_path / 'empty.txt'}")
    elif broken == "missing_prompts":
        sets.append(f"train.prompt_file={tmp_path / 'nope.txt'}")
    else:
        shutil.copytree(d / "model", tmp_path / "model", ignore=shutil.ignore_patterns("vae"))
        sets.append(f"model.path={tmp_path / 'model'}")
    r = launch(cfg, *sets, ranks=1, check=False, timeout=300)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_sequence_parallel_run_matches_single_rank_rewards(tiny_setup, tmp_path):
    """sp_size 2 on 2 ranks is one data-parallel member: its first iteration equals a single-rank run's."""
    d, cfg = tiny_setup
    sp2, sp1 = tmp_path / "sp2", tmp_path / "sp1"
    r = launch(cfg, f"train.run_dir={sp2}", "parallel.sp_size=2", "train.dump_trees=true", "train.checkpoint_every=0")
    assert "2 sequence-parallel (Ulysses on)" in r.stdout
    launch(cfg, f"train.run_dir={sp1}", "train.dump_trees=true", "train.iterations=1", "train.checkpoint_every=0",
           ranks=1)
    a = np.load(sp2 / "trees" / "iter_000000_rank0.npz")
    b = np.load(sp2 / "trees" / "iter_000000_rank1.npz")
    c = np.load(sp1 / "trees" / "iter_000000_rank0.npz")
    leaves = a["depth"] == 20
    np.testing.assert_array_equal(a["leaf_reward"], b["leaf_reward"])  # rewards computed once, shared in the group
    np.testing.assert_allclose(a["leaf_reward"][leaves], c["leaf_reward"][leaves], atol=1e-4)
    np.testing.assert_allclose(a["logp"][1:], c["logp"][1:], atol=1e-4)
    assert [row["iteration"] for row in metrics(sp2)] == [0, 1]


def test_non_finite_loss_skips_the_update_and_keeps_the_weights(tiny_setup, tmp_path):
    d, cfg = tiny_setup
    run = tmp_path / "run"
    script = tmp_path / "run_nan.py"
    script.write_text(
        f"""
import sys, torch
from video_branch.core.objectives import ObjectiveOut, clipped_ratio, register_objective

@register_objective("nan_once_test")
def nan_once(logp_new, logp_old, advantages, **kw):
    out = clipped_ratio(logp_new, logp_old, advantages, **kw)
    return ObjectiveOut(loss=out.loss * float("nan"), ratio=out.ratio, clipped_frac=out.clipped_frac, kl=out.kl)

from video_branch.train import main
sys.exit(main(["--config", {str(cfg)!r}, "--set", "train.run_dir={run}", "--set", "objective.name=nan_once_test",
               "--set", "train.iterations=1", "--set", "optim.micro_batch=100", "--set", "optim.minibatch=0"]))
"""
    )
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    row = metrics(run)[0]
    assert row["skipped_micro_steps"] == 3 and row["skipped_updates"] == 1  # 218 edges in 3 micro-batches
    from safetensors.torch import load_file

    before = load_file(str(next((d / "model" / "transformer").glob("*.safetensors"))))
    after = load_file(str(next((run / "final" / "transformer").glob("*.safetensors"))))
    assert before.keys() == after.keys()
    for k in before:
        assert torch_equal(before[k], after[k]), k


def torch_equal(a, b):
    import torch

    return bool(torch.equal(a.float(), b.float()))
