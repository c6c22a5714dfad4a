import json
from pathlib import Path

import numpy as np
import pytest

from video_branch.config import ConfigError, load_config
from video_branch.config.presets import preset_names
from video_branch.config.specs import config_accounting, step_kinds, tree_spec
from video_branch.core.errors import CoreError
from video_branch.core.tree import TreeSpec, accounting, build_structure, draw_split_step, window_steps

REPO = Path(__file__).resolve().parents[1]


def _spec(method, iteration=0, overrides=()):
    return tree_spec(load_config(None, list(overrides), method=method), iteration)


def _cli(*args):
    """``python -m video_branch.accounting ARGS``, run in this process: its ``main`` with stdout and stderr captured,
    an argparse error's SystemExit as the exit status."""
    import contextlib
    import io
    import types

    from video_branch.accounting import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# ------------------------------------------------------------------------------------------------ accounting
def test_default_branch_tree_accounting_matches_the_paper():
    acc = accounting(_spec("branchgrpo"), guidance=False)
    assert acc == {"leaves": 16, "forward_passes": 203, "edges": 218, "sde_edges": 218}
    assert accounting(_spec("branchgrpo"), guidance=True)["forward_passes"] == 406


def test_dance_group_is_sixteen_chains_of_twenty_steps():
    spec = _spec("dancegrpo")
    assert spec.roots == 16 and spec.split_steps == ()
    assert accounting(spec) == {"leaves": 16, "forward_passes": 320, "edges": 320, "sde_edges": 320}


def test_structure_of_default_tree_by_hand():
    spec = _spec("branchgrpo")
    t = build_structure(spec, num_trees=1)
    t.validate()
    per_depth = np.bincount(t.depth)
    assert per_depth.tolist() == [1, 2, 2, 2, 4, 4, 4, 8, 8, 8] + [16] * 11
    # A split parent has exactly K children; every other internal node has one.
    n_kids = np.array([len(c) for c in t.children])
    internal = ~t.is_leaf
    split_parent_steps = np.array([0, 3, 6, 9])
    expected = np.where(np.isin(t.depth, split_parent_steps), 2, 1)
    assert np.array_equal(n_kids[internal], expected[internal])
    assert np.array_equal(t.split, np.isin(t.step, split_parent_steps))
    assert t.sde[1:].all() and not t.sde[0]
    assert np.isnan(t.logp).all()
    assert len(t.leaves()) == 16 and (t.depth[t.leaves()] == 20).all()


@pytest.mark.parametrize("method", preset_names())
def test_structure_agrees_with_accounting_for_every_preset(method):
    spec = _spec(method)
    t = build_structure(spec, num_trees=3)
    t.validate()
    acc = accounting(spec)
    # Independent counts on the node arrays: a step evaluates once per node at its depth.
    assert len(t.leaves()) == 3 * acc["leaves"]
    assert int((t.parent >= 0).sum()) == 3 * acc["edges"]
    assert int(t.sde.sum()) == 3 * acc["sde_edges"]
    pruned = t.pruned if t.pruned is not None else np.zeros(t.num_nodes, bool)
    assert int(((t.depth < spec.num_steps) & ~pruned).sum()) == 3 * acc["forward_passes"]
    assert acc["leaves"] == (spec.roots * spec.branching ** len(spec.split_steps) if not spec.survivors
                             else int(spec.live_per_depth()[-1]))
    # Trees are contiguous per depth and parents precede children.
    for d in range(spec.num_steps + 1):
        assert np.all(np.diff(t.tree[t.at_depth(d)]) >= 0)


def test_split_eta_defaults_to_eta():
    assert _spec("branchgrpo").split_eta == 0.3
    spec = _spec("branchgrpo", overrides=["tree.split_eta=1.2"])
    assert spec.step_eta(0) == 1.2 and spec.step_eta(1) == 0.3
    assert np.isnan(_spec("branchgrpo_mix").step_eta(5))


