"""The update schedule: mini-batches and optimizer steps per rollout, checked against transcriptions of the released
training loops (BranchGRPO, DanceGRPO, Flow-GRPO, MixGRPO) written here, independently of the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from video_branch.config import ConfigError, load_config
from video_branch.config.specs import update_schedule
from video_branch.core.minibatch import chain_ids, minibatch_sizes, plan_minibatches
from video_branch.core.tree import TreeSpec, build_structure


# ------------------------------------------------------------------------------------- transcriptions of the loops
def released_branchgrpo_steps(num_samples: int, gradient_accumulation_steps: int) -> list[int]:
    """fastvideo/train_branchgrpo_flux.py: a step when (i + 1) % gas == 0, and one more after the loop when
    len(samples) % gas != 0. Returns the number of samples accumulated into each step."""
    sizes, pending = [], 0
    for i in range(num_samples):
        pending += 1
        if (i + 1) % gradient_accumulation_steps == 0:
            sizes.append(pending)
            pending = 0
    if num_samples % gradient_accumulation_steps != 0:
        sizes.append(pending)
    return sizes


def released_dancegrpo_steps(chains: int, gradient_accumulation_steps: int) -> int:
    """fastvideo/train_grpo_*.py: the loop over a rank's chains steps when (i + 1) % gas == 0 (a remainder is
    zeroed by the next iteration's optimizer.zero_grad())."""
    return sum(1 for i in range(chains) if (i + 1) % gradient_accumulation_steps == 0)


def released_flowgrpo_steps(samples_per_epoch: int, batch_size: int, num_batches_per_epoch: int) -> int:
    """scripts/train_sd3.py with config/grpo.py: accelerate accumulates gradient_accumulation_steps =
    num_batches_per_epoch // 2 batches (times the timesteps) per step, over the epoch's batches."""
    gas = num_batches_per_epoch // 2
    batches = samples_per_epoch // batch_size
    return batches // gas


def dance_trained_timesteps(sampling_steps: int, timestep_fraction: float) -> int:
    """DanceGRPO: timesteps[:, :-1] with --ignore_last, then int(len * timestep_fraction) of them per chain."""
    return int((sampling_steps - 1) * timestep_fraction)


def test_branchgrpo_preset_steps_every_12_edges_like_the_released_loop():
    # Released script: train_batch_size 2 (two trees per rank), 218 edges each, gradient_accumulation_steps 12.
    ref = released_branchgrpo_steps(2 * 218, 12)
    assert len(ref) == 37 and ref[-1] == 4
    cfg = load_config(method="branchgrpo", overrides=["train.prompts_per_rank=2"])
    sched = update_schedule(cfg)
    assert sched["minibatch_sizes"] == ref and sched["optimizer_steps"] == 37
    one = update_schedule(load_config(method="branchgrpo"))
    assert one["minibatch_sizes"] == released_branchgrpo_steps(218, 12)


@pytest.mark.parametrize("method", ["branchgrpo_widpru", "branchgrpo_deppru"])
def test_pruned_presets_step_every_12_trained_edges(method):
    sched = update_schedule(load_config(method=method))
    assert sched["minibatch_sizes"] == released_branchgrpo_steps(138, 12)


def test_dancegrpo_preset_takes_the_flux_scripts_two_steps_of_whole_chains():
    # DanceGRPO's FLUX 8-GPU script: train_batch_size 2 x num_generations 12 chains per rank, gas 12.
    assert released_dancegrpo_steps(2 * 12, 12) == 2
    assert released_dancegrpo_steps(1 * 12, 4) == 3  # the 2-node FLUX script
    assert released_dancegrpo_steps(2 * 12, 24) == 1  # the Wan script
    cfg = load_config(method="dancegrpo")
    sched = update_schedule(cfg)
    per_chain = dance_trained_timesteps(20, 0.6)
    assert per_chain == 11
    assert sched["optimizer_steps"] == released_dancegrpo_steps(16, 8) == 2
    assert sched["minibatch_sizes"] == [8 * per_chain, 8 * per_chain]


