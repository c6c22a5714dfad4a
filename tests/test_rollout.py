import math

import numpy as np
import pytest
import torch

from video_branch.core import sde
from video_branch.core.schedule import flow_sigmas
from video_branch.core.tree import TreeSpec, accounting, build_structure
from video_branch.engine.rollout import edge_inputs, rollout

torch.set_num_threads(1)
SHAPE = (4, 3, 4, 4)  # C, F, H, W


class TinyVelocity(torch.nn.Module):
    """A random-weights velocity net: a conv over the latent, conditioned on time and on the text embedding."""

    def __init__(self, seed=0, channels=4, text_dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
        self.text = torch.nn.Linear(text_dim, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, x, t, emb):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return self.conv(x.float()) * (1 + s) + self.text(emb.mean(1)).view(x.shape[0], -1, 1, 1, 1)


def _embeds(num_trees, seed=1):
    return torch.randn(num_trees, 5, 8, generator=torch.Generator().manual_seed(seed))


def _branch_spec(**kw):
    base = dict(num_steps=8, roots=1, split_steps=(0, 2, 4), branching=2, correlation=4.0, eta=0.4, split_eta=0.9)
    base.update(kw)
    return TreeSpec(**base)


def _mix_spec(**kw):
    kinds = ("sde", "sde", "ode", "sde", "ode", "ode", "sde", "ode")
    return _branch_spec(split_steps=(0, 3), kinds=kinds, **kw)


def _run(spec, model, emb, **kw):
    args = dict(latent_shape=SHAPE, seeds=[11 + i for i in range(emb.shape[0])])
    args.update(kw)
    return rollout(spec, model, emb, **args)


# ------------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("guidance", [1.0, 3.5])
@pytest.mark.parametrize("make_spec", [_branch_spec, _mix_spec])
def test_frontier_batched_equals_node_by_node(make_spec, guidance):
    spec, model, emb = make_spec(), TinyVelocity(), _embeds(3)
    neg = torch.zeros(5, 8)
    results = [_run(spec, model, emb, frontier_batch=fb, guidance_scale=guidance, negative_embeds=neg)
               for fb in (64, 1, 5)]
    ref = results[0]
    for r in results[1:]:
        torch.testing.assert_close(r.leaf_latents, ref.leaf_latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(r._store, ref._store, atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.tree.logp, ref.tree.logp, atol=1e-5, rtol=0)  # NaNs must coincide too
        np.testing.assert_array_equal(r.edge_std, ref.edge_std)
        assert r.forward_passes == ref.forward_passes
    assert results[1].model_calls == sum(3 * n for n in spec.nodes_per_depth()[:-1])  # one node per call
    assert ref.model_calls == spec.num_steps  # every frontier fits one call of 64


def test_noise_belongs_to_the_tree_not_to_the_batch():
    spec, model, emb = _branch_spec(), TinyVelocity(), _embeds(3)
    together = rollout(spec, model, emb, latent_shape=SHAPE, seeds=[5, 6, 7], frontier_batch=7)
    alone = rollout(spec, model, emb[1:2], latent_shape=SHAPE, seeds=[6], frontier_batch=64)
    mine = together.tree.leaves(1)
    torch.testing.assert_close(together.latents(mine), alone.leaf_latents, atol=1e-5, rtol=0)
    np.testing.assert_allclose(together.tree.logp[together.tree.tree == 1], alone.tree.logp, atol=1e-5, rtol=0)
    again = rollout(spec, model, emb, latent_shape=SHAPE, seeds=[5, 6, 7], frontier_batch=7)
    assert torch.equal(again.leaf_latents, together.leaf_latents)
    other = rollout(spec, model, emb, latent_shape=SHAPE, seeds=[5, 9, 7], frontier_batch=7)
    assert not torch.allclose(other.latents(mine), together.latents(mine))
    torch.testing.assert_close(other.latents(together.tree.leaves(0)), together.latents(together.tree.leaves(0)))


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("spec", [
    _branch_spec(num_steps=20, split_steps=(0, 3, 6, 9), split_eta=None),
    _mix_spec(),
    TreeSpec(num_steps=6, roots=4, eta=0.3),  # a sequential group
    TreeSpec(num_steps=6, split_steps=(2,), branching=5, split_noise="independent", sde_form="flow", eta=0.7,
             kinds=("ode", "ode", "sde", "sde", "ode", "ode")),  # Flow-GRPO-Fast shaped
])
def test_rollout_tree_is_the_built_structure_and_costs_the_accounting(spec, guidance):
    emb = _embeds(2)
    r = _run(spec, TinyVelocity(), emb, guidance_scale=guidance, negative_embeds=torch.zeros(1, 5, 8),
             frontier_batch=16)
    built = build_structure(spec, 2)
    for key in ("tree", "parent", "depth", "step", "sde", "split"):
        np.testing.assert_array_equal(getattr(r.tree, key), getattr(built, key), err_msg=key)
    r.tree.validate()
    assert np.array_equal(np.isfinite(r.tree.logp), r.tree.sde)
    assert np.array_equal(np.isfinite(r.edge_eta), r.tree.sde) and np.array_equal(np.isfinite(r.edge_std), r.tree.sde)
    assert r.forward_passes == 2 * accounting(spec, guidance=guidance != 1.0)["forward_passes"]
    per_depth = 2 * spec.nodes_per_depth()[:-1]
    assert r.model_calls == sum(math.ceil(n / 16) for n in per_depth)
    assert r.leaf_latents.shape == (2 * accounting(spec)["leaves"], *SHAPE)
    assert torch.equal(r.leaf_latents, r.latents(r.tree.leaves()))


# ------------------------------------------------------------------------------------------------ on-policy
def _analytic_model(m=0.3, s0=0.5):
    """Exact flow-matching velocity of data x0 ~ N(m, s0^2 I) (see test_leaves_...); elementwise, batch-invariant."""

    def model(x, t, emb):
        s = (t.double() / 1000).view(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * s0**2 + s**2
        v = (s - (1 - s) * s0**2) / var * (x.double() - (1 - s) * m) - m
        return (v + 0.01 * emb.double().mean((1, 2)).view_as(s)).float()

    return model


def _recompute(result, model, emb, ids, guidance=1.0, neg=None):
    e = edge_inputs(result, ids)
    t = 1000 * e["s"]
    cond = emb[e["tree_index"]]
    if guidance != 1.0:
        x2 = torch.cat([e["parent_latent"]] * 2)
        out = model(x2, torch.cat([t, t]), torch.cat([neg.expand_as(cond), cond]))
        v = sde.cfg_combine(*out.chunk(2), guidance)
    else:
        v = model(e["parent_latent"], t, cond)
    lp = sde.transition_log_prob(result.spec.sde_form, e["parent_latent"], v, e["child_latent"], e["s"],
                                 e["s_next"], e["eta"], s_cap=e["s_cap"], reduce=result.logprob_reduce)
    return lp, e["logp_old"]


@pytest.mark.parametrize("form,dtype,guidance", [
    ("dance", torch.float32, 1.0), ("flow", torch.float32, 1.0), ("dance", torch.float32, 4.0),
    ("dance", torch.bfloat16, 1.0),
])
def test_recomputed_log_prob_equals_rollout_exactly(form, dtype, guidance):
    spec = _mix_spec(sde_form=form, eta=0.7 if form == "flow" else 0.4)
    model, emb, neg = _analytic_model(), _embeds(3), torch.zeros(1, 5, 8)
    r = _run(spec, model, emb, frontier_batch=6, dtype=dtype, guidance_scale=guidance, negative_embeds=neg)
    ids = np.nonzero(r.tree.sde)[0]
    assert r.latents(ids).dtype == dtype
    lp, old = _recompute(r, model, emb, ids, guidance, neg)
    assert torch.isfinite(old).all()
    assert torch.equal(lp, old), (lp - old).abs().max()  # ratio exactly 1


def test_recomputed_log_prob_with_a_conv_net_matches_to_float_precision():
    spec, model, emb = _branch_spec(), TinyVelocity(), _embeds(2)
    r = _run(spec, model, emb, frontier_batch=3, logprob_reduce="sum")
    ids = np.nonzero(r.tree.sde)[0]
    lp, old = _recompute(r, model, emb, ids)
    torch.testing.assert_close(lp, old, atol=1e-4, rtol=1e-6)
    # A changed policy moves the log-prob: the check is not vacuous.
    with torch.no_grad():
        model.conv.weight.mul_(1.1)
    lp2, _ = _recompute(r, model, emb, ids)
    assert (lp2 - old).abs().max() > 1e-3


def test_edge_inputs_describe_the_edge():
    spec, model, emb = _mix_spec(), TinyVelocity(), _embeds(2)
    r = _run(spec, model, emb)
    sig = flow_sigmas(spec.num_steps, spec.shift)
    ids = np.nonzero(r.tree.sde)[0]
    e = edge_inputs(r, ids)
    assert torch.equal(e["s"], sig[r.tree.step[ids]]) and torch.equal(e["s_next"], sig[r.tree.step[ids] + 1])
    split = r.tree.split[ids]
    np.testing.assert_allclose(e["eta"].numpy(), np.where(split, 0.9, 0.4).astype(np.float32))
    assert torch.equal(e["tree_index"], torch.from_numpy(r.tree.tree[ids]))
    assert torch.equal(e["parent_latent"], r.latents(r.tree.parent[ids]))
    assert e["s_cap"].item() == sig[1].item()


# ------------------------------------------------------------------------------------------------ split steps
def _dance_mean(x, v, s, s_next, eta):
    """ALGORITHMS.md section 1, written out independently of video_branch.core.sde."""
    x0 = x - s * v
    g = -(x - (1 - s) * x0) / s**2
    return x + (s_next - s) * (v - 0.5 * eta**2 * g)


@pytest.mark.parametrize("noise,c,expected_corr", [("correlated", 4.0, 1 / 17), ("correlated", 1.0, 0.5),
                                                    ("independent", 4.0, 0.0)])
def test_split_children_share_the_mean_and_draw_correlated_noise(noise, c, expected_corr):
    shape = (4, 4, 16, 16)  # 4096 elements per child
    spec = TreeSpec(num_steps=3, split_steps=(0,), branching=3, split_noise=noise, correlation=c, eta=0.3,
                    split_eta=1.5, shift=1.0)
    model, emb = _analytic_model(), _embeds(4)
    r = rollout(spec, model, emb, latent_shape=shape, seeds=[1, 2, 3, 4])
    t = r.tree
    sig = flow_sigmas(3, 1.0).double()
    std = 1.5 * math.sqrt(sig[0] - sig[1])
    xis = []
    for root in t.at_depth(0):
        kids = t.children[root]
        x = r.latents([root]).double()
        v = model(x.float(), torch.tensor([1000.0]), emb[t.tree[root]][None]).double()
        mu = _dance_mean(x, v, sig[0], sig[1], 1.5)
        xi = (r.latents(kids).double() - mu) / std
        xis.append(xi.reshape(3, -1))
        np.testing.assert_allclose(r.edge_std[kids], std, rtol=1e-6)
        # The split edge's log-prob is the child's own density under that same std (mean over elements).
        hand = (-0.5 * xi.reshape(3, -1) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(1)
        np.testing.assert_allclose(t.logp[kids], hand.numpy(), atol=2e-5)
    xi = torch.cat(xis, 1)  # [3 siblings, 4 trees * 4096]
    n = xi.shape[1]
    assert xi.mean().abs() < 4 / math.sqrt(3 * n)
    assert abs(xi.var().item() - 1) < 4 * math.sqrt(2 / (3 * n))  # every child is exactly N(0, I) around the mean
    for a, b in ((0, 1), (0, 2), (1, 2)):
        corr = torch.corrcoef(xi[[a, b]])[0, 1].item()
        assert abs(corr - expected_corr) < 4 / math.sqrt(n)


def test_zero_correlation_gives_identical_siblings():
    spec = TreeSpec(num_steps=4, split_steps=(1,), branching=4, correlation=0.0)
    r = rollout(spec, _analytic_model(), _embeds(1), latent_shape=SHAPE, seeds=[3])
    kids = r.tree.at_depth(2)
    first = r.latents(kids[:1]).expand(4, *SHAPE)
    torch.testing.assert_close(r.latents(kids), first, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ distribution
M_DATA = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)  # one data mean per latent element
S0 = 0.5


def _gaussian_data_velocity(x, t, emb):
    """Flow-matching velocity of x0 ~ N(m, S0^2 I): v(x, s) = E[eps - x0 | x_s = x].

    x_s = (1 - s) x0 + s eps has per-element variance V = (1 - s)^2 S0^2 + s^2 and mean (1 - s) m, so
    E[x0 | x] = m + (1 - s) S0^2 / V (x - (1 - s) m), E[eps | x] = s / V (x - (1 - s) m) and
    v = (s - (1 - s) S0^2) / V * (x - (1 - s) m) - m.
    """
    s = (t.double() / 1000).view(-1, 1, 1, 1, 1)
    var = (1 - s) ** 2 * S0**2 + s**2
    m = M_DATA.double()
    return ((s - (1 - s) * S0**2) / var * (x.double() - (1 - s) * m) - m).float()


def _exact_chain_moments(spec):
    """Per-element mean and variance of the leaves of the discretised Dance chain, by the linear-Gaussian recursion.

    Each step is affine in x with additive Gaussian noise (x' = A x + B + sd xi), so the moments propagate exactly:
    mean' = A mean + B, var' = A^2 var + sd^2. Splits do not change a child's marginal (each xi_b is N(0, I)).
    """
    sig = flow_sigmas(spec.num_steps, spec.shift).double().numpy()
    m = M_DATA.double().numpy().reshape(-1)
    mean, var = np.zeros_like(m), np.ones_like(m)
    for i in range(spec.num_steps):
        s, sn, eta = sig[i], sig[i + 1], spec.step_eta(i)
        V = (1 - s) ** 2 * S0**2 + s**2

        def mu(x, s=s, sn=sn, eta=eta, V=V):
            v = (s - (1 - s) * S0**2) / V * (x - (1 - s) * m) - m
            return _dance_mean(x, v, s, sn, eta)

        b = mu(np.zeros_like(m))
        a = mu(np.ones_like(m)) - b
        mean, var = a * mean + b, a * a * var + eta**2 * (s - sn)
    return mean, var


def _leaf_moments(spec, num_trees, seed0):
    """Per-element mean and second moment about the data mean, with standard errors from tree-level averages
    (leaves of one tree are correlated; trees are independent)."""
    r = rollout(spec, _gaussian_data_velocity, torch.zeros(num_trees, 1, 1), latent_shape=(1, 1, 4, 4),
                seeds=range(seed0, seed0 + num_trees), frontier_batch=4096)
    leaves = r.leaf_latents.double().view(num_trees, -1, 16)
    a = leaves.mean(1)
    q = ((leaves - M_DATA.double().view(1, 1, 16)) ** 2).mean(1)
    return a.mean(0), a.std(0) / math.sqrt(num_trees), q.mean(0), q.std(0) / math.sqrt(num_trees)


def _assert_close_z(x, se_x, target, se_target=0.0, z=4.5, slack=0.0):
    bound = z * torch.sqrt(se_x**2 + torch.as_tensor(se_target) ** 2) + slack
    assert ((x - target).abs() <= bound).all(), ((x - target).abs() / bound).max()


def test_branched_leaves_have_the_marginals_of_sequential_chains():
    # Splits where the step noise is large, so a mis-scaled split noise would show in the leaves' spread.
    branched = _branch_spec(num_steps=20, split_steps=(2, 6, 10, 14), eta=1.0, split_eta=None, shift=1.0)
    chains = TreeSpec(num_steps=20, roots=16, eta=1.0, shift=1.0)
    bm, bm_se, bq, bq_se = _leaf_moments(branched, 160, 0)
    cm, cm_se, cq, cq_se = _leaf_moments(chains, 80, 10_000)
    _assert_close_z(bm, bm_se, cm, cm_se)
    _assert_close_z(bq, bq_se, cq, cq_se)
    # Both match the exact moments of the discretised chain (mean, and variance = second moment about m).
    mean, var = (torch.from_numpy(v) for v in _exact_chain_moments(branched))
    m = M_DATA.double().view(16)
    for am, am_se, aq, aq_se in ((bm, bm_se, bq, bq_se), (cm, cm_se, cq, cq_se)):
        _assert_close_z(am, am_se, mean)
        _assert_close_z(aq, aq_se, var + (mean - m) ** 2)


def test_dance_sde_leaves_follow_the_data_distribution_with_enough_steps():
    spec = _branch_spec(num_steps=100, split_steps=(0, 10, 20, 30), eta=0.5, split_eta=None, shift=1.0)
    mean, var = _exact_chain_moments(spec)
    # The SDE preserves the flow's marginals, so the only gap to the data is the Euler discretisation (O(1/N)).
    assert np.abs(mean - M_DATA.numpy().reshape(-1)).max() < 1e-9 and np.abs(var - S0**2).max() < 0.006
    m, m_se, q, q_se = _leaf_moments(spec, 64, 20_000)
    _assert_close_z(m, m_se, M_DATA.double().view(16))
    _assert_close_z(q, q_se, torch.full((16,), S0**2, dtype=torch.float64), slack=0.006)


# ------------------------------------------------------------------------------------------------ storage, x0_hat
def test_only_latents_around_sde_edges_and_leaves_are_stored():
    spec, model, emb = _mix_spec(), TinyVelocity(), _embeds(2)
    r = _run(spec, model, emb, store_on_cpu=True)
    t = r.tree
    around_sde = t.sde.copy()
    around_sde[t.parent[t.sde]] = True
    np.testing.assert_array_equal(r.stored, around_sde | t.is_leaf)
    assert (~r.stored).any()
    with pytest.raises(KeyError, match="not stored"):
        r.latents(np.nonzero(~r.stored)[0][:1])
    ode_child = np.nonzero((t.parent >= 0) & ~t.sde)[0][:1]
    with pytest.raises(ValueError, match="not stochastic"):
        edge_inputs(r, ode_child)
    assert r.latents([0]).device.type == "cpu"


def test_x0_hat_of_the_last_step_per_leaf():
    spec, model, emb = _branch_spec(split_steps=(0, 7)), TinyVelocity(), _embeds(2)
    r = _run(spec, model, emb, reward_on="x0_hat")
    leaves = r.tree.leaves()
    parents = r.tree.parent[leaves]
    x = r.latents(parents)
    s = float(flow_sigmas(spec.num_steps, spec.shift)[-2])
    v = model(x, torch.full((len(leaves),), 1000 * s), emb[r.tree.tree[leaves]])
    torch.testing.assert_close(r.leaf_x0_hat, x - s * v, atol=1e-5, rtol=0)
    assert r.leaf_x0_hat.shape == r.leaf_latents.shape
    assert _run(spec, model, emb).leaf_x0_hat is None


def test_progress_is_reported_per_step():
    seen = []
    _run(_branch_spec(), TinyVelocity(), _embeds(1), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(1, 9)]


def test_bad_inputs_are_named():
    spec, model, emb = _branch_spec(), TinyVelocity(), _embeds(2)
    with pytest.raises(ValueError, match="negative_embeds"):
        _run(spec, model, emb, guidance_scale=3.0)
    with pytest.raises(ValueError, match="seeds"):
        _run(spec, model, emb, seeds=[1])
    with pytest.raises(ValueError, match="frontier_batch"):
        _run(spec, model, emb, frontier_batch=0)
    with pytest.raises(ValueError, match="reward_on"):
        _run(spec, model, emb, reward_on="latent")
    with pytest.raises(ValueError, match="model_fn must return"):
        _run(spec, lambda x, t, e: x[:, :2], emb)
    with pytest.raises(ValueError, match="unknown SDE form"):
        _run(_branch_spec(sde_form="ito"), model, emb)
