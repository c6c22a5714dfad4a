"""One typed configuration for a run.

Sources, later winning: the dataclass defaults, the method preset (``method: branchgrpo`` expands into tree, credit,
pruning and objective settings, see ``presets.py``), the YAML file, then ``--set key=value`` overrides. Every key is
checked before any work starts: unknown keys (with the closest known key suggested), wrong types and out-of-range
values raise :class:`ConfigError` naming the key and what is accepted. The resolved config round-trips through YAML.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml

from ..core.errors import CoreError
from ..core.ovf import get_prune_rule
from .errors import ConfigError
from .presets import get_preset
from .specs import tree_spec, update_schedule


def _f(default=dataclasses.MISSING, *, help: str = "", min=None, max=None, factory=None):  # noqa: A002
    meta = {"help": help, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------- sections
@dataclass
class LoraConfig:
    rank: int = _f(0, help="LoRA rank; 0 trains the full transformer", min=0)
    alpha: float = _f(16.0, help="LoRA alpha (scale = alpha / rank)", min=0.0)
    dropout: float = _f(0.0, help="LoRA dropout", min=0.0, max=1.0)
    target_modules: List[str] = _f(factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], help="modules to adapt")


@dataclass
class ModelConfig:
    path: str = _f("assets/toy_wan", help="local diffusers-format Wan directory")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", help="compute dtype of the transformer")
    attention_backend: Literal["native", "xformers", "flash"] = _f("native",
                                                                    help="native on CPU; xformers/flash need a GPU")
    gradient_checkpointing: bool = _f(False, help="activation checkpointing in the transformer blocks")
    max_sequence_length: int = _f(512, help="text tokens per prompt", min=1)
    text_pad_to: int = _f(0, help="cross-attend as if prompts were zero-padded to this many tokens (exact; "
                          "WanPipeline pads to 512) while encoding only max_sequence_length; 0 = off", min=0)
    lora: LoraConfig = _f(factory=LoraConfig)


@dataclass
class VideoConfig:
    num_frames: int = _f(9, help="frames per clip, 4k+1 (1 = image)", min=1)
    height: int = _f(32, help="pixels, multiple of 16", min=16)
    width: int = _f(32, help="pixels, multiple of 16", min=16)
    fps: int = _f(8, help="frames per second of written clips", min=1)


@dataclass
class WindowConfig:
    size: int = _f(0, help="SDE window length in steps; 0 = no window (every non-split step is tree.base_kind)", min=0)
    start: int = _f(0, help="first step of the window at iteration 0", min=0)
    slide_interval: int = _f(25, help="iterations between window moves", min=1)
    stride: int = _f(1, help="steps the window moves each time", min=0)
    wrap: bool = _f(True, help="wrap the window to `start` after the last step")
    end_offset: Optional[int] = _f(None, help="MixGRPO's schedule: steps from num_steps - end_offset on are never in "
                                   "the window; its start cycles through start .. num_steps - end_offset and it is "
                                   "cut there (it shrinks near the end, empty at the last position); None: the "
                                   "window keeps its size", min=0)


@dataclass
class RandomSplitConfig:
    enabled: bool = _f(False, help="branch at one step drawn per iteration (Flow-GRPO-Fast)")
    low: int = _f(0, help="lowest step that may be drawn", min=0)
    high: int = _f(0, help="highest step that may be drawn (inclusive)", min=0)


@dataclass
class TreeConfig:
    num_steps: int = _f(20, help="denoising steps of a rollout", min=1, max=1000)
    shift: float = _f(3.0, help="flow shift k of the sigma schedule", min=1e-6)
    roots: int = _f(1, help="initial noises per prompt (a sequential group of G chains is roots=G, no splits)", min=1)
    split_steps: List[int] = _f(factory=lambda: [0, 3, 6, 9], help="steps at which every live node branches")
    branching: int = _f(2, help="children per node at a split step (K)", min=1)
    split_noise: Literal["correlated", "independent"] = _f("correlated", help="sibling noise at split steps")
    correlation: float = _f(4.0, help="c of xi_b = (xi_0 + c z_b)/sqrt(1+c^2)", min=0.0)
    sde_form: Literal["dance", "flow"] = _f("dance", help="SDE step form")
    eta: float = _f(0.3, help="noise level (Dance eta, or Flow-GRPO a)", min=0.0)
    split_eta: Optional[float] = _f(None, help="noise level at split steps (default: eta)", min=0.0)
    base_kind: Literal["sde", "ode"] = _f("sde", help="kind of the steps outside splits and the SDE window")
    window: WindowConfig = _f(factory=WindowConfig)
    random_split: RandomSplitConfig = _f(factory=RandomSplitConfig)
    survivors: List[List[int]] = _f(
        factory=list,
        help="Expand-and-Prune checkpoints: [step, count] pairs; before `step` each tree keeps `count` live nodes "
             "chosen by tree.prune_rule from one-step x0_hat previews (e.g. [[5, 24], [7, 12]])")
    prune_rule: str = _f("ovf", help="registered preview prune rule (video_branch.core.ovf): ovf, top")


@dataclass
class RolloutConfig:
    guidance_scale: float = _f(1.0, help="classifier-free guidance; 1 disables CFG", min=0.0)
    negative_prompt: str = _f("", help="prompt of the unconditional branch of CFG")
    frontier_batch: int = _f(64, help="max nodes per transformer call during rollout (CFG doubles it)", min=1)
    store_on_cpu: bool = _f(True, help="keep stored latents on the CPU")
    gathered_weights: bool = _f(True, help="roll out on a full copy of the weights gathered once per iteration "
                                "(fast; costs one unpartitioned copy) instead of through ZeRO-3's per-layer hooks")
    decode_batch: int = _f(16, help="clips per VAE decode call", min=1)
    reward_on: Literal["final", "x0_hat"] = _f("final", help="decode the final latent or the last step's x0_hat")


@dataclass
class CreditConfig:
    fusion: Literal["mean", "path", "path_leaves"] = _f(
        "mean", help="reward fusion up the tree: mean over the leaves below; path: at each split a softmax over the "
        "children by their split-edge log-probs, nested (BranchGRPO's released form); path_leaves: one softmax over "
        "all leaves below by the summed path log-prob")
    beta: float = _f(1.0, help="temperature of path-weighted fusion (0 = mean)", min=0.0)
    adv_clip: float = _f(5.0, help="clip advantages to [-adv_clip, adv_clip]", min=0.0)
    aggregate: Literal["sum_then_norm", "norm_then_sum"] = _f("sum_then_norm", help="multi-reward aggregation")
    std: Literal["group", "global"] = _f("group", help="what advantages divide by: group (the std of each tree's "
                                         "depth) or global (the std, ddof 0, of every reward of the batch over all "
                                         "ranks, plus 1e-4: Flow-GRPO's global_std)")


@dataclass
class PruneConfig:
    width: Literal["none", "parent_top1", "extreme_b", "released_branch", "released_pool"] = _f(
        "none", help="width pruning after the last split: parent_top1 (the better child of each last-split parent "
        "keeps its chain), extreme_b, or BranchGRPO's released modes 1 (released_branch: per chain, the first "
        "width_ratio of its edges) and 2 (released_pool: the best and worst width_ratio of the pooled edges)")
    width_ratio: float = _f(0.5, help="released_branch/released_pool: share of the post-split edges kept",
                            min=0.0, max=1.0)
    width_b: int = _f(1, help="extreme_b: best and worst chains kept", min=1)
    depth_window: int = _f(0, help="depth pruning: depths dropped from backprop (0 = off)", min=0)
    depth_start: Optional[int] = _f(None, help="first pruned depth at iteration 0 (default: after the last split)",
                                    min=0)
    depth_slide_interval: int = _f(30, help="iterations between window moves", min=1)
    depth_direction: Literal["later", "earlier"] = _f("later", help="direction the depth window slides")
    depth_stop: Optional[int] = _f(None, help="depth at which the window stops sliding", min=0)
    timestep_fraction: float = _f(1.0, help="fraction of SDE steps trained per root", min=0.0, max=1.0)
    exclude_last_step: bool = _f(False, help="never train the last denoising step")
    best_of_n: int = _f(0, help="train only the top n/2 and bottom n/2 chains by advantage (0 = off)", min=0)


@dataclass
class ObjectiveConfig:
    name: str = _f("clipped", help="registered objective")
    clip_eps: float = _f(1e-3, help="ratio clip range", min=0.0)
    kl_coef: float = _f(0.0, help="KL to the frozen reference", min=0.0)
    kl_reference: Literal["disabled_adapter", "copy"] = _f(
        "disabled_adapter", help="the KL reference of a LoRA policy: disabled_adapter (the policy's own ZeRO-3 module "
        "with its adapter off: no extra memory, one more pass through the partitioned module) or copy (a frozen copy "
        "of the base transformer outside ZeRO-3: one more transformer in memory, a plain forward). A fully "
        "fine-tuned policy always uses a copy")
    kl_form: Literal["transition", "flow_grpo"] = _f(
        "transition", help="what the KL's ||mu - mu_ref||^2 is divided by: transition (2 sd^2, the transition "
        "variance) or flow_grpo (2 std_dev_t^2 = 2 sd^2 / |ds|, Flow-GRPO's released scaling)")
    ratio_norm: bool = _f(False, help="GRPO-Guard ratio normalisation")
    logprob_reduce: Literal["mean", "sum"] = _f("mean", help="reduction of the transition log-prob over elements")
    pairs: int = _f(4, help="sample-level objectives (vgrpo, nft): (t, eps) pairs per final sample, shared by the "
                    "samples of a prompt, t stratified over [0, 1)", min=1)
    nft_beta: float = _f(1.0, help="nft: b of the implicit policies v+ = b v + (1-b) v_old, v- = (1+b) v_old - b v",
                         min=0.0)
    ema_decay: float = _f(0.9, help="nft: decay of the old policy, an EMA of the trained weights updated after each "
                          "optimizer step", min=0.0, max=1.0)


@dataclass
class RewardConfig:
    components: Dict[str, Dict[str, Any]] = _f(
        factory=lambda: {"toyworld": {"weight": 1.0}},
        help="reward name -> {weight, options...}",
    )
    retries: int = _f(1, help="retries of a reward call that raised", min=0)


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, help="AdamW learning rate", min=0.0)
    weight_decay: float = _f(1e-4, help="AdamW weight decay", min=0.0)
    betas: List[float] = _f(factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = _f(1e-8, help="AdamW epsilon", min=0.0)
    grad_clip: float = _f(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    updates_per_iteration: int = _f(1, help="passes over the rollout's trained units; each pass reshuffles them and "
                                    "takes one optimizer step per mini-batch (optim.minibatch)", min=1)
    minibatch: int = _f(0, help="trained units per optimizer step: edges, or chains with optim.minibatch_by=chain "
                        "(samples for sample objectives); the units are shuffled and cut into full mini-batches of "
                        "this size plus the remainder, each followed by a step; 0 = one step per rollout", min=0)
    minibatch_by: Literal["edge", "chain"] = _f("edge", help="edge: shuffle single trained edges (BranchGRPO); chain: "
                                                 "shuffle whole chains, every edge of a chain in one mini-batch "
                                                 "(DanceGRPO, Flow-GRPO)")
    micro_batch: int = _f(8, help="trained edges per backward micro-batch", min=1)
    warmup_iterations: int = _f(0, help="linear learning-rate warm-up over the optimizer steps of this many iterations",
                                min=0)
    lr_decay: Literal["constant", "linear", "cosine"] = _f(
        "constant", help="learning rate after the warm-up: constant, or a linear or cosine decay over the optimizer "
        "steps of the remaining train.iterations down to optim.lr_final_ratio x optim.lr")
    lr_final_ratio: float = _f(0.0, help="the decay's end point, as a fraction of optim.lr", min=0.0, max=1.0)


@dataclass
class ParallelConfig:
    sp_size: int = _f(1, help="sequence-parallel degree (ranks per SP group)", min=1)
    zero_stage: int = _f(3, help="DeepSpeed ZeRO stage", min=0, max=3)
    ds_config: str = _f("configs/ds/zero3_cpu.json", help="DeepSpeed JSON config")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", help="process-group backend (auto: nccl on GPU, gloo on CPU)")
    cpu_shm_allreduce: bool = _f(False, help="DeepSpeed's shared-memory CPU all-reduce "
                                             "(JIT-compiles a C++ op on first use)")


@dataclass
class TrainConfig:
    iterations: int = _f(100, help="RL iterations", min=0)
    seed: int = _f(0, help="global seed")
    run_dir: str = _f("runs/default", help="run directory")
    prompt_file: str = _f("assets/prompts/train.txt", help="training prompts, one per line")
    prompts_per_rank: int = _f(1, help="prompts (trees) per data-parallel member per iteration", min=1)
    dump_trees: bool = _f(False, help="write trees/iter_NNNNNN.npz per iteration and rank")
    resume: str = _f("auto", help="auto (latest checkpoint if any), never, or a checkpoint path")
    checkpoint_every: int = _f(10, help="iterations between checkpoints (0 = only at the end)", min=0)
    keep_checkpoints: int = _f(2, help="checkpoints kept on disk", min=1)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="device")
    cpu_threads: int = _f(0, help="torch threads per rank on CPU (0 = cores / ranks on this node)", min=0)
    max_invalid_iterations: int = _f(3, help="stop after this many iterations in a row in which no leaf on any rank "
                                     "has a valid reward (0 = never stop)", min=0)


@dataclass
class EvalConfig:
    prompt_file: str = _f("assets/prompts/heldout.txt", help="held-out prompts")
    every: int = _f(0, help="iterations between held-out evaluations (0 = before and after only)", min=0)
    num_prompts: int = _f(0, help="held-out prompts used (0 = all)", min=0)
    clips_per_prompt: int = _f(2, help="seeds per prompt", min=1)
    num_steps: int = _f(20, help="ODE steps of evaluation sampling", min=1)
    guidance_scale: float = _f(1.0, help="CFG of evaluation sampling", min=0.0)
    seed: int = _f(1234, help="seed of evaluation noise")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, help="write TensorBoard events")
    progress: bool = _f(True, help="progress bar on rank 0")
    plot_every: int = _f(1, help="iterations between reward_curve.png updates (0 = end only)", min=0)


@dataclass
class Config:
    method: str = _f("branchgrpo", help="method preset (see video_branch.config.presets)")
    model: ModelConfig = _f(factory=ModelConfig)
    video: VideoConfig = _f(factory=VideoConfig)
    tree: TreeConfig = _f(factory=TreeConfig)
    rollout: RolloutConfig = _f(factory=RolloutConfig)
    credit: CreditConfig = _f(factory=CreditConfig)
    prune: PruneConfig = _f(factory=PruneConfig)
    objective: ObjectiveConfig = _f(factory=ObjectiveConfig)
    reward: RewardConfig = _f(factory=RewardConfig)
    optim: OptimConfig = _f(factory=OptimConfig)
    parallel: ParallelConfig = _f(factory=ParallelConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    logging: LoggingConfig = _f(factory=LoggingConfig)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# ------------------------------------------------------------------------------------------------------------ helpers
def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def known_keys(cls=Config, prefix: str = "") -> List[str]:
    """All dotted keys of the schema (leaves and sections)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if _is_dataclass_type(hints[f.name]):
            keys.extend(known_keys(hints[f.name], key + "."))
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    candidates = known_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        # Compare within the same section too, so `optim.lr_rate` finds `optim.lr` even when short.
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        same = [c for c in candidates if c.startswith(section) and c.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, same, n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the canonical Python type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (list, List):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key_error(f"{prefix}{k}")
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if _is_dataclass_type(tp):
            sub = data.get(name, {})
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {sub!r}")
            kwargs[name] = _build(tp, sub, key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(key, data[name], tp)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{key}': {v!r} is not a finite number")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if lo is not None and v < lo or hi is not None and v > hi:
                    rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                    raise ConfigError(f"config key '{key}': {v!r} is out of range; accepted {rng}")
        kwargs[name] = value
    return cls(**kwargs)


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "components":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)``; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {e}") from None
    return key, value


def _check_override_key(key: str) -> None:
    keys = set(known_keys())
    if key in keys:
        return
    # Keys below a free-form mapping (reward.components.<name>...) are accepted as they are.
    if key.startswith("reward.components."):
        return
    raise _unknown_key_error(key)


# ----------------------------------------------------------------------------------------------------------- loading
def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                method: Optional[str] = None) -> Config:
    """Resolve defaults <- preset <- YAML file <- overrides, and validate."""
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    parsed = [parse_override(o) for o in overrides]
    for key, _ in parsed:
        _check_override_key(key)
    for key, value in parsed:
        _set_dotted(data, key, value)
    if method is not None:
        data["method"] = method
    name = data.get("method", Config.method)
    if not isinstance(name, str):
        raise ConfigError(f"config key 'method': expected a preset name, got {name!r}")
    merged = _deep_merge(get_preset(name), data)
    merged["method"] = name
    cfg = _build(Config, merged)
    validate(cfg)
    return cfg


