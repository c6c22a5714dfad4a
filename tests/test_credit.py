"""Credit assignment: fused values and depth-wise advantages against naive references and hand computations."""

import math
import statistics

import numpy as np
import pytest
import torch

from video_branch.config import CreditConfig
from video_branch.core.credit import assign_credit, depthwise_advantages, fuse_values, leaf_vector
from video_branch.core.tree import Tree


# ------------------------------------------------------------------------------------------------ tree builders
def random_forest(rng: np.random.Generator) -> Tree:
    """Several trees with random roots, random branching (some chains stop early), random SDE/ODE steps and logps."""
    num_trees = int(rng.integers(1, 4))
    tree = Tree.empty(num_trees)
    frontier = []
    for t in range(num_trees):
        roots = int(rng.integers(1, 4))
        frontier += list(zip([t] * roots, tree.add_nodes([t] * roots, -1, 0, -1, False, False)))
    steps = int(rng.integers(2, 7))
    for i in range(steps):
        sde_here = rng.random(num_trees) < 0.7
        nxt = []
        for t, node in frontier:
            if i > 0 and rng.random() < 0.1:
                continue  # this chain ends here: an internal-depth leaf
            k = int(rng.choice([1, 1, 1, 2, 3]))
            for _ in range(k):
                lp = float(rng.normal(0.0, 1.5)) if sde_here[t] else None
                (c,) = tree.add_nodes([t], node, i + 1, i, bool(sde_here[t]), k > 1, lp)
                nxt.append((t, int(c)))
        frontier = nxt
    tree.validate()
    return tree


def random_leaf_rewards(tree: Tree, rng: np.random.Generator, nan_prob: float = 0.2) -> np.ndarray:
    r = np.full(tree.num_nodes, np.nan)
    for l in tree.leaves():
        if rng.random() >= nan_prob:
            r[l] = float(rng.normal(0.0, 2.0))
    return r


def chains(rewards_per_tree, steps: int, logp_rng=None) -> Tree:
    """A sequential group per tree: one chain (own root) per reward, ``steps`` SDE steps."""
    tree = Tree.empty(len(rewards_per_tree))
    cur = []
    for t, rs in enumerate(rewards_per_tree):
        cur += [(t, int(n)) for n in tree.add_nodes([t] * len(rs), -1, 0, -1, False, False)]
    for i in range(steps):
        nxt = []
        for t, n in cur:
            lp = None if logp_rng is None else float(logp_rng.normal())
            (c,) = tree.add_nodes([t], n, i + 1, i, True, False, lp)
            nxt.append((t, int(c)))
        cur = nxt
    return tree


def root_split(rewards_per_tree, steps: int, logp_rng) -> Tree:
    """Per tree one root splitting G ways at step 0, then single SDE chains."""
    tree = Tree.empty(len(rewards_per_tree))
    roots = tree.add_nodes(range(len(rewards_per_tree)), -1, 0, -1, False, False)
    cur = []
    for t, rs in enumerate(rewards_per_tree):
        for _ in rs:
            (c,) = tree.add_nodes([t], roots[t], 1, 0, True, True, float(logp_rng.normal()))
            cur.append((t, int(c)))
    for i in range(1, steps):
        nxt = []
        for t, n in cur:
            (c,) = tree.add_nodes([t], n, i + 1, i, True, False, float(logp_rng.normal()))
            nxt.append((t, int(c)))
        cur = nxt
    return tree


def chain_rewards(tree: Tree, rewards_per_tree) -> np.ndarray:
    leaves_in_order = [l for t in range(tree.num_trees) for l in tree.leaves(t)]
    return leaf_vector(tree, leaves_in_order, np.concatenate([np.asarray(r, float) for r in rewards_per_tree]))


# ------------------------------------------------------------------------------------------------ naive references
def brute_values(tree: Tree, r: np.ndarray, beta: float) -> np.ndarray:
    """Explicit path enumeration: for every node, walk up from every valid leaf and collect the path log-prob."""
    parent = [int(p) for p in tree.parent]
    n = len(parent)
    has_child = {p for p in parent if p >= 0}
    leaves = [l for l in range(n) if l not in has_child and not math.isnan(r[l])]
    out = np.full(n, np.nan)
    for node in range(n):
        below = []
        for l in leaves:
            lp, cur = 0.0, l
            while cur != node and cur != -1:
                e = float(tree.logp[cur])
                lp += 0.0 if math.isnan(e) else e
                cur = parent[cur]
            if cur == node:
                below.append((lp, float(r[l])))
        if below:
            top = max(beta * lp for lp, _ in below)
            w = [math.exp(beta * lp - top) for lp, _ in below]
            out[node] = sum(wi * ri for wi, (_, ri) in zip(w, below)) / sum(w)
    return out


