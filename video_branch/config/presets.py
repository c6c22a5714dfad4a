"""Method presets: every method of the family is a fragment of configuration for the one engine.

A preset fills tree, credit, pruning and objective settings with the defaults of ALGORITHMS.md; the user's YAML and
``--set`` overrides are applied on top, key by key. New methods enter with :func:`register_preset` (and, where they
need new behaviour, a registered function elsewhere), never with a branch in the trainer.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, List

from .errors import ConfigError

_PRESETS: Dict[str, Dict[str, Any]] = {}
_DOCS: Dict[str, str] = {}


def register_preset(name: str, fragment: Dict[str, Any], doc: str = "") -> None:
    if name in _PRESETS:
        raise ValueError(f"method preset '{name}' is registered twice")
    _PRESETS[name] = fragment
    _DOCS[name] = doc


def preset_names() -> List[str]:
    return sorted(_PRESETS)


def preset_doc(name: str) -> str:
    return _DOCS[get_preset_name(name)]


def get_preset_name(name: str) -> str:
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key 'method': unknown preset '{name}'{hint}. Accepted: {', '.join(preset_names())}")
    return name


def get_preset(name: str) -> Dict[str, Any]:
    """A deep copy of the preset's config fragment (with ``method`` set)."""
    frag = copy.deepcopy(_PRESETS[get_preset_name(name)])
    frag["method"] = name
    return frag


# ------------------------------------------------------------------------------------------------ the BranchGRPO family
_BRANCH_TREE = {
    "num_steps": 20,
    "roots": 1,
    "split_steps": [0, 3, 6, 9],
    "branching": 2,
    "split_noise": "correlated",
    "correlation": 4.0,
    "sde_form": "dance",
    "eta": 0.3,
    "base_kind": "sde",
    "window": {"size": 0},
}
_BRANCH = {
    "tree": _BRANCH_TREE,
    # The released code decodes the last step's x0_hat; an SDE last step's own latent still carries its noise.
    "rollout": {"reward_on": "x0_hat"},
    # The released scripts run mean fusion (TREE_PROB_WEIGHTED=false); fusion: path is their prob-weighted option.
    "credit": {"fusion": "mean", "beta": 1.0, "adv_clip": 5.0},
    "prune": {"width": "none", "depth_window": 0, "timestep_fraction": 1.0, "exclude_last_step": False},
    "objective": {"name": "clipped", "clip_eps": 1e-3, "kl_coef": 0.0},
    # The released loop steps the optimizer every 12 shuffled edges (gradient_accumulation_steps 12), plus once
    # after the remainder: 2 trees x 218 edges per rank -> 37 steps per rollout.
    "optim": {"minibatch": 12, "minibatch_by": "edge"},
}


