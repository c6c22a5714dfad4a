"""Edge selection for backprop: hand-counted edges of the default tree and DanceGRPO, which chains survive, the
sliding depth window, and the invariant that counts never depend on values, advantages, rewards or the draw."""

import numpy as np
import pytest
import torch

from video_branch.config import Config
from video_branch.core.pruning import depth_window, expected_trained_edges, pruning_summary, select_trained_edges
from video_branch.core.tree import Tree


# ------------------------------------------------------------------------------------------------ builders
def build_tree(num_trees=1, roots=1, num_steps=20, split_steps=(0, 3, 6, 9), k=2, ode_steps=(), seed=0) -> Tree:
    """Every live node branches k ways at a split step and continues as one chain elsewhere; random logps."""
    rng = np.random.default_rng(seed)
    tree = Tree.empty(num_trees)
    cur = tree.add_nodes(np.repeat(np.arange(num_trees), roots), -1, 0, -1, False, False)
    for i in range(num_steps):
        kk = k if i in split_steps else 1
        par = np.repeat(cur, kk)
        sde = i not in ode_steps
        lp = rng.normal(size=par.size) if sde else None
        cur = tree.add_nodes(tree.tree[par], par, i + 1, i, sde, kk > 1, lp)
    tree.validate()
    return tree


def cfg_with(num_steps=20, **prune) -> Config:
    cfg = Config()
    cfg.tree.num_steps = num_steps
    for k, v in prune.items():
        setattr(cfg.prune, k, v)
    return cfg


def random_inputs(tree: Tree, rng: np.random.Generator, nan_prob=0.2):
    v = rng.normal(size=tree.num_nodes)
    a = rng.normal(size=tree.num_nodes)
    v[rng.random(tree.num_nodes) < nan_prob] = np.nan
    a[rng.random(tree.num_nodes) < nan_prob] = np.nan
    return v, a


def select(tree, cfg, iteration=0, seed=0, values=None, adv=None):
    z = np.zeros(tree.num_nodes)
    return select_trained_edges(tree, z if values is None else values, z if adv is None else adv, cfg, iteration,
                                np.random.default_rng(seed))


def dropped_by_depth(tree, trained):
    edges = tree.parent >= 0
    return {int(d): int((edges & ~trained & (tree.depth == d)).sum()) for d in np.unique(tree.depth[edges])}


# ------------------------------------------------------------------------------------------------ structure
def test_default_tree_counts():
    tree = build_tree()
    per_depth = [int((tree.depth == d).sum()) for d in range(1, 21)]
    assert per_depth == [2, 2, 2, 4, 4, 4, 8, 8, 8] + [16] * 11
    trained = select(tree, cfg_with())
    assert pruning_summary(tree, trained) == {"edges": 218, "sde_edges": 218, "trained_edges": 218}
    assert not trained[tree.parent < 0].any()


def test_ode_edges_and_last_step_are_never_trained():
    tree = build_tree(ode_steps=(1, 2, 12))
    trained = select(tree, cfg_with(exclude_last_step=True))
    assert not trained[~tree.sde].any()
    assert not trained[tree.step == 19].any()
    assert trained.sum() == 218 - (2 + 2 + 16) - 16  # ODE steps 1, 2, 12 and the last step


# ------------------------------------------------------------------------------------------------ width pruning
def test_parent_top1_trains_138_edges_whatever_the_values():
    tree = build_tree()
    cfg = cfg_with(width="parent_top1")
    rng = np.random.default_rng(1)
    for seed in range(10):
        v, a = random_inputs(tree, rng, nan_prob=0.3 * (seed % 2))
        assert select(tree, cfg, seed=seed, values=v, adv=a).sum() == 138
    assert expected_trained_edges(tree, cfg, 0) == 138


def test_parent_top1_keeps_the_higher_valued_childs_chain():
    tree = build_tree()
    rng = np.random.default_rng(5)
    v = rng.normal(size=tree.num_nodes)
    kids = np.nonzero(tree.depth == 10)[0]
    pairs = [kids[tree.parent[kids] == p] for p in np.unique(tree.parent[kids])]
    assert len(pairs) == 8 and all(len(p) == 2 for p in pairs)
    v[pairs[0][0]], v[pairs[0][1]] = np.nan, -100.0  # NaN ranks lowest
    v[pairs[1][0]], v[pairs[1][1]] = 3.0, 3.0  # tie: the lower index
    trained = select(tree, cfg_with(width="parent_top1"), values=v)
    assert trained[(tree.depth >= 1) & (tree.depth <= 10)].all()  # everything up to and including the split edges
    for a, b in pairs:
        if a == pairs[0][0]:
            winner, loser = b, a
        elif a == pairs[1][0]:
            winner, loser = a, b
        else:
            winner, loser = (a, b) if v[a] > v[b] else (b, a)
        for start, want in ((winner, True), (loser, False)):
            node, chain = start, []
            while True:  # walk the single chain below the split child
                below = np.nonzero(tree.parent == node)[0]
                if below.size == 0:
                    break
                node = int(below[0])
                chain.append(node)
            assert len(chain) == 10
            assert np.all(trained[chain] == want)