def released_nested_values(tree: Tree, r: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """BranchGRPO's compute_node_rewards_from_leaves(use_prob_weighted=True), transcribed on explicit child lists:
    from the deepest depth up, a node with one child takes its child's reward; with several, the softmax of
    alpha * (child edge log-prob, 0 when missing) weights its children's rewards. Leaves whose reward failed (NaN)
    are left out of their parent's softmax (the released code has no failed rewards)."""
    n = tree.num_nodes
    kids = {i: [] for i in range(n)}
    for c in range(n):
        if tree.parent[c] >= 0:
            kids[int(tree.parent[c])].append(c)
    val = {i: float(r[i]) for i in range(n) if not kids[i]}
    for depth in sorted(set(tree.depth.tolist()), reverse=True):
        for node in range(n):
            if tree.depth[node] != depth or not kids[node]:
                continue
            ch = kids[node]
            if len(ch) == 1:
                val[node] = val[ch[0]]
                continue
            ok = [c for c in ch if not math.isnan(val[c])]
            if not ok:
                val[node] = math.nan
                continue
            lps = [0.0 if math.isnan(float(tree.logp[c])) else float(tree.logp[c]) for c in ok]
            top = max(alpha * x for x in lps)
            w = [math.exp(alpha * x - top) for x in lps]
            val[node] = sum(wi * val[c] for wi, c in zip(w, ok)) / sum(w)
    return np.array([val[i] for i in range(n)])


def brute_advantages(tree: Tree, values: np.ndarray, clip: float) -> np.ndarray:
    """Explicit per-(tree, depth) lists, statistics.stdev (unbiased)."""
    groups = {}
    for node in range(tree.num_nodes):
        if not math.isnan(values[node]):
            groups.setdefault((int(tree.tree[node]), int(tree.depth[node])), []).append(node)
    adv = np.zeros(tree.num_nodes)
    for nodes in groups.values():
        vals = [float(values[x]) for x in nodes]
        if len(vals) < 2:
            continue
        mu, sd = statistics.fmean(vals), statistics.stdev(vals)
        if sd < 1e-6:
            continue
        for x, v in zip(nodes, vals):
            adv[x] = min(max((v - mu) / (sd + 1e-8), -clip), clip)
    return adv


def group_z(r):
    r = np.asarray(r, float)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-8)


# ------------------------------------------------------------------------------------------------ fusion and advantages
@pytest.mark.parametrize("mode,beta", [("mean", 1.0), ("path_leaves", 1.0), ("path_leaves", 0.5), ("path_leaves", 3.0),
                                       ("path_leaves", 0.0)])
