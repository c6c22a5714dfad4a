"""Expand-and-Prune: Optimal Variance Filtering, preview pruning in the rollout, accounting and trained edges."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from video_branch.config import ConfigError, load_config
from video_branch.config.specs import config_accounting, count_trained_edges, tree_spec
from video_branch.core import sde
from video_branch.core.errors import CoreError
from video_branch.core.ovf import get_prune_rule, ovf_select, preview_pruner, survivor_edges, top_select
from video_branch.core.schedule import flow_sigmas, model_timesteps
from video_branch.core.tree import TreeSpec, accounting
from video_branch.engine.rollout import edge_inputs, rollout


def _brute_force(r, k):
    return max(float(np.var(r[list(sub)])) for sub in itertools.combinations(range(len(r)), k))


@pytest.mark.parametrize("seed", range(30))
def test_ovf_equals_brute_force_over_all_subsets(seed):
    rng = np.random.default_rng(seed)
    g = int(rng.integers(2, 11))
    k = int(rng.integers(1, g + 1))
    r = rng.standard_normal(g) if seed % 3 else np.round(rng.standard_normal(g), 1)  # ties too
    chosen = ovf_select(r, k)
    assert chosen.size == k and np.unique(chosen).size == k
    assert np.isclose(np.var(r[chosen]), _brute_force(r, k), rtol=1e-9, atol=1e-12)


def test_ovf_keeps_the_extremes_and_skips_failed_samples():
    r = np.array([0.5, 0.1, np.nan, 0.9, 0.52, 0.48, 0.0])
    assert ovf_select(r, 2).tolist() == [3, 6]  # the lowest and the highest
    assert not np.isin(2, ovf_select(r, 6))  # a NaN preview is taken last
    assert np.isin(2, ovf_select(r, 7))
    assert top_select(r, 2).tolist() == [3, 4]  # 0.9 and 0.52
    with pytest.raises(ValueError, match="keep"):
        ovf_select(r, 8)
    with pytest.raises(CoreError, match="unknown rule 'ovff'; did you mean 'ovf'"):
        get_prune_rule("ovff")
    with pytest.raises(ConfigError, match="tree.prune_rule.*did you mean 'ovf'"):
        load_config(None, ["tree.prune_rule=ovff"], method="pro_grpo")


def test_accounting_cli_counts_pro_grpo_by_hand(capsys):
    from video_branch.accounting import main  # what ``python -m video_branch.accounting`` runs, in this process

    capsys.readouterr()
    assert main(["--method", "pro_grpo", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    # 48 chains run steps 0-4, 24 survive to run steps 5-6, 12 run steps 7-9.
    assert acc["forward_passes"] == 48 * 5 + 24 * 2 + 12 * 3 == 324
    assert acc["evaluated_per_step"] == [48] * 5 + [24] * 2 + [12] * 3
    assert acc["leaves"] == 12
    # The 12 survivors' chains, last step not trained (Flow-GRPO's setting).
    assert acc["trained_edges"] == 12 * 9
    # Every created node is an edge: 48 x 5 + 24 x 2 + 12 x 3.
    assert acc["edges"] == 324
    cfg = load_config(method="pro_grpo", overrides=["tree.survivors=[[2, 10], [8, 3]]", "tree.roots=16",
                                                    "rollout.guidance_scale=4.5"])
    assert config_accounting(cfg)["forward_passes"] == 2 * (16 * 2 + 10 * 6 + 3 * 2)


def test_bad_survivors_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match="tree.survivors.*30 survivors at step 5.*24 live"):
        load_config(method="pro_grpo", overrides=["tree.survivors=[[4, 24], [5, 30]]"])
    with pytest.raises(ConfigError, match="tree.survivors.*checkpoint steps"):
        load_config(method="pro_grpo", overrides=["tree.survivors=[[0, 24]]"])
    with pytest.raises(ConfigError, match="tree.survivors.*prune.width"):
        load_config(method="branchgrpo_ovf", overrides=["prune.width=parent_top1"])


def _model(x, t, emb):
    return 0.3 * x + 0.01 * t.reshape(-1, 1, 1, 1, 1) / 1000 + emb[:, :1, :1].reshape(-1, 1, 1, 1, 1)


SHAPE = (2, 1, 2, 2)


def test_rollout_keeps_the_ovf_set_of_previews_and_counts_forward_passes():
    spec = TreeSpec(num_steps=6, roots=8, survivors=((3, 4), (5, 2)), sde_form="flow", eta=0.7)
    emb = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    seen = {}

    def score(trees, x0):
        s = x0.flatten(1).sum(1).double().numpy()
        seen.setdefault("calls", []).append((trees.copy(), x0.clone(), s))
        return s

    evaluated = []

    def model(x, t, e):
        evaluated.append(x.shape[0])
        return _model(x, t, e)

    res = rollout(spec, model, emb, latent_shape=SHAPE, seeds=[3, 4], frontier_batch=5,
                  prune_fn=preview_pruner("ovf", spec, score))
    tree = res.tree
    tree.validate()
    assert res.forward_passes == 2 * accounting(spec)["forward_passes"] == 2 * (8 * 3 + 4 * 2 + 2 * 1)
    assert sum(evaluated) == res.forward_passes
    assert len(tree.leaves()) == 4 and int(tree.pruned.sum()) == 2 * (4 + 2)
    # An unpruned rollout with the same seeds draws the same noise up to depth 3: the previews at the first
    # checkpoint are x0_hat = x_2 - s_2 v(x_2) of its depth-2 nodes, and the survivors are their OVF sets.
    ref = rollout(TreeSpec(num_steps=6, roots=8, sde_form="flow", eta=0.7), _model, emb, latent_shape=SHAPE,
                  seeds=[3, 4])
    sig = flow_sigmas(6, 3.0)
    d2, d3 = ref.tree.at_depth(2), ref.tree.at_depth(3)
    x2 = ref.latents(d2)
    v2 = _model(x2, model_timesteps(sig[2]).expand(d2.size), emb[ref.tree.tree[d2]])
    trees, x0, s = seen["calls"][0]
    assert torch.allclose(x0, sde.predict_x0(x2, v2, sig[2]), atol=1e-6)
    for t in (0, 1):
        pos = np.nonzero(trees == t)[0]
        kept_ref = d3[pos[ovf_select(s[pos], 4)]]
        kept = tree.at_depth(3)[(tree.tree[tree.at_depth(3)] == t) & ~tree.pruned[tree.at_depth(3)]]
        assert torch.equal(res.latents(kept), ref.latents(kept_ref))
        assert np.array_equal(tree.logp[kept], ref.tree.logp[kept_ref])
    # Moved nodes stay consistent: every survivor edge's log-prob recomputes from its stored parent and child.
    edges = np.nonzero(survivor_edges(tree, spec) & tree.sde)[0]
    inp = edge_inputs(res, edges)
    v = _model(inp["parent_latent"], model_timesteps(inp["s"]), emb[inp["tree_index"]])
    logp = sde.transition_log_prob("flow", inp["parent_latent"], v, inp["child_latent"], inp["s"], inp["s_next"],
                                   inp["eta"], s_cap=inp["s_cap"])
    assert torch.allclose(logp, inp["logp_old"], atol=1e-5)
    assert edges.size == 2 * 2 * 6  # the final 2 chains per tree, 6 edges each


def test_trained_edge_count_of_a_pruned_branching_tree_does_not_depend_on_the_data():
    cfg = load_config(method="branchgrpo_ovf", overrides=["tree.num_steps=12", "tree.split_steps=[0, 3, 6, 9]"])
    spec = tree_spec(cfg)
    expected = count_trained_edges(cfg, spec)
    emb = torch.randn(1, 3, 4)
    counts = set()
    for seed in range(6):
        scores = np.random.default_rng(seed).standard_normal(64)
        res = rollout(spec, _model, emb, latent_shape=SHAPE, seeds=[seed],
                      prune_fn=preview_pruner("ovf", spec, lambda t, x, s=scores: s[: len(t)]))
        mask = survivor_edges(res.tree, spec) & res.tree.sde
        # every surviving leaf's chain is trained
        leaves = res.tree.leaves()
        assert mask[leaves].all() and mask[res.tree.parent[leaves]].all()
        counts.add(int(mask.sum()))
    assert counts == {expected}