def test_parent_top1_needs_a_split():
    tree = build_tree(roots=4, split_steps=())
    with pytest.raises(ValueError, match="parent_top1"):
        select(tree, cfg_with(width="parent_top1"))


def test_extreme_b_keeps_the_best_and_worst_chains():
    tree = build_tree()
    rng = np.random.default_rng(2)
    v = rng.normal(size=tree.num_nodes)
    leaves = tree.leaves(0)
    v[leaves[3]] = np.nan  # ranks as the worst
    trained = select(tree, cfg_with(width="extreme_b", width_b=2), values=v)
    post_per_chain = 10
    assert trained.sum() == 218 - (16 - 4) * post_per_chain
    key = np.where(np.isnan(v[leaves]), -np.inf, v[leaves])
    order = leaves[np.argsort(-key)]
    kept = set(order[:2].tolist() + order[-2:].tolist())
    assert leaves[3] in kept
    assert set(leaves[trained[leaves]].tolist()) == kept
    assert trained[(tree.depth >= 1) & (tree.depth <= 10)].all()
    # b large enough to keep everything
    assert select(tree, cfg_with(width="extreme_b", width_b=8), values=v).sum() == 218


# ------------------------------------------------------------------------------------------------ depth pruning
def test_depth_window_drops_depths_11_to_15_of_the_default_tree():
    tree = build_tree()
    cfg = cfg_with(depth_window=5)
    trained = select(tree, cfg)
    assert trained.sum() == 138
    drops = dropped_by_depth(tree, trained)
    assert {d: n for d, n in drops.items() if n} == {11: 16, 12: 16, 13: 16, 14: 16, 15: 16}


@pytest.mark.parametrize("direction,stop,expect", [
    # (iteration -> window, trained edges) worked out by hand from the per-depth node counts 2,2,2,4,4,4,8,8,8,16x11
    ("later", None, {0: ((11, 15), 138), 29: ((11, 15), 138), 30: ((12, 16), 138), 60: ((13, 17), 138),
                     150: ((16, 20), 138), 3000: ((16, 20), 138)}),
    ("later", 17, {30: ((12, 16), 138), 60: ((13, 17), 138), 90: ((13, 17), 138)}),
    ("earlier", None, {0: ((11, 15), 138), 30: ((10, 14), 138), 60: ((9, 13), 218 - 8 - 64),
                       90: ((8, 12), 218 - 16 - 48), 3000: ((1, 5), 218 - 14)}),
    ("earlier", 9, {60: ((9, 13), 146), 90: ((9, 13), 146), 3000: ((9, 13), 146)}),
    ("earlier", 0, {3000: ((1, 5), 204)}),  # a stop below the tree is clamped to depth 1
    ("later", 99, {3000: ((16, 20), 138)}),  # ... and above it to the last depth
])
def test_depth_window_slides(direction, stop, expect):
    tree = build_tree()
    cfg = cfg_with(depth_window=5, depth_slide_interval=30, depth_direction=direction, depth_stop=stop)
    for it, (window, count) in expect.items():
        assert depth_window(cfg, 20, 11, it) == window
        trained = select(tree, cfg, iteration=it)
        lo, hi = window
        assert {d for d, n in dropped_by_depth(tree, trained).items() if n} == set(range(lo, hi + 1))
        assert trained.sum() == count == expected_trained_edges(tree, cfg, it)


def test_depth_window_start_and_off():
    cfg = cfg_with(depth_window=3, depth_start=4)
    assert depth_window(cfg, 20, 11, 0) == (4, 6)
    assert depth_window(cfg.prune, 20, 11, 60) == (6, 8)
    assert depth_window(cfg_with(depth_window=0), 20, 11, 0) == (0, -1)
    assert depth_window(cfg_with(depth_window=5), 20, 18, 0) == (18, 20)  # clipped to the tree, never moves
    assert depth_window(cfg_with(depth_window=5), 20, 18, 90) == (18, 20)
    # Sequential group: no split, the window starts at depth 1.
    chains = build_tree(roots=16, split_steps=())
    trained = select(chains, cfg_with(depth_window=5))
    assert {d for d, n in dropped_by_depth(chains, trained).items() if n} == {1, 2, 3, 4, 5}


# ------------------------------------------------------------------------------------------------ timestep fraction
def chain_steps(tree, trained):
    root = tree.root_of()
    return {int(r): sorted(tree.step[trained & (root == r)].tolist()) for r in np.nonzero(tree.parent < 0)[0]}