def config_from_dict(data: Dict[str, Any]) -> Config:
    """Build from a complete (resolved) mapping, without applying a preset."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that a single annotation cannot express."""
    get_preset(cfg.method)
    n = cfg.tree.num_steps
    for s in cfg.tree.split_steps:
        if not 0 <= s < n:
            raise ConfigError(f"config key 'tree.split_steps': step {s} is outside [0, {n - 1}] (tree.num_steps={n})")
    if sorted(set(cfg.tree.split_steps)) != list(cfg.tree.split_steps):
        raise ConfigError(f"config key 'tree.split_steps': expected strictly increasing steps, "
                          f"got {cfg.tree.split_steps}")
    if cfg.tree.random_split.enabled and not 0 <= cfg.tree.random_split.low <= cfg.tree.random_split.high < n:
        raise ConfigError(
            f"config keys 'tree.random_split.low/high': expected 0 <= low <= high < {n}, "
            f"got {cfg.tree.random_split.low}, {cfg.tree.random_split.high}"
        )
    try:
        get_prune_rule(cfg.tree.prune_rule)
    except CoreError as e:
        raise ConfigError(f"config key 'tree.prune_rule': {e}") from None
    if cfg.tree.survivors:
        _validate_survivors(cfg)
    if cfg.tree.window.size > n:
        raise ConfigError(f"config key 'tree.window.size': {cfg.tree.window.size} exceeds tree.num_steps={n}")
    f = cfg.video.num_frames
    if (f - 1) % 4 != 0:
        raise ConfigError(f"config key 'video.num_frames': expected 4k+1 frames (1, 5, 9, ..., 81), got {f}")
    for k in ("height", "width"):
        if getattr(cfg.video, k) % 16:
            raise ConfigError(f"config key 'video.{k}': expected a multiple of 16, got {getattr(cfg.video, k)}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas': expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.train.resume not in ("auto", "never") and not cfg.train.resume:
        raise ConfigError("config key 'train.resume': expected 'auto', 'never' or a checkpoint path")
    if not cfg.reward.components:
        raise ConfigError("config key 'reward.components': at least one reward is required")
    for name, opts in cfg.reward.components.items():
        if not isinstance(opts, dict):
            raise ConfigError(f"config key 'reward.components.{name}': expected a mapping with 'weight', got {opts!r}")
        if "weight" not in opts:
            raise ConfigError(f"config key 'reward.components.{name}.weight' is missing: every reward needs a weight "
                              f"(e.g. {{{name}: {{weight: 1.0}}}})")
        w = opts["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"config key 'reward.components.{name}.weight': expected a finite number, got {w!r}")
    tree_spec(cfg, 0)  # the core's own checks of the trees (window fit, step kinds), naming the config key
    update_schedule(cfg, 0)  # chain mini-batches need chains of equal trained-edge counts


def _validate_survivors(cfg: Config) -> None:
    if any(len(p) != 2 for p in cfg.tree.survivors):
        raise ConfigError(f"config key 'tree.survivors': expected [step, count] pairs, got {cfg.tree.survivors}")
    p = cfg.prune
    if p.width != "none" or p.best_of_n or p.timestep_fraction < 1.0:
        raise ConfigError("config key 'tree.survivors': Expand-and-Prune trains the survivors' edges; it cannot be "
                          "combined with prune.width, prune.best_of_n or prune.timestep_fraction < 1 (got "
                          f"{p.width!r}, {p.best_of_n}, {p.timestep_fraction})")
    tree_spec(cfg, 0)


def add_config_args(parser: argparse.ArgumentParser, require_config: bool = False) -> None:
    parser.add_argument("--config", required=require_config, help="YAML run config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set optim.lr=1e-4",
    )


def config_from_args(args: argparse.Namespace, method: Optional[str] = None) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []) or [], method=method)