def test_spec_rejects_malformed_descriptions():
    with pytest.raises(ValueError, match="split steps"):
        TreeSpec(num_steps=4, split_steps=(1,), branching=2, kinds=("sde", "ode", "sde", "sde"))
    with pytest.raises(ValueError, match="kinds"):
        TreeSpec(num_steps=4, kinds=("sde",) * 3)
    with pytest.raises(ValueError, match="split_steps"):
        TreeSpec(num_steps=4, split_steps=(2, 1))
    with pytest.raises(ValueError, match="eta"):
        TreeSpec(num_steps=4, eta=-0.1)
    with pytest.raises(ValueError, match="num_trees"):
        build_structure(TreeSpec(num_steps=2), 0)


# ------------------------------------------------------------------------------------------------ step kinds
def _sde_steps(method, iteration, overrides=()):
    return set(_spec(method, iteration, overrides).sde_steps)


@pytest.mark.parametrize("iteration,window", [
    (0, {0, 1, 2, 3}), (24, {0, 1, 2, 3}), (25, {1, 2, 3, 4}), (60, {2, 3, 4, 5}),
    (400, {16, 17, 18, 19}),  # last position: 400 // 25 = 16 moves
    (425, {0, 1, 2, 3}),      # 17 moves: 17 positions fit in 20 steps, so it wraps to the start
    (450, {1, 2, 3, 4}),
])
def test_mixgrpo_window_slides_one_step_every_25_iterations_and_wraps(iteration, window):
    # The window that keeps its size (end_offset unset); the preset's released schedule: test_released_mixgrpo.py.
    spec = _spec("mixgrpo", iteration, ["tree.window.end_offset=null"])
    assert set(spec.sde_steps) == window
    assert all(k == "ode" for i, k in enumerate(spec.kinds) if i not in window)


def test_window_without_wrap_stays_at_the_last_position():
    keep = ["tree.window.end_offset=null"]
    assert _sde_steps("mixgrpo", 10_000, keep + ["tree.window.wrap=false"]) == {16, 17, 18, 19}
    # Stride 2 from start 3 every 10 iterations: a 4-step window fits at starts 3..16 (14 positions).
    o = keep + ["tree.window.start=3", "tree.window.stride=2", "tree.window.slide_interval=10"]
    assert _sde_steps("mixgrpo", 19, o) == {5, 6, 7, 8}      # offset 2
    assert _sde_steps("mixgrpo", 60, o) == {15, 16, 17, 18}  # offset 12
    assert _sde_steps("mixgrpo", 70, o) == {3, 4, 5, 6}      # offset 14 wraps to 0
    assert _sde_steps("mixgrpo", 80, o) == {5, 6, 7, 8}      # offset 16 wraps to 2
    assert _sde_steps("mixgrpo", 80, o + ["tree.window.wrap=false"]) == {16, 17, 18, 19}


def test_window_that_does_not_fit_names_the_key():
    cfg = load_config(None, ["tree.window.end_offset=null"], method="mixgrpo")
    cfg.tree.window.start = 18
    # The core names its own argument; the config layer names the key, and rejects it when the config loads.
    with pytest.raises(CoreError, match="window.start: a window of 4 steps from step 18"):
        window_steps(cfg.tree.window, cfg.tree.num_steps, 0)
    with pytest.raises(ConfigError, match="config key 'tree.window.start': a window of 4 steps from step 18"):
        tree_spec(cfg, 0)
    with pytest.raises(ConfigError, match="tree.window.start"):
        load_config(None, ["tree.window.start=18", "tree.window.end_offset=null"], method="mixgrpo")
    # With MixGRPO's cut before step 18 the window may start up to step 18 (where it is empty), not after.
    with pytest.raises(ConfigError, match="tree.window.start.*end_offset=2"):
        load_config(None, ["tree.window.start=19"], method="mixgrpo")


def test_branchgrpo_mix_kinds_are_splits_plus_window():
    assert _sde_steps("branchgrpo_mix", 0) == {0, 1, 2, 3, 6, 9}
    assert _sde_steps("branchgrpo_mix", 50) == {0, 2, 3, 4, 5, 6, 9}
    assert _sde_steps("branchgrpo_mix", 200) == {0, 3, 6, 8, 9, 10, 11}
    spec = _spec("branchgrpo_mix", 200)
    assert spec.kinds[1] == "ode" and spec.kinds[19] == "ode" and spec.split_steps == (0, 3, 6, 9)
    # SDE edges at iteration 0, by hand: steps 0, 1, 2 produce 2 nodes each, step 3 4, step 6 8, step 9 16.
    assert accounting(_spec("branchgrpo_mix", 0))["sde_edges"] == 2 + 2 + 2 + 4 + 8 + 16


