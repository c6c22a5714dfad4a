"""The presets against independent transcriptions of the released code, written here: what the reward decodes, the
KL's scale per step (Flow-GRPO), global-std advantages (Flow-GRPO), MixGRPO's window positions, BranchGRPO's released
width-pruning modes and DanceGRPO's shared initial noise."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from video_branch.config import load_config
from video_branch.config.presets import preset_names
from video_branch.config.specs import config_accounting, tree_spec
from video_branch.core.credit import assign_credit, leaf_vector
from video_branch.core.objectives import clipped_ratio, kl_std
from video_branch.core.pruning import select_trained_edges
from video_branch.core.sde import sde_mean_std
from video_branch.core.tree import build_structure
from video_branch.engine import scoring
from video_branch.engine.rollout import rollout


def released_sigmas(n: int, shift: float) -> list[float]:
    """sd3_time_shift(shift, linspace(1, 0, n + 1)): shift * t / (1 + (shift - 1) * t)."""
    return [shift * t / (1 + (shift - 1) * t) for t in (1 - i / n for i in range(n + 1))]


# ------------------------------------------------------------------------------------------------ decode point
def _velocity(x, t, emb):
    return 0.4 * x - 0.002 * t.view(-1, *([1] * (x.dim() - 1))).to(x) + emb[:, :1, :1].mean() * 0.0


@pytest.mark.parametrize("method", [m for m in preset_names() if m not in ("pro_grpo", "branchgrpo_ovf")])
def test_the_reward_sees_the_last_steps_clean_prediction(method, monkeypatch):
    """DanceGRPO and BranchGRPO decode x0_hat = x - s v of the last step; for flowgrpo this is the choice made
    (docs/METHODS.md). An ODE last step to s = 0 lands on the same x0_hat."""
    cfg = load_config(method=method, overrides=["tree.roots=2"] if "branch" not in method else [])
    spec = tree_spec(cfg, 0)
    calls = []

    def model_fn(x, t, emb):
        v = _velocity(x, t, emb)
        calls.append((x.clone(), t.clone(), v.clone()))
        return v

    res = rollout(spec, model_fn, torch.zeros(1, 3, 4), latent_shape=(2, 1, 2, 2), seeds=[5],
                  reward_on=cfg.rollout.reward_on, logprob_reduce="mean")
    res.prompts = ["p"]
    seen = {}
    monkeypatch.setattr(scoring, "decode", lambda vae, lat, d, bs: seen.setdefault("lat", lat.clone()))
    d = types.SimpleNamespace(sp_size=1, device="cpu")
    scoring.score_leaves(res, None, lambda frames, prompts: {"r": torch.zeros(len(prompts))}, d,
                         reward_on=cfg.rollout.reward_on, decode_batch=4)
    s_last = released_sigmas(spec.num_steps, spec.shift)[-2]
    last = [c for c in calls if abs(float(c[1][0]) - 1000 * s_last) < 1e-3]
    x = torch.cat([c[0] for c in last])
    v = torch.cat([c[2] for c in last])
    np.testing.assert_allclose(seen["lat"].numpy(), (x - s_last * v).numpy(), rtol=1e-5, atol=1e-6)


def test_presets_with_an_sde_last_step_decode_x0_hat():
    for m in ("branchgrpo", "dancegrpo", "flowgrpo", "pro_grpo", "branchgrpo_ovf"):
        cfg = load_config(method=m)
        assert tree_spec(cfg, 0).kinds[-1] == "sde" and cfg.rollout.reward_on == "x0_hat"


# ------------------------------------------------------------------------------------------------ KL scale
def released_flowgrpo_kl(mean, mean_ref, s: float, a: float, s1: float) -> float:
    """scripts/train_sd3.py: ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean() / (2 * std_dev_t ** 2),
    std_dev_t = a * sqrt(s / (1 - where(s == 1, sigma_max, s))) from sd3_sde_with_logprob.py."""
    std_dev_t = a * math.sqrt(s / (1 - (s1 if s == 1 else s)))
    return float(((mean - mean_ref) ** 2).mean()) / (2 * std_dev_t ** 2)


def test_flowgrpo_kl_matches_the_released_scale_at_every_trained_step():
    cfg = load_config(method="flowgrpo")
    assert cfg.objective.kl_form == "flow_grpo" and cfg.objective.kl_coef == 0.04
    sig = released_sigmas(cfg.tree.num_steps, cfg.tree.shift)
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(1, 4, 1, 3, 3, generator=g) for _ in range(3))
    ratios = []
    for i in range(cfg.tree.num_steps - 1):  # the last step is not trained
        s, sn = torch.tensor([sig[i]]), torch.tensor([sig[i + 1]])
        mean, std = sde_mean_std("flow", x, v, s, sn, cfg.tree.eta, s_cap=sig[1])
        mean_ref, _ = sde_mean_std("flow", x, v_ref, s, sn, cfg.tree.eta, s_cap=sig[1])
        std_e = std.expand(1, *([1] * (x.dim() - 1)))
        out = clipped_ratio(torch.zeros(1), torch.zeros(1), torch.zeros(1), clip_eps=1e-4, kl_coef=1.0,
                            mean_new=mean, mean_ref=mean_ref, std=std_e,
                            kl_std=kl_std(cfg.objective.kl_form, std_e, s, sn))
        ref = released_flowgrpo_kl(mean, mean_ref, sig[i], cfg.tree.eta, sig[1])
        assert float(out.kl) == pytest.approx(ref, rel=1e-5)
        transition = clipped_ratio(torch.zeros(1), torch.zeros(1), torch.zeros(1), clip_eps=1e-4, kl_coef=1.0,
                                   mean_new=mean, mean_ref=mean_ref, std=std_e)
        ratios.append(float(transition.kl) / ref)
    # The transition form is 1 / |ds| larger: 28.0, 24.3, ..., 5.6 on the preset's schedule.
    np.testing.assert_allclose(ratios, [1 / (sig[i] - sig[i + 1]) for i in range(9)], rtol=1e-4)
    assert ratios[0] == pytest.approx(28.0, abs=0.05) and ratios[1] == pytest.approx(24.3, abs=0.05)
    assert ratios[-1] == pytest.approx(5.6, abs=0.05)


# ------------------------------------------------------------------------------------------------ global std
def released_global_std_advantages(prompts, rewards):
    """flow_grpo/stat_tracking.py, PerPromptStatTracker(global_std=True).update: per-prompt mean, the std of all
    rewards of the batch (numpy, ddof 0) + 1e-4."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    for p in np.unique(prompts):
        mean = np.mean(rewards[prompts == p])
        adv[prompts == p] = (rewards[prompts == p] - mean) / (np.std(rewards) + 1e-4)
    return adv