def test_flowgrpo_preset_takes_two_steps_per_epoch():
    # config/grpo.py, pickscore_sd3: 32 GPUs, train_batch_size 9, 24 images per prompt, 48 prompts per epoch.
    num_batches = int(48 / (32 * 9 / 24))
    assert released_flowgrpo_steps(9 * num_batches, 9, num_batches) == 2
    sched = update_schedule(load_config(method="flowgrpo"))
    trained_timesteps = int(10 * 0.99)  # num_train_timesteps = int(num_steps * timestep_fraction)
    assert sched["optimizer_steps"] == 2 and sched["minibatch_sizes"] == [12 * trained_timesteps] * 2


def test_mixgrpo_preset_takes_the_scripts_four_steps():
    # finetune_flux_grpo_MixGRPO.sh: train_batch_size 1 x num_generations 12, gradient_accumulation_steps 3.
    assert released_dancegrpo_steps(12, 3) == 4
    sched = update_schedule(load_config(method="mixgrpo"))
    assert sched["optimizer_steps"] == 4 and len(set(sched["minibatch_sizes"])) == 1


def test_one_step_per_rollout_stays_available():
    for method in ("branchgrpo", "dancegrpo", "flowgrpo", "vgrpo"):
        cfg = load_config(method=method, overrides=["optim.minibatch=0"])
        sched = update_schedule(cfg)
        assert sched["optimizer_steps"] == 1 and sched["minibatch_sizes"] == [sched["units"]]
    passes = update_schedule(load_config(method="branchgrpo", overrides=["optim.updates_per_iteration=3"]))
    assert passes["optimizer_steps"] == 3 * 19


def test_chain_minibatches_are_rejected_where_edges_sit_above_the_last_split():
    with pytest.raises(ConfigError, match="optim.minibatch_by"):
        load_config(method="branchgrpo", overrides=["optim.minibatch_by=chain"])


def test_bad_minibatch_values_name_the_key():
    with pytest.raises(ConfigError, match="optim.minibatch"):
        load_config(method="branchgrpo", overrides=["optim.minibatch=-1"])
    with pytest.raises(ConfigError, match="optim.minibatch_by"):
        load_config(method="branchgrpo", overrides=["optim.minibatch_by=leaf"])


# ------------------------------------------------------------------------------------------------ the core
def test_minibatch_sizes_cut_full_batches_then_the_remainder():
    assert minibatch_sizes(436, 12) == [12] * 36 + [4]
    assert minibatch_sizes(24, 12) == [12, 12]
    assert minibatch_sizes(5, 0) == [5] and minibatch_sizes(5, 9) == [5] and minibatch_sizes(0, 4) == []


def test_edge_plan_is_a_seeded_shuffled_partition():
    units = np.arange(100, 150)
    plan = plan_minibatches(units, 12, np.random.default_rng(3))
    assert [len(b) for b in plan] == [12, 12, 12, 12, 2]
    assert sorted(np.concatenate(plan).tolist()) == units.tolist()
    again = plan_minibatches(units, 12, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    assert not np.array_equal(np.concatenate(plan), units)  # shuffled


def test_chain_plan_keeps_every_chain_in_one_minibatch():
    spec = TreeSpec(num_steps=5, roots=6)
    tree = build_structure(spec, 2)  # 12 chains of 5 edges
    edges = np.nonzero(tree.parent >= 0)[0]
    ch = chain_ids(tree)[edges]
    # Independent: a node's chain is its root in a sequential group.
    root = np.arange(tree.num_nodes)
    for n in range(tree.num_nodes):
        if tree.parent[n] >= 0:
            root[n] = root[tree.parent[n]]
    assert np.array_equal(ch, root[edges])
    plan = plan_minibatches(edges, 5, np.random.default_rng(0), ch)
    assert [len(b) for b in plan] == [25, 25, 10]
    for b in plan:
        for c in np.unique(root[b]):
            assert set(np.nonzero(root == c)[0]) & set(edges) <= set(b.tolist())


def test_chain_ids_below_the_last_split():
    tree = build_structure(TreeSpec(num_steps=4, split_steps=(0, 1), branching=2), 1)
    ids = chain_ids(tree)
    assert (ids[tree.depth < 2] == -1).all()
    for n in np.nonzero(tree.depth >= 2)[0]:
        a = n
        while tree.depth[a] > 2:
            a = tree.parent[a]
        assert ids[n] == a