def test_flowgrpo_fast_draws_the_same_split_for_the_same_seed_and_iteration():
    cfg = load_config(None, ["train.seed=7"], method="flowgrpo_fast")
    low, high = cfg.tree.random_split.low, cfg.tree.random_split.high
    draws = []
    for it in range(60):
        a = tree_spec(cfg, it)
        b = tree_spec(load_config(None, ["train.seed=7"], method="flowgrpo_fast"), it)
        assert a == b
        (split,) = a.split_steps
        assert low <= split <= high
        assert set(a.sde_steps) == {split, split + 1}  # the 2-step SDE window starts at the split
        assert a.branching == 24 and a.roots == 1
        draws.append(split)
    assert set(draws) == set(range(low, high + 1))  # all steps of [low, high] occur in 60 draws
    other_seed = [draw_split_step(low, high, 8, it) for it in range(60)]
    assert other_seed != draws


def test_random_split_window_is_truncated_at_the_last_step():
    cfg = load_config(None, ["tree.random_split.low=9", "tree.random_split.high=9"], method="flowgrpo_fast")
    kinds, splits = step_kinds(cfg.tree, 3, cfg.train.seed)
    assert splits == (9,) and [i for i, k in enumerate(kinds) if k == "sde"] == [9]


def test_step_kinds_reject_a_negative_iteration():
    with pytest.raises(ValueError, match="iteration"):
        _spec("mixgrpo", -1)


# ------------------------------------------------------------------------------------------------ trained edges and CLI
def test_trained_edges_of_pruned_presets():
    assert config_accounting(load_config(None, [], method="branchgrpo"))["trained_edges"] == 218
    assert config_accounting(load_config(None, [], method="branchgrpo_widpru"))["trained_edges"] == 138
    assert config_accounting(load_config(None, [], method="branchgrpo_deppru"))["trained_edges"] == 138
    dance = config_accounting(load_config(None, [], method="dancegrpo"))
    assert dance["trained_edges"] == 16 * 11  # 0.6 of the 19 trainable steps of each chain


def test_cli_json_prints_the_acceptance_numbers():
    out = _cli("--method", "branchgrpo_widpru", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["leaves"], r["forward_passes"], r["edges"], r["sde_edges"],
            r["trained_edges"]) == (16, 203, 218, 218, 138)
    r = json.loads(_cli("--method", "dancegrpo", "--json").stdout)
    assert (r["forward_passes"], r["edges"], r["trained_edges"]) == (320, 320, 176)


def test_cli_config_counts_cfg_and_iteration(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: branchgrpo_deppru\nrollout:\n  guidance_scale: 4.0\n")
    out = _cli("--config", str(path), "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["forward_passes"] == 406 and r["edges"] == 218 and r["trained_edges"] == 138
    r = json.loads(_cli("--method", "mixgrpo", "--iteration", "60", "--json").stdout)
    assert r["sde_steps"] == [2, 3, 4, 5] and r["sde_edges"] == 64


def test_cli_lists_every_preset():
    out = _cli("--method", "all", "--json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert sorted(records) == preset_names()
    for name, r in records.items():
        acc = accounting(_spec(name))
        assert {k: r[k] for k in acc} == acc
        # Edge-level methods train some SDE edges; sample-level ones (V-GRPO, NFT) train whole samples instead.
        assert 0 < r["trained_edges"] <= r["sde_edges"] or (r["trained_edges"] == 0 and 0 < r["trained_samples"])
    table = _cli("--method", "all")
    assert table.returncode == 0
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 1 + len(preset_names()) and lines[0].split()[:2] == ["method", "leaves"]
    mix = next(line.split() for line in lines if line.startswith("branchgrpo_mix "))
    assert mix[1:3] == ["16", "203"] and mix[-1] == "0-3,6,9"


def test_cli_reports_bad_keys():
    out = _cli("--method", "branchgrpo", "--set", "tree.brnching=3")
    assert out.returncode == 2 and "tree.branching" in out.stderr
    assert _cli().returncode != 0
