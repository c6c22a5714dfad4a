"""Per-GPU memory of a training run, predicted before any GPU time is spent (the arithmetic of ``video_branch.plan``).

Every term is bytes on one GPU:

- **weights**: parameters, gradients and AdamW state of the policy under ZeRO stage 0-3. In bf16/fp16 a trainable
  parameter costs 2 (weight) + 2 (gradient) + 4 (the fp32 gradient of the partition, made for the step) + 12 (fp32
  master and the two moments, the ZeRO paper's K = 12) = 20 bytes; in float32, 4 + 4 + 8; a frozen one (the base
  model under LoRA) only its weight. Stage 3 partitions all of it over the world, stage 2 the gradients and the
  optimizer state, stage 1 the optimizer state. ZeRO-3's working set adds the gathered parameters of the module
  running and the one prefetched, and the gradient reduce buckets.
- **rollout copy** (``rollout.gathered_weights``): one unpartitioned copy of the policy.
- **reference**: a frozen full copy for the KL term (none under LoRA: the disabled adapter is the reference), and
  the full copies an objective keeps (DiffusionNFT's EMA).
- **frozen models on the GPU**: the text encoder (UMT5-XXL encoder, in the model dtype), the VAE (float32), the
  reward models' weights.
- **activations per training micro-batch** (``optim.micro_batch`` edges, doubled by CFG, ``S / sp_size`` video
  tokens per rank): measured per-sample coefficients (bytes per video token, per text token and per sample of one
  block, of the first block, and of everything outside the blocks; with checkpointing, the block inputs the
  checkpoints hold) times the depth. The backward pass adds one block's saved set (checkpointing: two, the
  recomputed block and its backward's gradients) on top of what is held.
- **rollout activations**: a no-grad forward of ``rollout.frontier_batch`` nodes (doubled by CFG).
- **VAE decode** of ``rollout.decode_batch`` clips, and the reward models' inference.

Peak = persistent terms + the largest phase. Attention: flash-attention and PyTorch SDPA's flash / memory-efficient
kernels save the output and the log-sum-exp (O(S)); that is what the calibration counts (on CPU, SDPA's flash
kernel). The math kernel materialises B x heads x S^2 scores and is not modelled: the planner refuses it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

GiB = 2**30
MiB = 2**20
HEADROOM = 0.92  # fraction of the GPU the planner fills: CUDA context, NCCL buffers and fragmentation take the rest

# Parameters of the frozen models kept on every GPU (exact counts from the released configs).
UMT5_XXL_ENCODER_PARAMS = 5_680_910_336
WAN_VAE_PARAMS = 126_892_531
# Reward models: weights (parameters x bytes) and an inference working set that is stated, not measured.
REWARD_MODELS = {
    "videoalign": {"params": 2_208_985_600, "bytes": 2, "work": 1.0 * GiB},  # Qwen2-VL-2B + head, bf16
    "hps": {"params": 986_109_440, "bytes": 2, "work": 0.25 * GiB},  # CLIP ViT-H/14
    "pickscore": {"params": 986_109_440, "bytes": 2, "work": 0.25 * GiB},
    "clip_score": {"params": 427_616_513, "bytes": 2, "work": 0.25 * GiB},  # CLIP ViT-L/14
    "temporal_consistency": {"params": 0, "bytes": 0, "work": 0},
    "toyworld": {"params": 0, "bytes": 0, "work": 0},
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION_KERNELS = ("flash", "native", "xformers")  # all save O(S) per head: the calibrated case

# Measured on this project's CPU machines (torch 2.13.0+cpu) by
#   python tools/bench_memory.py --calibrate 1.3b,14b --threads 2 --out runs/bench/calibration.json
# Bytes per sample: [per video token, per text token, constant] of (Wan 2.1 size -> dtype -> full / lora (rank 64 on
# to_q, to_k, to_v, to_out.0)): "block" (one block after the first), "first_block", "outer" (outside the blocks),
# and with gradient checkpointing "held" / "first_held" (block inputs the checkpoints keep) and "outer_ckpt";
# "inference" is the allocator peak of a no-grad forward of 2 blocks; "vae" the decode's peak per clip,
# [per frame-pixel, per pixel, constant].
MEASURED = {'1.3b': {'bfloat16': {'full': {'outer': [15752.0, 14336.0, 25600.0],
                                'first_block': [141444.0, 21508.0, 49152.0],
                                'block': [140420.0, 18436.0, 49152.0],
                                'outer_ckpt': [15752.0, 14336.0, 25600.0],
                                'first_held': [4096.0, 3072.0, 18432.0],
                                'held': [3072.0, -0.0, 0.0]},
                       'lora': {'outer': [6408.0, -0.0, 6144.0],
                                'first_block': [106620.0, 25092.0, 43008.0],
                                'block': [111748.0, 25092.0, 49152.0],
                                'outer_ckpt': [6408.0, -0.0, 6144.0],
                                'first_held': [4096.0, 3072.0, 18432.0],
                                'held': [3072.0, -0.0, 0.0]}},
          'float32': {'full': {'outer': [19208.0, 28672.0, 31744.0],
                               'first_block': [208004.0, 30724.0, 49152.0],
                               'block': [206980.0, 24580.0, 49152.0],
                               'outer_ckpt': [19208.0, 28672.0, 31744.0],
                               'first_held': [7168.0, 6144.0, 36864.0],
                               'held': [6144.0, -0.0, -0.0]},
                      'lora': {'outer': [6664.0, -0.0, 6144.0],
                               'first_block': [118396.0, 25092.0, 43008.0],
                               'block': [123524.0, 18948.0, 49152.0],
                               'outer_ckpt': [6664.0, -0.0, 6144.0],
                               'first_held': [7168.0, 6144.0, 36864.0],
                               'held': [6144.0, -0.0, 0.0]}},
          'inference': {'bfloat16': [43346.7, 14682.7, 337024.0], 'float32': [97280.0, 6144.0, 79872.0]}},
 '14b': {'bfloat16': {'full': {'outer': [51592.0, 28672.0, 82944.0],
                               'first_block': [404836.0, 71684.0, 163840.0],
                               'block': [403812.0, 61444.0, 163840.0],
                               'outer_ckpt': [51592.0, 28672.0, 82944.0],
                               'first_held': [11264.0, 10240.0, 61440.0],
                               'held': [10240.0, -0.0, 0.0]},
                      'lora': {'outer': [20744.0, -0.0, 20480.0],
                               'first_block': [317276.0, 82436.0, 143360.0],
                               'block': [336740.0, 82436.0, 163840.0],
                               'outer_ckpt': [20744.0, -0.0, 20480.0],
                               'first_held': [11264.0, 10240.0, 61440.0],
                               'held': [10240.0, -0.0, 0.0]}},
         'float32': {'full': {'outer': [62216.0, 57344.0, 103424.0],
                              'first_block': [562532.0, 102404.0, 163840.0],
                              'block': [561508.0, 81924.0, 163840.0],
                              'outer_ckpt': [62216.0, 57344.0, 103424.0],
                              'first_held': [21504.0, 20480.0, 122880.0],
                              'held': [20480.0, -0.0, 0.0]},
                     'lora': {'outer': [21000.0, -0.0, 20480.0],
                              'first_block': [324444.0, 82436.0, 143360.0],
                              'block': [343908.0, 61956.0, 163840.0],
                              'outer_ckpt': [21000.0, -0.0, 20480.0],
                              'first_held': [21504.0, 20480.0, 122880.0],
                              'held': [20480.0, -0.0, 0.0]}},
         'inference': {'bfloat16': [129030.7, 61442.7, 931904.0], 'float32': [174418.7, 58714.7, 1183872.0]}},
 'vae': [312.5, 16791.5, 402560.0]}


class PlanError(ValueError):
    """A setting the planner cannot predict (unknown model, uncalibrated dtype, bad value)."""


@dataclass(frozen=True)
class Architecture:
    """The transformer's shape (WanTransformer3DModel arguments) and its exact parameter counts."""

    name: str
    num_layers: int
    dim: int
    ffn: int
    heads: int
    text_dim: int
    params: int
    block_params: int
    largest_module_params: int  # the biggest module ZeRO-3 gathers at once (a block or the condition embedder)

    @classmethod
    def from_transformer_config(cls, name: str, tc: dict) -> "Architecture":
        dim = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
        ffn, text_dim, layers = int(tc["ffn_dim"]), int(tc["text_dim"]), int(tc["num_layers"])
        freq, cin = int(tc.get("freq_dim", 256)), int(tc.get("in_channels", 16))
        cout = int(tc.get("out_channels", cin))
        patch = math.prod(tc.get("patch_size", (1, 2, 2)))
        # One block: self- and cross-attention (q, k, v, out with biases; q/k RMSNorm weights), the cross-attention
        # LayerNorm, the feed-forward and the 6 x dim modulation table.
        block = 2 * (4 * (dim * dim + dim) + 2 * dim) + 2 * dim + (dim * ffn + ffn) + (ffn * dim + dim) + 6 * dim
        embedder = (freq * dim + dim) + (dim * dim + dim) + (dim * 6 * dim + 6 * dim) + (text_dim * dim + dim) + (
            dim * dim + dim)
        outer = (cin * patch * dim + dim) + embedder + (dim * cout * patch + cout * patch) + 2 * dim
        return cls(name, layers, dim, ffn, int(tc["num_attention_heads"]), text_dim, layers * block + outer, block,
                   max(block, embedder))

    def with_layers(self, n: int) -> "Architecture":
        return replace(self, num_layers=n, params=self.params - (self.num_layers - n) * self.block_params)


