"""The typed config: presets, overrides, validation, YAML round trip, and the CLI's early exit on a typo."""

import sys
from pathlib import Path

import pytest
import yaml

from video_branch.config import Config, ConfigError, config_from_dict, known_keys, load_config
from video_branch.config.presets import get_preset, preset_names

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_preset_then_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: dancegrpo\noptim:\n  lr: 2e-5\ntree:\n  eta: 0.5\n")
    cfg = load_config(p, ["tree.eta=0.25", "train.iterations=3"])
    assert cfg.method == "dancegrpo"
    assert cfg.tree.roots == 16 and cfg.tree.split_steps == []  # from the preset
    assert cfg.optim.lr == pytest.approx(2e-5)  # YAML 1.1 reads 2e-5 as a string; coerced to float
    assert cfg.tree.eta == 0.25  # override beats file
    assert cfg.train.iterations == 3
    assert cfg.prune.timestep_fraction == 0.6 and cfg.objective.clip_eps == pytest.approx(1e-4)


def test_method_override_switches_preset():
    cfg = load_config(None, ["method=branchgrpo_widpru"])
    assert cfg.prune.width == "parent_top1" and cfg.tree.split_steps == [0, 3, 6, 9]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_round_trips(name, tmp_path):
    cfg = load_config(None, method=name)
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg
    # Reading the written file as a user config (preset re-applied under it) gives the same config too.
    assert load_config(path) == cfg
    for section, values in get_preset(name).items():
        if isinstance(values, dict):
            for k, v in values.items():
                if not isinstance(v, dict):
                    assert getattr(getattr(cfg, section), k) == v, (name, section, k)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr_rate=1", "did you mean 'optim.lr'"),
        ("optim.lr=-1", "optim.lr"),
        ("tree.branching=2.5", "tree.branching"),
        ("tree.sde_form=heun", "'dance', 'flow'"),
        ("video.num_frames=8", "4k+1"),
        ("video.height=60", "multiple of 16"),
        ("tree.split_steps=[0,30]", "tree.split_steps"),
        ("method=branchgrp", "did you mean 'branchgrpo'"),
        ("train.dump_trees=maybe", "train.dump_trees"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'train.iterations'"):
        load_config(p)


def test_reward_components_accept_free_options():
    cfg = load_config(None, ["reward.components.toyworld.weight=2",
                             "reward.components.temporal_consistency.weight=0.5"])
    assert cfg.reward.components["toyworld"]["weight"] == 2
    assert cfg.reward.components["temporal_consistency"] == {"weight": 0.5}


def test_known_keys_cover_sections():
    keys = set(known_keys())
    for k in ("method", "train.iterations", "train.seed", "train.run_dir", "train.dump_trees", "train.resume",
              "video.num_frames", "parallel.sp_size"):
        assert k in keys


def test_default_config_is_valid():
    assert isinstance(load_config(None), Config)


def test_cli_typo_exits_before_loading_any_model(tmp_path, capsys, monkeypatch):
    # The model path does not exist: reaching the model loader would give a different error. The entry point's main
    # (what ``python -m video_branch.train`` runs) is called in this process; the trainer must never be built.
    from video_branch.train import main

    def built(*a, **k):
        raise AssertionError("the trainer was built before the config was checked")

    monkeypatch.setattr("video_branch.engine.trainer.Trainer", built)
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  path: /nonexistent/model\noptim:\n  lr_rate: 1e-4\n")
    capsys.readouterr()
    code = main(["--config", str(p)])
    err = capsys.readouterr().err
    assert code != 0
    assert "optim.lr_rate" in err and "optim.lr" in err
    assert "/nonexistent/model" not in err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_resolve(path):
    if path.stem == "bench":  # the method bench's base config: it names no method, every preset loads onto it
        sys.path.insert(0, str(ROOT / "tools"))
        import bench_alignment

        assert "method" not in yaml.safe_load(path.read_text())
        for preset in bench_alignment.PRESETS.split(","):
            cfg = load_config(path, method=preset)
            assert cfg.method == preset and cfg.model.lora.rank == 8
            assert cfg.rollout.guidance_scale == cfg.eval.guidance_scale
        return
    cfg = load_config(path)
    assert cfg.method == path.stem or path.stem == "demo"
    if path.parent.name.startswith("wan2.1"):
        heads = 12 if "1.3b" in path.parent.name else 40  # Wan 2.1 1.3B / 14B attention heads
        assert heads % cfg.parallel.sp_size == 0
        assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
        assert cfg.video.height == 480 and cfg.video.num_frames in (33, 81)
        assert (ROOT / cfg.parallel.ds_config).is_file()


def test_paired_change_uses_the_same_clips():
    import numpy as np

    from video_branch.core.stats import mean_ci, paired_change

    b = {"r": 0.0, "per_clip": {"r": [0.1, 0.5, 0.9, float("nan")]}}
    a = {"r": 0.0, "per_clip": {"r": [0.2, 0.7, 0.9, 0.4]}}
    out = paired_change(b, a)
    d = np.array([0.1, 0.2, 0.0])  # the NaN clip is left out
    assert np.isclose(out["r"], d.mean())
    assert np.isclose(out["r_ci95"], 1.96 * d.std(ddof=1) / np.sqrt(3))
    assert mean_ci(np.array([1.0]))[0] == 1.0