def test_dancegrpo_trains_11_of_19_steps_per_chain():
    tree = build_tree(roots=16, split_steps=())
    cfg = cfg_with(timestep_fraction=0.6, exclude_last_step=True)
    draws = []
    for seed in range(6):
        v, a = random_inputs(tree, np.random.default_rng(seed + 100))
        trained = select(tree, cfg, seed=seed, values=v, adv=a)
        per_chain = chain_steps(tree, trained)
        assert len(per_chain) == 16 and all(len(s) == 11 for s in per_chain.values())
        assert all(19 not in s for s in per_chain.values())
        assert trained.sum() == 176
        draws.append(tuple(tuple(s) for s in per_chain.values()))
    assert len(set(draws)) == 6  # the subsets really are random ...
    assert len(set(draws[0])) > 1  # ... and drawn per chain
    again = chain_steps(tree, select(tree, cfg, seed=3))
    assert tuple(tuple(s) for s in again.values()) == draws[3]  # ... and reproducible from the generator
    g = torch.Generator().manual_seed(0)
    z = np.zeros(tree.num_nodes)
    assert select_trained_edges(tree, z, z, cfg, 0, g).sum() == 176
    assert expected_trained_edges(tree, cfg, 0) == 176


def test_timestep_fraction_on_a_branching_tree_is_stratified():
    # Steps carry 2 (steps 0-2), 4 (3-5), 8 (6-8) or 16 (9-19) edges. floor(0.6 * 20) = 12 steps: quotas
    # floor(1.8)=1, 1, 1, floor(6.6)=6, plus 3 by largest remainder (0.8 > 0.6) -> 2, 2, 2, 6 -> 4 + 8 + 16 + 96.
    tree = build_tree()
    cfg = cfg_with(timestep_fraction=0.6)
    seen = set()
    for seed in range(8):
        trained = select(tree, cfg, seed=seed)
        steps = sorted(set(tree.step[trained].tolist()))
        assert len(steps) == 12 and trained.sum() == 124
        assert [sum(s in rng for s in steps) for rng in (range(3), range(3, 6), range(6, 9), range(9, 20))] == \
            [2, 2, 2, 6]
        seen.add(tuple(steps))
    assert len(seen) > 1


# ------------------------------------------------------------------------------------------------ best of n
def test_best_of_n_keeps_top_and_bottom_chains_by_advantage():
    tree = build_tree(num_trees=2, roots=6, split_steps=())
    rng = np.random.default_rng(4)
    adv = rng.normal(size=tree.num_nodes)
    leaves0 = tree.leaves(0)
    adv[leaves0[0]] = np.nan  # ranks lowest
    trained = select(tree, cfg_with(best_of_n=4, exclude_last_step=True), adv=adv)
    assert trained.sum() == 2 * 4 * 19
    root = tree.root_of()
    for t in range(2):
        lv = tree.leaves(t)
        key = np.where(np.isnan(adv[lv]), -np.inf, adv[lv])
        order = lv[np.argsort(-key)]
        kept = set(order[:2].tolist() + order[-2:].tolist())
        for leaf in lv:
            chain = root == root[leaf]
            assert trained[chain].sum() == (19 if leaf in kept else 0)
    assert trained[tree.parent[leaves0[0]]]  # the NaN chain is among the bottom two
    with pytest.raises(ValueError, match="sequential group"):
        select(build_tree(), cfg_with(best_of_n=4))
    with pytest.raises(ValueError, match="even"):
        select(tree, cfg_with(best_of_n=3))
    with pytest.raises(ValueError, match="exceeds"):
        select(tree, cfg_with(best_of_n=8))


# ------------------------------------------------------------------------------------------------ the invariant
@pytest.mark.parametrize("structure,prune,count", [
    ("default", {"width": "parent_top1"}, 138),
    ("default", {"depth_window": 5}, 138),
    ("default", {"width": "parent_top1", "depth_window": 5}, 138 - 8 * 5),
    ("default", {"width": "extreme_b", "width_b": 3, "exclude_last_step": True}, 218 - 16 - 10 * 9),
    ("default", {"width": "parent_top1", "timestep_fraction": 0.6, "exclude_last_step": True}, None),
    ("default", {"depth_window": 5, "timestep_fraction": 0.5}, None),
    ("dance", {"timestep_fraction": 0.6, "exclude_last_step": True}, 176),
    ("dance", {"best_of_n": 6, "timestep_fraction": 0.6, "exclude_last_step": True}, 6 * 11),
    ("dance", {"width": "extreme_b", "width_b": 2, "exclude_last_step": True}, 4 * 19),
])
def test_counts_do_not_depend_on_values_rewards_or_draws(structure, prune, count):
    tree = build_tree() if structure == "default" else build_tree(roots=16, split_steps=())
    cfg = cfg_with(**prune)
    expected = expected_trained_edges(tree, cfg, 0)
    if count is not None:
        assert expected == count
    rng = np.random.default_rng(9)
    for seed in range(12):
        v, a = random_inputs(tree, rng, nan_prob=[0.0, 0.3, 1.0][seed % 3])
        if seed == 5:
            v[:] = 1.0  # all ties
            a[:] = 1.0
        assert select(tree, cfg, seed=seed, values=v, adv=a).sum() == expected


def test_input_checks():
    tree = build_tree()
    with pytest.raises(ValueError, match="values"):
        select_trained_edges(tree, np.zeros(3), np.zeros(tree.num_nodes), cfg_with(), 0)
    with pytest.raises(ValueError, match="num_steps"):
        select(tree, cfg_with(num_steps=10))