def _with(base: Dict[str, Any], **sections: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for sec, values in sections.items():
        out.setdefault(sec, {})
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(out[sec].get(k), dict):
                out[sec][k] = {**out[sec][k], **v}
            else:
                out[sec][k] = v
    return out


register_preset(
    "branchgrpo", _BRANCH,
    "BranchGRPO: one root per prompt, splits at steps 0,3,6,9 with K=2 correlated children (c=4), Dance SDE "
    "(eta 0.3), mean fusion, depth-wise advantages, clip 1e-3, an optimizer step every 12 trained edges.",
)
register_preset(
    "branchgrpo_widpru", _with(_BRANCH, prune={"width": "parent_top1"}),
    "BranchGRPO + width pruning: after the last split keep the better child of each parent for backprop.",
)
register_preset(
    "branchgrpo_deppru", _with(_BRANCH, prune={"depth_window": 5, "depth_slide_interval": 30}),
    "BranchGRPO + depth pruning: a 5-depth window after the last split is dropped from backprop, sliding every 30 "
    "iterations.",
)
register_preset(
    "branchgrpo_mix",
    _with(_BRANCH, tree={"base_kind": "ode", "window": {"size": 4, "start": 0, "slide_interval": 25, "wrap": True}}),
    "BranchGRPO-Mix: split steps plus a sliding window of 4 SDE steps; ODE elsewhere; only SDE edges trained.",
)

# ------------------------------------------------------------------------------------------------ sequential groups
_SEQ_TREE = {
    "num_steps": 20,
    "roots": 16,
    "split_steps": [],
    "branching": 1,
    "sde_form": "dance",
    "eta": 0.3,
    "base_kind": "sde",
    "window": {"size": 0},
}
_DANCE = {
    "tree": _SEQ_TREE,
    "rollout": {"reward_on": "x0_hat"},  # DanceGRPO decodes the last step's x0_hat
    "credit": {"fusion": "mean", "beta": 0.0, "adv_clip": 5.0},
    "prune": {"width": "none", "depth_window": 0, "timestep_fraction": 0.6, "exclude_last_step": True},
    "objective": {"name": "clipped", "clip_eps": 1e-4, "kl_coef": 0.0},
    # DanceGRPO steps after every gradient_accumulation_steps whole chains; its FLUX 8-GPU script (24 chains per
    # rank, 12 per step) takes 2 steps per rollout: here 16 chains, 8 per step.
    "optim": {"minibatch": 8, "minibatch_by": "chain"},
}
register_preset(
    "dancegrpo", _DANCE,
    "DanceGRPO: 16 independent chains of 20 Dance SDE steps per prompt (a tree that splits 16 ways at the root), "
    "group z-score, timestep fraction 0.6, last step not trained, clip 1e-4.",
)
register_preset(
    "dancegrpo_shared",
    _with(_DANCE, tree={"roots": 1, "split_steps": [0], "branching": 16, "split_noise": "independent"}),
    "DanceGRPO with one initial noise per group (--init_same_noise, 8 of its 9 scripts): one root whose first step "
    "branches 16 ways with independent noise, so the shared first evaluation runs once (1 + 16 x 19 = 305 forward "
    "passes per prompt instead of 320); every chain draws its own trained steps.",
)
register_preset(
    "mixgrpo",
    # MixGRPO's script samples the window with the Flow-GRPO SDE (eta 0.7); its window stops before step N - 2.
    _with(_DANCE, tree={"base_kind": "ode", "sde_form": "flow", "eta": 0.7,
                        "window": {"size": 4, "start": 0, "slide_interval": 25, "wrap": True, "end_offset": 2}},
          prune={"timestep_fraction": 1.0, "exclude_last_step": False},
          optim={"minibatch": 4}),  # MixGRPO's script: 12 chains, a step every 3 -> 4 steps per rollout
    "MixGRPO: 16 chains, a window of 4 Flow-GRPO SDE steps (a = 0.7) from step 0 sliding one step every 25 "
    "iterations through 19 positions, cut before step 18 (sizes 3, 2, 1, then empty), ODE elsewhere; only the "
    "window is trained.",
)
_FLOW = _with(
    _DANCE,
    tree={"num_steps": 10, "roots": 24, "sde_form": "flow", "eta": 0.7},
    prune={"timestep_fraction": 1.0, "exclude_last_step": True},
    # Flow-GRPO's KL divides by 2 std_dev_t^2 = 2 sd^2 / |ds|; the reward sees the last step's x0_hat (on Wan's
    # schedule the last SDE step starts at s = 0.25 and leaves noise; Flow-GRPO's own schedule ends nearly clean).
    objective={"clip_eps": 1e-4, "kl_coef": 0.04, "kl_form": "flow_grpo"},
    credit={"std": "global"},  # config/grpo.py ships sample.global_std = True
    # Flow-GRPO accumulates over half of an epoch's samples: 2 optimizer steps per epoch (24 chains, 12 per step).
    optim={"minibatch": 12, "minibatch_by": "chain"},
)
register_preset(
    "flowgrpo", _FLOW,
    "Flow-GRPO: 24 chains of 10 Flow-GRPO SDE steps (a = 0.7), last step not trained, KL 0.04.",
)
register_preset(
    "flowgrpo_fast",
    _with(_FLOW, tree={"roots": 1, "branching": 24, "base_kind": "ode", "split_noise": "independent",
                       "random_split": {"enabled": True, "low": 0, "high": 4},
                       "window": {"size": 2, "slide_interval": 1, "stride": 0, "wrap": False}},
          prune={"exclude_last_step": False}),
    "Flow-GRPO-Fast: ODE to a step drawn per iteration in the first half, the group branches there (24 ways) and "
    "takes 2 SDE steps, then ODE; only the SDE steps are trained.",
)

# ------------------------------------------------------------------------------------------------ Expand-and-Prune
register_preset(
    "pro_grpo",
    _with(_FLOW, tree={"roots": 48, "survivors": [[5, 24], [7, 12]], "prune_rule": "ovf"},
          optim={"minibatch": 6}),  # Flow-GRPO's 2 steps per epoch over the 12 survivors
    "Pro-GRPO: Flow-GRPO's 10 SDE steps expanded to 48 chains, pruned by Optimal Variance Filtering of the "
    "rewards of one-step x0_hat previews to 24 before step 5 and 12 before step 7; advantages and training use the "
    "12 survivors (48x5 + 24x2 + 12x3 = 324 forward passes per prompt).",
)
register_preset(
    "branchgrpo_ovf",
    _with(_BRANCH, tree={"branching": 4, "survivors": [[3, 2], [6, 4], [9, 4]], "prune_rule": "ovf"}),
    "BranchGRPO with preview-OVF at the split points: 4 children per split, and before the splits at steps 3, 6 "
    "and 9 the frontier is cut to 2, 4 and 4 nodes by OVF of their x0_hat previews' rewards (16 leaves).",
)

# ------------------------------------------------------------------------------------------------ sample-level methods
# The whole generation is one action: rollouts are ODE chains (no SDE edge is trained) and the objective trains on the
# final samples through noised (t, eps) pairs (video_branch.phases, "samples").
_ODE_GROUP = _with(_DANCE, tree={"base_kind": "ode"}, prune={"timestep_fraction": 1.0, "exclude_last_step": False},
                   rollout={"reward_on": "final"},  # an ODE last step to s = 0 lands on x0_hat
                   optim={"minibatch": 0, "minibatch_by": "edge"})  # not compared with released code: one step
register_preset(
    "vgrpo",
    _with(_ODE_GROUP, objective={"name": "vgrpo", "clip_eps": 1e-4, "kl_coef": 0.0, "pairs": 4}),
    "V-GRPO: 16 ODE chains of 20 steps per prompt, each final sample one action; ELBO surrogate over 4 (t, eps) "
    "pairs shared by the group (stratified t, adaptive weights), ratio exp(L_old - L), clip 1e-4, advantages "
    "soft-clipped by 3 tanh(A/3).",
)
register_preset(
    "nft",
    _with(_ODE_GROUP, objective={"name": "nft", "kl_coef": 0.0, "pairs": 4, "nft_beta": 1.0, "ema_decay": 0.9}),
    "DiffusionNFT: 16 ODE chains of 20 steps per prompt; forward-process loss on the final samples over 4 shared "
    "(t, eps) pairs with implicit positive/negative policies (b = 1) around an EMA old policy (decay 0.9).",
)