def test_fused_values_and_advantages_match_brute_force(mode, beta):
    rng = np.random.default_rng(7)
    checked_nan = False
    for _ in range(25):
        tree = random_forest(rng)
        r = random_leaf_rewards(tree, rng)
        ref_v = brute_values(tree, r, 0.0 if mode == "mean" else beta)
        v = fuse_values(tree, r, mode=mode, beta=beta)
        np.testing.assert_array_equal(np.isnan(v), np.isnan(ref_v))
        np.testing.assert_allclose(v, ref_v, rtol=1e-10, atol=1e-12, equal_nan=True)
        checked_nan |= bool(np.isnan(ref_v).any())
        for clip in (5.0, 0.7):
            np.testing.assert_allclose(depthwise_advantages(tree, v, clip=clip), brute_advantages(tree, ref_v, clip),
                                       rtol=1e-9, atol=1e-12)
    assert checked_nan, "the random trees never produced a node without a valid leaf"


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_path_fusion_is_the_released_nested_softmax(beta):
    rng = np.random.default_rng(5)
    for _ in range(25):
        tree = random_forest(rng)
        r = random_leaf_rewards(tree, rng)
        ref = released_nested_values(tree, r, beta)
        v = fuse_values(tree, r, "path", beta=beta)
        np.testing.assert_allclose(v, ref, rtol=1e-10, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(depthwise_advantages(tree, v), brute_advantages(tree, ref, 5.0), rtol=1e-9,
                                   atol=1e-12)


def test_path_fusion_uses_split_edges_only():
    # root -> split into a, b; each continues by one non-split edge to a leaf. The nested form ignores the
    # non-split log-probs (their single-child nodes pass values up); path_leaves sums them into the path.
    tree = Tree.empty(1)
    root = tree.add_nodes([0], -1, 0, -1, False, False)[0]
    a, b = tree.add_nodes([0, 0], root, 1, 0, True, True, [0.0, math.log(3.0)])
    la, lb = tree.add_nodes([0, 0], [a, b], 2, 1, True, False, [math.log(5.0), 0.0])
    r = leaf_vector(tree, [la, lb], [1.0, 5.0])
    assert fuse_values(tree, r, "path")[root] == pytest.approx((1 + 3 * 5) / 4)
    assert fuse_values(tree, r, "path_leaves")[root] == pytest.approx((5 * 1 + 3 * 5) / 8)
    assert fuse_values(tree, r, "path")[a] == 1.0


def test_path_fusion_weights_by_path_logprob_by_hand():
    # One root, two SDE children with log-probs 0 and log 3, each a leaf: w = softmax(beta * [0, log 3]).
    tree = Tree.empty(1)
    root = tree.add_nodes([0], -1, 0, -1, False, False)[0]
    a, b = tree.add_nodes([0, 0], root, 1, 0, True, True, [0.0, math.log(3.0)])
    r = leaf_vector(tree, [a, b], [1.0, 5.0])
    assert fuse_values(tree, r, "path", beta=1.0)[root] == pytest.approx((1 + 3 * 5) / 4)
    assert fuse_values(tree, r, "path", beta=2.0)[root] == pytest.approx((1 + 9 * 5) / 10)
    assert fuse_values(tree, r, "mean")[root] == pytest.approx(3.0)


def test_large_logps_stay_finite():
    tree = Tree.empty(1)
    root = tree.add_nodes([0], -1, 0, -1, False, False)[0]
    a, b = tree.add_nodes([0, 0], root, 1, 0, True, True, [900.0, 1000.0])
    r = leaf_vector(tree, [a, b], [1.0, 2.0])
    v = fuse_values(tree, r, "path", beta=1.0)
    assert v[root] == pytest.approx(2.0 - math.exp(-100) / (1 + math.exp(-100)))


def test_leaf_values_equal_rewards_and_empty_subtrees_are_nan():
    tree = root_split([[0, 0, 0]], steps=3, logp_rng=np.random.default_rng(0))
    leaves = tree.leaves(0)
    r = leaf_vector(tree, leaves, [2.0, np.nan, -1.0])
    v = fuse_values(tree, r, "path")
    assert v[leaves[0]] == 2.0 and v[leaves[2]] == -1.0
    dead = [n for n in range(tree.num_nodes) if tree.root_of()[n] == 0 and tree.depth[n] > 0 and np.isnan(v[n])]
    assert len(dead) == 3  # the chain of the failed leaf: depths 1..3
    adv = depthwise_advantages(tree, v)
    assert np.all(adv[dead] == 0.0)
    # The two valid chains form a 2-member group at each depth: +-1/sqrt(2) * (1 - tiny).
    np.testing.assert_allclose(np.sort(adv[leaves[[0, 2]]]), [-1 / math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ sequential groups
@pytest.mark.parametrize("mode", ["mean", "path"])
def test_sequential_group_reduces_to_group_zscore(mode):
    rng = np.random.default_rng(3)
    rewards = [rng.normal(0, 1, 8), rng.normal(10, 5, 6)]  # two prompts on different scales
    for tree in (chains(rewards, 5, rng), root_split(rewards, 5, rng)):
        r = chain_rewards(tree, rewards)
        adv = depthwise_advantages(tree, fuse_values(tree, r, mode, beta=1.0), clip=1e9)
        for t, rs in enumerate(rewards):
            z = group_z(rs)
            for i, leaf in enumerate(tree.leaves(t)):
                node = int(leaf)
                while tree.depth[node] >= 1:  # every edge of chain i carries z_i
                    assert adv[node] == pytest.approx(z[i], rel=1e-9, abs=1e-12)
                    node = int(tree.parent[node])
        if (tree.parent < 0).sum() == tree.num_trees:  # root split: the single root per prompt has A = 0
            assert np.all(adv[tree.parent < 0] == 0.0)


def test_single_node_depth_and_constant_rewards_give_zero():
    rng = np.random.default_rng(0)
    tree = chains([[1.5]], 4, rng)  # one chain: every depth holds one node
    v = fuse_values(tree, chain_rewards(tree, [[1.5]]), "path")
    assert np.all(depthwise_advantages(tree, v) == 0.0)
    tree = root_split([[2.0] * 5], 4, rng)
    v = fuse_values(tree, chain_rewards(tree, [[2.0] * 5]), "path")
    assert np.all(v == 2.0)
    assert np.all(depthwise_advantages(tree, v) == 0.0)
    # One valid node left at a depth (the others failed): no signal there.
    tree = root_split([[0.0, 0.0, 0.0]], 2, rng)
    v = fuse_values(tree, chain_rewards(tree, [[4.0, np.nan, np.nan]]), "mean")
    assert np.all(depthwise_advantages(tree, v) == 0.0)
    # A spread below the 1e-6 floor counts as constant.
    v = fuse_values(tree, chain_rewards(tree, [[1.0, 1.0 + 1e-7, 1.0 - 1e-7]]), "mean")
    assert np.all(depthwise_advantages(tree, v) == 0.0)


def test_clipping():
    rewards = [[0.0] * 29 + [1.0]]
    tree = chains(rewards, 2)
    v = fuse_values(tree, chain_rewards(tree, rewards), "mean")
    z = group_z(rewards[0])
    assert z[-1] > 5.0  # precondition: the outlier's z-score exceeds the default clip
    leaves = tree.leaves(0)
    for clip in (5.0, 2.0, 0.1):
        np.testing.assert_allclose(depthwise_advantages(tree, v, clip=clip)[leaves], np.clip(z, -clip, clip), rtol=1e-9)
    with pytest.raises(ValueError, match="clip"):
        depthwise_advantages(tree, v, clip=-1.0)


# ------------------------------------------------------------------------------------------------ multiple rewards
def test_sum_then_norm_and_norm_then_sum_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 5.0]
    tree = chains([a], 3)
    ra, rb = chain_rewards(tree, [a]), chain_rewards(tree, [b])
    leaves = tree.leaves(0)
    cfg = CreditConfig(fusion="mean", adv_clip=5.0, aggregate="sum_then_norm")
    values, adv = assign_credit(tree, {"vq": ra, "mq": rb}, {"vq": 1.0, "mq": 0.5}, cfg)
    total = [1.0, 2.0, 3.5, 6.5]
    np.testing.assert_allclose(values[leaves], total)
    np.testing.assert_allclose(adv[leaves], group_z(total), rtol=1e-9)
    cfg.aggregate = "norm_then_sum"
    values2, adv2 = assign_credit(tree, {"vq": ra, "mq": rb}, {"vq": 1.0, "mq": 0.5}, cfg)
    np.testing.assert_allclose(values2, values)  # values are always those of the weighted sum
    hand = group_z(a) + 0.5 * group_z(b)
    np.testing.assert_allclose(adv2[leaves], hand, rtol=1e-9)
    assert not np.allclose(adv2[leaves], adv[leaves])  # the two modes genuinely differ here
    # Clipping applies to the sum in norm_then_sum, not per component.
    cfg.adv_clip = 1.0
    _, adv3 = assign_credit(tree, {"vq": ra, "mq": rb}, {"vq": 1.0, "mq": 0.5}, cfg)
    np.testing.assert_allclose(adv3[leaves], np.clip(hand, -1, 1), rtol=1e-9)


@pytest.mark.parametrize("aggregate", ["sum_then_norm", "norm_then_sum"])
def test_multi_reward_on_random_trees_matches_brute_force(aggregate):
    rng = np.random.default_rng(11)
    cfg = CreditConfig(fusion="path_leaves", beta=0.8, adv_clip=2.5, aggregate=aggregate)
    for _ in range(10):
        tree = random_forest(rng)
        ra, rb = random_leaf_rewards(tree, rng), random_leaf_rewards(tree, rng)
        rb = np.where(np.isnan(rb), np.nan, rb * 3.0)
        values, adv = assign_credit(tree, {"a": ra, "b": rb}, {"a": 0.7, "b": 1.3}, cfg)
        total = 0.7 * ra + 1.3 * rb  # NaN in either component invalidates the leaf
        ref_values = brute_values(tree, total, 0.8)
        np.testing.assert_allclose(values, ref_values, rtol=1e-10, atol=1e-12, equal_nan=True)
        if aggregate == "sum_then_norm":
            ref = brute_advantages(tree, ref_values, 2.5)
        else:
            ref = np.clip(0.7 * brute_advantages(tree, brute_values(tree, ra, 0.8), np.inf)
                          + 1.3 * brute_advantages(tree, brute_values(tree, rb, 0.8), np.inf), -2.5, 2.5)
        np.testing.assert_allclose(adv, ref, rtol=1e-9, atol=1e-12)


def test_zero_weight_reward_does_not_invalidate_leaves():
    a = [1.0, 2.0, 3.0]
    tree = chains([a], 2)
    ra = chain_rewards(tree, [a])
    logged = chain_rewards(tree, [[np.nan, 0.5, np.nan]])
    for aggregate in ("sum_then_norm", "norm_then_sum"):
        cfg = CreditConfig(fusion="mean", aggregate=aggregate)
        _values, adv = assign_credit(tree, {"a": ra, "log": logged}, {"a": 1.0, "log": 0.0}, cfg)
        np.testing.assert_allclose(adv[tree.leaves(0)], group_z(a), rtol=1e-9)


def test_assign_credit_rejects_mismatched_names_and_bad_aggregate():
    tree = chains([[1.0, 2.0]], 1)
    r = chain_rewards(tree, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="missing weights"):
        assign_credit(tree, {"a": r, "b": r}, {"a": 1.0}, CreditConfig())
    with pytest.raises(ValueError, match="aggregate"):
        assign_credit(tree, {"a": r}, {"a": 1.0}, {"aggregate": "median"})


# ------------------------------------------------------------------------------------------------ inputs
def test_leaf_vector_and_input_checks():
    tree = root_split([[0, 0]], 2, np.random.default_rng(0))
    leaves = tree.leaves(0)
    v = leaf_vector(tree, leaves[::-1], torch.tensor([7.0, 8.0]))
    assert v[leaves[1]] == 7.0 and v[leaves[0]] == 8.0 and np.isnan(v).sum() == tree.num_nodes - 2
    with pytest.raises(ValueError, match="not leaves"):
        leaf_vector(tree, [0], [1.0])
    with pytest.raises(ValueError, match="more than once"):
        leaf_vector(tree, [leaves[0], leaves[0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="internal nodes"):
        fuse_values(tree, np.ones(tree.num_nodes))
    with pytest.raises(ValueError, match=rf"shape \[{tree.num_nodes}\]"):
        fuse_values(tree, np.ones(3))
    with pytest.raises(ValueError, match="mode"):
        fuse_values(tree, v, mode="max")
    # torch in, same numbers out
    np.testing.assert_allclose(fuse_values(tree, torch.tensor(v), "path"), fuse_values(tree, v, "path"), equal_nan=True)


def test_fusion_handles_64_default_sized_trees():
    # 64 default-sized trees (about 14k nodes) go through path fusion and normalisation (its speed: bench_iteration).
    rng = np.random.default_rng(0)
    tree = Tree.empty(64)
    cur = list(tree.add_nodes(range(64), -1, 0, -1, False, False))
    for i in range(20):
        k = 2 if i in (0, 3, 6, 9) else 1
        par = np.repeat(np.asarray(cur), k)
        cur = list(tree.add_nodes(tree.tree[par], par, i + 1, i, True, k > 1, rng.normal(size=par.size)))
    r = leaf_vector(tree, tree.leaves(), rng.normal(size=len(tree.leaves())))
    adv = depthwise_advantages(tree, fuse_values(tree, r, "path"))
    assert tree.num_nodes == 64 * 219 and np.isfinite(adv).all()