def test_flowgrpo_advantages_use_the_batch_std():
    cfg = load_config(method="flowgrpo", overrides=["tree.roots=5"])
    assert cfg.credit.std == "global"
    tree = build_structure(tree_spec(cfg, 0), 3)
    rng = np.random.default_rng(2)
    leaves = tree.leaves()
    r = rng.normal(0, 1, leaves.size) * np.repeat([1.0, 4.0, 0.3], 5) + np.repeat([0.0, 3.0, -1.0], 5)
    # Two ranks: this one holds the three trees, the other one more rewards; the batch std covers both.
    other = rng.normal(0, 2, 10)
    _, adv = assign_credit(tree, {"r": leaf_vector(tree, leaves, r)}, {"r": 1.0}, cfg.credit,
                           batch_std=lambda x: float(np.std(np.concatenate([x, other]))))
    prompts = list(tree.tree[leaves]) + [9] * 5 + [8] * 5
    ref = released_global_std_advantages(prompts, np.concatenate([r, other]))[: leaves.size]
    np.testing.assert_allclose(adv[leaves], np.clip(ref, -5, 5), rtol=1e-9)
    for n in np.nonzero(tree.depth >= 1)[0]:  # every edge of a chain carries its leaf's advantage
        leaf = n
        while tree.children[leaf].size:
            leaf = tree.children[leaf][0]
        assert adv[n] == pytest.approx(adv[leaf])


# ------------------------------------------------------------------------------------------------ MixGRPO window
class ReleasedGRPOTrainingStates:
    """fastvideo/utils/grpo_states.py, the "progressive" strategy with prog_overlap and roll_back, as the MixGRPO
    script runs it (group_size 4, iters_per_group 25, prog_overlap_step 1, max_timesteps = sampling_steps - 2)."""

    def __init__(self, iters_per_group, group_size, max_timesteps, overlap_step=1):
        self.iters_per_group, self.group_size, self.max_timesteps = iters_per_group, group_size, max_timesteps
        self.overlap_step, self.cur_timestep, self.cur_iter_in_group, self.init_timestep = overlap_step, 0, 0, 0

    def update_iteration(self):
        self.cur_iter_in_group += 1
        if self.cur_iter_in_group >= self.iters_per_group:
            self.cur_iter_in_group = 0
            self.cur_timestep += self.overlap_step
        if self.cur_timestep > self.max_timesteps:
            self.cur_timestep, self.cur_iter_in_group = self.init_timestep, 0

    def get_current_timesteps(self):
        return list(range(self.cur_timestep, min(self.cur_timestep + self.group_size, self.max_timesteps)))