def lora_params(arch: Architecture, rank: int, targets) -> int:
    """Adapter parameters of rank ``rank`` on the attention projections named in ``targets`` (both attentions)."""
    per = {"to_q": 2 * arch.dim, "to_k": 2 * arch.dim, "to_v": 2 * arch.dim, "to_out.0": 2 * arch.dim,
           "ffn.net.0.proj": arch.dim + arch.ffn, "ffn.net.2": arch.ffn + arch.dim}
    unknown = [t for t in targets if t not in per]
    if unknown:
        raise PlanError(f"model.lora.target_modules: the planner knows {sorted(per)}, not {unknown}")
    attn = {"to_q", "to_k", "to_v", "to_out.0"}
    total = sum(per[t] * (2 if t in attn else 1) for t in targets)
    return rank * total * arch.num_layers


@dataclass
class Setting:
    """What the memory of a run depends on (``video_branch.plan`` reads it from a config)."""

    arch: Architecture
    gpus: int
    dtype: str = "bfloat16"
    lora_rank: int = 0
    lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing: bool = True
    num_frames: int = 33
    height: int = 480
    width: int = 832
    micro_batch: int = 1
    cfg: bool = True
    text_tokens: int = 512
    sp_size: int = 1
    zero_stage: int = 3
    gathered_weights: bool = False
    frontier_batch: int = 8
    decode_batch: int = 2
    store_on_cpu: bool = True
    nodes_per_prompt: int = 219
    prompts_per_rank: int = 1
    kl_reference: bool = False
    reference_copy: bool = False  # a LoRA policy's KL reference is a frozen copy (objective.kl_reference=copy)
    full_copies: int = 0
    rewards: Tuple[str, ...] = ()
    attention: str = "flash"
    prefetch_params: int = 50_000_000
    reduce_bucket: int = 50_000_000

    def tokens(self) -> int:
        """Video tokens of one sample: latent frames x (H / 16) x (W / 16) (VAE 4x8x8, patch 1x2x2)."""
        return (1 + (self.num_frames - 1) // 4) * (self.height // 16) * (self.width // 16)

    def latent_numel(self) -> int:
        return 16 * (1 + (self.num_frames - 1) // 4) * (self.height // 8) * (self.width // 8)


def load_calibration(path: Optional[Path] = None) -> dict:
    """The shipped measurement, or the coefficients a ``tools/bench_memory.py --calibrate`` run wrote to ``path``."""
    if path is None:
        return copy.deepcopy(MEASURED)
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"calibration file {path} does not exist (write it with "
                        "`python tools/bench_memory.py --calibrate 1.3b,14b --out FILE`)")
    try:
        data = json.loads(path.read_text())
        return data["coefficients"] if "coefficients" in data else data
    except (ValueError, KeyError) as err:
        raise PlanError(f"calibration file {path}: not a calibration written by tools/bench_memory.py ({err})")


def _coeffs(calibration: dict, s: Setting) -> dict:
    by_arch = calibration.get(s.arch.name)
    if by_arch is None:
        raise PlanError(f"model: no activation calibration for {s.arch.name!r}; calibrated: {sorted(calibration)}")
    dtype = "bfloat16" if s.dtype == "float16" else s.dtype
    if dtype not in by_arch:
        raise PlanError(f"model.dtype: {s.dtype!r} is not calibrated for {s.arch.name}; calibrated: {sorted(by_arch)}")
    return by_arch[dtype]["lora" if s.lora_rank else "full"]


def _per_sample(c: List[float], tokens: float, text: float) -> float:
    return c[0] * tokens + c[1] * text + c[2]


def training_activations(s: Setting, calibration: dict) -> Dict[str, float]:
    """Saved (forward -> backward) and peak activation bytes of one training micro-batch on one rank."""
    c = _coeffs(calibration, s)
    batch = s.micro_batch * (2 if s.cfg else 1)
    tokens = math.ceil(s.tokens() / s.sp_size)
    n, text = s.arch.num_layers, s.text_tokens
    block = _per_sample(c["block"], tokens, text)
    if s.gradient_checkpointing:
        saved = _per_sample(c["outer_ckpt"], tokens, text) + _per_sample(c["first_held"], tokens, text) + (
            n - 1) * _per_sample(c["held"], tokens, text)
        peak = saved + 2 * block
    else:
        saved = _per_sample(c["outer"], tokens, text) + _per_sample(c["first_block"], tokens, text) + (
            n - 1) * block
        peak = saved + block
    return {"saved": batch * saved, "peak": batch * peak, "batch": batch, "tokens_per_rank": tokens}


def rollout_activations(s: Setting, calibration: dict) -> float:
    """Transient bytes of a no-grad forward over ``frontier_batch`` nodes (CFG doubles the batch)."""
    c = calibration.get(s.arch.name, {}).get("inference", {}).get("bfloat16" if s.dtype != "float32" else "float32")
    if c is None:
        raise PlanError(f"model: no rollout calibration for {s.arch.name!r} in {s.dtype}")
    batch = s.frontier_batch * (2 if s.cfg else 1)
    return batch * _per_sample(c, math.ceil(s.tokens() / s.sp_size), s.text_tokens)


def vae_decode(s: Setting, calibration: dict) -> float:
    """Peak bytes of decoding ``decode_batch`` clips (float32 VAE, one latent frame at a time)."""
    c = calibration.get("vae")
    if c is None:
        raise PlanError("calibration has no 'vae' entry (run tools/bench_memory.py --calibrate)")
    pixels = s.height * s.width
    return s.decode_batch * (c[0] * s.num_frames * pixels + c[1] * pixels + c[2])


@dataclass
class Plan:
    setting: Setting
    terms: Dict[str, float] = field(default_factory=dict)
    phases: Dict[str, float] = field(default_factory=dict)
    activations: Dict[str, float] = field(default_factory=dict)
    gpu_memory: float = 80 * GiB

    @property
    def persistent(self) -> float:
        return sum(self.terms.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> float:
        return self.persistent + max(self.phases.values())

    @property
    def budget(self) -> float:
        return HEADROOM * self.gpu_memory

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        s = self.setting
        return {"model": s.arch.name, "gpus": s.gpus, "gpu_memory_gib": self.gpu_memory / GiB,
                "budget_gib": self.budget / GiB, "fits": self.fits, "peak_gib": self.peak / GiB,
                "peak_phase": self.peak_phase, "persistent_gib": {k: v / GiB for k, v in self.terms.items()},
                "phase_gib": {k: v / GiB for k, v in self.phases.items()},
                "training_micro_batch": {k: (v / GiB if k in ("saved", "peak") else v)
                                         for k, v in self.activations.items()},
                "setting": {k: v for k, v in s.__dict__.items() if k != "arch"}}


def check(s: Setting) -> None:
    if s.gpus < 1:
        raise PlanError(f"--gpus: expected a positive GPU count, got {s.gpus}")
    if s.sp_size < 1 or s.gpus % s.sp_size or s.arch.heads % s.sp_size:
        raise PlanError(f"parallel.sp_size: {s.sp_size} must divide both the GPU count ({s.gpus}) and the heads "
                        f"({s.arch.heads})")
    if s.dtype not in DTYPE_BYTES:
        raise PlanError(f"model.dtype: expected one of {sorted(DTYPE_BYTES)}, got {s.dtype!r}")
    if s.attention not in ATTENTION_KERNELS:
        raise PlanError(f"model.attention_backend: the planner models {ATTENTION_KERNELS}, got {s.attention!r}")
    unknown = [r for r in s.rewards if r not in REWARD_MODELS]
    if unknown:
        raise PlanError(f"reward.components: no memory figures for {unknown}; known: {sorted(REWARD_MODELS)}")


def plan(s: Setting, gpu_memory: float, calibration: dict) -> Plan:
    """Predict per-GPU memory of setting ``s`` on GPUs of ``gpu_memory`` bytes."""
    check(s)
    p = DTYPE_BYTES[s.dtype]
    world = s.gpus
    total = s.arch.params
    lora = lora_params(s.arch, s.lora_rank, s.lora_targets) if s.lora_rank else 0
    trainable = lora if s.lora_rank else total
    frozen = total if s.lora_rank else 0
    mixed = p < 4
    param_b = p * (trainable + frozen)
    grad_b = (p + 4 if mixed else 4) * trainable  # reduced in the compute dtype, kept in fp32 for the step
    optim_b = (4 + 8 if mixed else 8) * trainable  # fp32 master + AdamW moments
    st = s.zero_stage
    terms = {
        "parameters": param_b / world if st >= 3 else param_b,
        "gradients": grad_b / world if st >= 2 else grad_b,
        "optimizer": optim_b / world if st >= 1 else optim_b,
    }
    terms["rollout_copy"] = p * (total + lora) if s.gathered_weights else 0.0
    terms["reference"] = p * total * (int(s.kl_reference and (not s.lora_rank or s.reference_copy)) + s.full_copies)
    terms["text_encoder"] = p * UMT5_XXL_ENCODER_PARAMS
    terms["vae"] = 4 * WAN_VAE_PARAMS
    reward_names = sorted(set(s.rewards))
    terms["reward_models"] = float(sum(REWARD_MODELS[r]["params"] * REWARD_MODELS[r]["bytes"] for r in reward_names))
    terms["stored_latents"] = 0.0 if s.store_on_cpu else 4.0 * s.latent_numel() * s.nodes_per_prompt * (
        s.prompts_per_rank)
    zero_ws = 2 * p * max(s.arch.largest_module_params, s.prefetch_params) if st >= 3 else 0.0
    buckets = 2 * p * s.reduce_bucket if st >= 2 else 0.0
    act = training_activations(s, calibration)
    phases = {
        "rollout": rollout_activations(s, calibration) + (0.0 if s.gathered_weights else zero_ws),
        "decode": vae_decode(s, calibration),
        "reward": max([REWARD_MODELS[r]["work"] for r in reward_names] or [0.0]),
        "train": act["peak"] + zero_ws + buckets,
    }
    return Plan(s, terms, phases, act, gpu_memory)


def _frames_below(frames: int) -> List[int]:
    return [f for f in (65, 49, 33, 25, 17, 9, 5) if f < frames]


RESOLUTIONS = ((720, 1280), (480, 832), (448, 768), (384, 672), (320, 576), (256, 448))


def suggestions(s: Setting, gpu_memory: float, calibration: dict) -> List[dict]:
    """Single changes, and the cheapest combination, that make ``s`` fit (each with its predicted peak)."""
    def trial(name, **changes):
        t = replace(s, **changes)
        try:
            pl = plan(t, gpu_memory, calibration)
        except PlanError:
            return None
        return {"change": name, "set": changes, "peak_gib": pl.peak / GiB, "fits": pl.fits}

    out = []
    for sp in (d for d in range(s.sp_size + 1, s.gpus + 1) if s.gpus % d == 0 and s.arch.heads % d == 0):
        out.append(trial(f"parallel.sp_size={sp}", sp_size=sp))
    if not s.gradient_checkpointing:
        out.append(trial("model.gradient_checkpointing=true", gradient_checkpointing=True))
    if s.micro_batch > 1:
        out.append(trial("optim.micro_batch=1", micro_batch=1))
    if not s.lora_rank:
        out.append(trial("model.lora.rank=64", lora_rank=64))
    if s.gathered_weights:
        out.append(trial("rollout.gathered_weights=false", gathered_weights=False))
    if s.frontier_batch > 1:
        out.append(trial("rollout.frontier_batch=1", frontier_batch=1))
    if s.decode_batch > 1:
        out.append(trial("rollout.decode_batch=1", decode_batch=1))
    for f in _frames_below(s.num_frames):
        out.append(trial(f"video.num_frames={f}", num_frames=f))
    for h, w in RESOLUTIONS:
        if h * w < s.height * s.width:
            out.append(trial(f"video.height={h} video.width={w}", height=h, width=w))
    out = [o for o in out if o is not None]
    # Greedy combination in order of cost to the run: parallelism and checkpointing first, then LoRA, then the clip.
    # A later value of the same key replaces an earlier one (sp_size 2 then 4 means sp_size 4).
    combo, steps = s, {}
    for o in out:
        if plan(combo, gpu_memory, calibration).fits:
            break
        nxt = replace(combo, **o["set"])
        if plan(nxt, gpu_memory, calibration).peak < plan(combo, gpu_memory, calibration).peak:
            combo = nxt
            for part in o["change"].split(" "):
                steps[part.split("=")[0]] = part
    final = plan(combo, gpu_memory, calibration)
    if steps:
        out.append({"change": " + ".join(steps.values()), "set": {}, "peak_gib": final.peak / GiB,
                    "fits": final.fits, "combined": True})
    return out


def format_plan(pl: Plan, extra: Optional[List[dict]] = None, notes: Optional[List[str]] = None) -> str:
    s = pl.setting
    lines = [f"{s.arch.name}: {s.num_frames} frames at {s.height}x{s.width} ({s.tokens()} tokens/sample), "
             f"{s.gpus} GPUs x {pl.gpu_memory / GiB:.0f} GiB, sp_size {s.sp_size}, ZeRO-{s.zero_stage}, {s.dtype}, "
             f"{'LoRA rank %d' % s.lora_rank if s.lora_rank else 'full fine-tuning'}, checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}, micro_batch {s.micro_batch}"
             f"{' x2 (CFG)' if s.cfg else ''}", "", "per GPU (GiB):"]
    for k, v in pl.terms.items():
        lines.append(f"  {k:<24}{v / GiB:8.2f}")
    lines.append(f"  {'persistent':<24}{pl.persistent / GiB:8.2f}")
    act = pl.activations
    lines.append(f"  activations / micro-batch: {act['saved'] / GiB:.2f} held, {act['peak'] / GiB:.2f} at the "
                 f"backward's peak ({act['batch']} samples x {act['tokens_per_rank']} tokens/rank)")
    for k, v in pl.phases.items():
        lines.append(f"  phase {k:<18}{v / GiB:8.2f}  -> total {(pl.persistent + v) / GiB:.2f}")
    verdict = "FITS" if pl.fits else "DOES NOT FIT"
    lines += ["", f"peak {pl.peak / GiB:.2f} GiB in {pl.peak_phase} vs budget {pl.budget / GiB:.2f} GiB "
                  f"({HEADROOM:.0%} of {pl.gpu_memory / GiB:.0f}): {verdict}"]
    if extra:
        lines += ["", "changes (predicted peak):"]
        for o in extra:
            lines.append(f"  {'fits ' if o['fits'] else 'no   '} {o['peak_gib']:7.2f} GiB  {o['change']}")
    for n in notes or []:
        lines.append(n)
    return "\n".join(lines)
