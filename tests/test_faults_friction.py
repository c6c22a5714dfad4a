"""Smaller faults: final/ holds only the trained model, argument checks come before the model, the reward curve's
mean stays visible."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import probe_gradient  # noqa: E402


def test_final_holds_the_model_not_the_base_models_own_logs(tmp_path):
    from video_branch.models.export import export_pipeline_dir
    from video_branch.models.tiny import build_tiny_wan
    from video_branch.models.wan import load_wan

    src = tmp_path / "base"
    build_tiny_wan(src, seed=0)
    for name in ("eval_heldout.json", "pretrain_log.json", "loss_curve.png"):  # the base model's own results
        (src / name).write_text("{}")
    (src / "vae" / "notes.txt").write_text("inside a component: kept")
    transformer = load_wan(src, components=("transformer",)).transformer
    out = export_pipeline_dir(transformer, src, tmp_path / "final", is_main=True, zero3=False)
    index = json.loads((out / "model_index.json").read_text())
    components = {k for k, v in index.items() if isinstance(v, list) and None not in v}
    assert sorted(p.name for p in out.iterdir()) == sorted({"model_index.json", *components})
    assert (out / "vae" / "notes.txt").is_file() and list((out / "transformer").glob("*.safetensors"))


def test_probe_gradient_checks_batches_before_building_the_model(monkeypatch, capsys):
    def built(*a, **k):
        raise AssertionError("the trainer was built before --batches was checked")

    monkeypatch.setattr("video_branch.engine.trainer.Trainer", built)
    with pytest.raises(SystemExit) as e:
        probe_gradient.main(["--config", str(ROOT / "configs" / "tiny" / "demo.yaml"), "--batches", "2"])
    assert e.value.code == 2 and "--batches must be at least 3" in capsys.readouterr().err


def test_reward_curve_draws_the_mean_on_top_and_names_identical_terms(tmp_path, monkeypatch):
    import matplotlib.axes

    from video_branch.engine.logging import RunLogger

    drawn = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("zorder")))
        return real(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, plot_every=0)
    for it in range(5):
        log.log({"iteration": it, "reward_mean": 0.1 * it, "reward/toyworld": 0.1 * it,
                 "reward/toyworld/colour": 0.5})
    log.plot()
    labels = [lab for lab, _ in drawn if lab is not None]
    assert labels == ["reward/toyworld/colour", "reward_mean (= reward/toyworld)"]  # the mean last, on top
    assert drawn[-1][1] == 3


def test_pretrain_tiny_checks_step_counts_and_trains_a_short_vae_schedule(capsys):
    import pretrain_tiny  # noqa: E402
    import torch

    with pytest.raises(SystemExit):
        pretrain_tiny.parse_args(["--out", "/tmp/unused", "--vae-steps", "2"])
    assert "--vae-steps: expected an integer >= 3, got 2" in capsys.readouterr().err
    args = pretrain_tiny.parse_args(["--out", "/tmp/unused", "--vae-steps", "20"])
    # 20 steps used to raise ZeroDivisionError in OneCycleLR (a warm-up of 0.05 * 20 = 1 step): run the schedule the
    # script builds, step by step.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.vae_lr)
    sched = pretrain_tiny.vae_schedule(opt, args)
    for _ in range(args.vae_steps - 1):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] < args.vae_lr