def test_mixgrpo_window_positions_over_1000_iterations():
    cfg = load_config(method="mixgrpo")
    assert cfg.tree.sde_form == "flow" and cfg.tree.eta == 0.7
    ref = ReleasedGRPOTrainingStates(25, 4, cfg.tree.num_steps - 2)
    sizes = set()
    for it in range(1000):
        want = ref.get_current_timesteps()
        ref.update_iteration()
        spec = tree_spec(cfg, it)
        assert list(spec.sde_steps) == want, it
        sizes.add(len(want))
        acc = config_accounting(cfg, it) if it % 97 == 0 else None
        if acc is not None:
            assert acc["trained_edges"] == 16 * len(want)
    assert sizes == {0, 1, 2, 3, 4}
    never = set(range(cfg.tree.num_steps)) - {s for it in range(1000) for s in tree_spec(cfg, it).sde_steps}
    assert never == {18, 19}


# ------------------------------------------------------------------------------------------------ width pruning
def released_width_pruning(samples, mode: int, last_split_step: int, ratio: float = 0.5):
    """fastvideo/train_branchgrpo_flux.py, width_pruning_mode 1 and 2, on training_samples (dicts in collection
    order with step = the parent's step, branch = the node at last_split_step + 1 it descends from, advantage)."""
    last = [s for s in samples if s["step"] > last_split_step]
    other = [s for s in samples if s["step"] <= last_split_step]
    if mode == 1:
        groups = {}
        for s in last:
            groups.setdefault(s["branch"], []).append(s)
        kept = []
        for group in groups.values():
            keep = max(1, int(len(group) * ratio))
            kept.extend(sorted(group, key=lambda x: x["advantage"], reverse=True)[:keep])
        return other + kept
    ordered = sorted(last, key=lambda x: x["advantage"], reverse=True)
    keep = max(2, int(len(ordered) * ratio))
    best = keep // 2
    worst = keep - best
    return other + ordered[:best] + (ordered[-worst:] if worst > 0 else [])


def _released_samples(tree, adv):
    """collect_all_transitions: a pre-order walk from each root, one sample per edge."""
    out = []

    def walk(n, branch):
        for c in tree.children[n]:
            b = c if tree.step[c] == tree.step[tree.split].max() else branch
            out.append({"child": int(c), "step": int(tree.step[c]), "branch": b, "advantage": float(adv[c])})
            walk(c, b)

    for r in np.nonzero(tree.parent < 0)[0]:
        walk(r, -1)
    return out


@pytest.mark.parametrize("mode,name", [(1, "released_branch"), (2, "released_pool")])
def test_released_width_pruning_modes(mode, name):
    cfg = load_config(method="branchgrpo", overrides=[f"prune.width={name}", "train.prompts_per_rank=2"])
    tree = build_structure(tree_spec(cfg, 0), 2)
    rng = np.random.default_rng(4)
    for chain_constant in (True, False):
        leaves = tree.leaves()
        adv = rng.normal(size=tree.num_nodes)
        if chain_constant:  # as the depth-wise advantages of single-child chains are: one value per chain
            for n in range(tree.num_nodes):
                if tree.depth[n] > 10:
                    adv[n] = adv[tree.parent[n]]
        ref = {s["child"] for s in released_width_pruning(_released_samples(tree, adv), mode, 9)}
        got = select_trained_edges(tree, rng.normal(size=tree.num_nodes), adv, cfg, 0)
        assert set(np.nonzero(got)[0].tolist()) == ref
        assert got.sum() == 2 * 138
        if chain_constant and mode == 1:  # a depth cut in effect: the first 5 post-split steps of every chain
            assert set(tree.step[got & (tree.depth > 10)].tolist()) == {10, 11, 12, 13, 14}
        del leaves


# ------------------------------------------------------------------------------------------------ shared noise
def test_dancegrpo_shared_noise_variant():
    cfg = load_config(method="dancegrpo_shared")
    acc = config_accounting(cfg)
    assert acc["forward_passes"] == 1 + 16 * 19 and acc["leaves"] == 16 and acc["trained_edges"] == 16 * 11
    spec = tree_spec(cfg, 0)
    res = rollout(spec, _velocity, torch.zeros(1, 3, 4), latent_shape=(2, 1, 2, 2), seeds=[3],
                  logprob_reduce="mean")
    first = res.latents(np.nonzero(res.tree.depth == 0)[0])
    assert first.shape[0] == 1  # one initial noise for the group
    # Every chain draws its own trained steps (DanceGRPO permutes each sample's timesteps).
    tree = res.tree
    mask = select_trained_edges(tree, np.zeros(tree.num_nodes), np.zeros(tree.num_nodes), cfg, 0,
                                np.random.default_rng(1))
    per_chain = []
    for leaf in tree.leaves():
        steps, n = set(), leaf
        while tree.parent[n] >= 0:
            if mask[n]:
                steps.add(int(tree.step[n]))
            n = tree.parent[n]
        assert len(steps) == 11 and 19 not in steps
        per_chain.append(frozenset(steps))
    assert len(set(per_chain)) > 1
