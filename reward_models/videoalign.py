# ruff: noqa: E501, W291  (the prompt template below is the trained text, long lines and trailing spaces included)
"""VideoAlign (VideoReward): Qwen2-VL-2B with a linear reward head read at three special tokens.

Loads the released checkpoint layout from a local directory and scores in-memory frames on transformers 5, with the
numbers of the released inference code (transformers 4.45)::

    <path>/model_config.json          data_config, model_config, peft_lora_config, inference_config
    <path>/checkpoint-<step>/         the latest step unless ``checkpoint_step`` is given (files may also sit in <path>)
        adapter_config.json + adapter_model.safetensors + non_lora_state_dict.pth    (LoRA release)
        or model.pth                                                                 (full state dict)

The base model (``model_config.model_name_or_path``, overridable with ``base_model``) is a local Qwen2-VL
directory: ``config.json``, its weights, the tokenizer (with its chat template) and ``preprocessor_config.json``.
The checkpoint was written by transformers 4.45 (``visual.*``, ``model.layers.*``); keys are moved to the 5.x
layout (``model.visual.*``, ``model.language_model.*``), the LoRA factors are attached with PEFT and run unmerged in
the model dtype (as the released code runs them), and the reward head ``rm_head`` (Linear, no bias) is read at the
hidden states of ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``. The language model gets plain sequential
positions ``0..L-1`` on all three rotary sections: the released reward model calls the 4.45 language model with
``position_ids=None``, which never computes Qwen2-VL's multimodal (M-RoPE) positions.

Preprocessing follows the released code (its ``vision_process.py``), without any video file: ``sample_type``
``uniform`` samples ``linspace(0, T-1, n).round()`` with ``n`` from ``num_frames`` (rounded to even, at most T), or
else ``T / video_fps * fps`` clamped to [4, min(768, T) rounded down to even] and rounded to even; ``multi_pts``
takes 4 windows of 6 frames from the clip resampled at 8 fps. Each frame is resized (bicubic, antialiased, back to
uint8 values) to multiples of 28 within ``[min_pixels, max_pixels]`` (``max_pixels`` =
``data_config.max_frame_pixels``), scaled to [0, 1] and normalised with the base model's ``image_mean`` /
``image_std``. Scores are ``(raw - mean) / std`` with the ``inference_config`` statistics (``use_norm``), and
``Overall = VQ + MQ + TA``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .registry import register

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMS = ("VQ", "MQ", "TA")
VIDEO_PAD = "<|video_pad|>"
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768

# The released model was trained on this exact text (VideoAlign's "detailed_special" template, MIT licence);
# a single changed character changes the scores.
_DETAILED_SPECIAL = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str, template_type: str) -> str:
    """The user text for one clip under the checkpoint's ``data_config.prompt_template_type``."""
    if template_type == "detailed_special":
        return _DETAILED_SPECIAL.replace("{text_prompt}", prompt)
    if template_type == "none":
        return prompt
    raise ValueError(f"videoalign: data_config.prompt_template_type {template_type!r} is not supported "
                     "(supported: 'detailed_special', the released checkpoint's, and 'none')")


# ----------------------------------------------------------------------------------------------- preprocessing

def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Target (h, w): multiples of ``factor``, aspect kept, area within [min_pixels, max_pixels] (Qwen2-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"videoalign: aspect ratio of {height}x{width} frames exceeds 200")
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor_by(height / beta, factor))
        w = max(factor, _floor_by(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil_by(height * beta, factor)
        w = _ceil_by(width * beta, factor)
    return h, w


def frame_count(total: int, video_fps: float, fps: Optional[float], num_frames: Optional[float]) -> int:
    """Frames to sample under ``sample_type: uniform`` (the released ``smart_nframes``).

    ``num_frames`` given: rounded to even (half to even), then at most ``total``. Otherwise ``total / video_fps * fps``
    clamped to [4, min(768, total) rounded down to even] and rounded to even. So a 2- or 3-frame clip gives 2 frames.
    Raises ValueError where the released code fails: fewer than 2 frames (a single image, ``num_frames`` < 2), and
    an odd count (``num_frames`` above an odd ``total``), which Qwen2-VL's 2-frame patches cannot hold.
    """
    if num_frames is not None:
        n = _round_by(num_frames, FRAME_FACTOR)
        if n > total:
            n = total
    else:
        top = _floor_by(min(MAX_FRAMES, total), FRAME_FACTOR)
        n = _round_by(min(max(total / video_fps * fps, _ceil_by(MIN_FRAMES, FRAME_FACTOR)), top), FRAME_FACTOR)
    if n < FRAME_FACTOR:
        raise ValueError(f"videoalign: a clip of {total} frame(s) with num_frames={num_frames} gives {n} frames to "
                         f"sample; VideoAlign needs at least {FRAME_FACTOR} (clips of >= 2 frames, num_frames >= 2)")
    if n % FRAME_FACTOR:
        raise ValueError(f"videoalign: num_frames={num_frames} exceeds the clip's {total} frames, and {n} frames "
                         f"cannot fill Qwen2-VL's {FRAME_FACTOR}-frame patches: use num_frames <= {total - 1}")
    return int(n)


def sample_indices(total: int, n: int) -> torch.Tensor:
    """Uniform frame indices ``linspace(0, total - 1, n).round()`` (repeats frames when n > total)."""
    return torch.linspace(0, total - 1, n).round().long()


MULTI_PTS_FPS, MULTI_PTS_WINDOWS, MULTI_PTS_WINDOW = 8, 4, 6


def multi_pts_indices(total: int, video_fps: float) -> torch.Tensor:
    """``sample_type: multi_pts``: the clip resampled at 8 fps, then 4 evenly spread windows of 6 consecutive
    resampled frames (24 indices). Raises ValueError when the resampled clip has fewer than 7 frames, where the
    released code's windows would overlap the clip's ends and come out short or empty."""
    n = int(total * MULTI_PTS_FPS // video_fps)
    half = MULTI_PTS_WINDOW // 2
    if n < MULTI_PTS_WINDOW + 1:
        raise ValueError(f"videoalign: sample_type 'multi_pts' needs at least {MULTI_PTS_WINDOW + 1} frames at "
                         f"{MULTI_PTS_FPS} fps; a clip of {total} frames at {video_fps:g} fps gives {n}")
    resampled = sample_indices(total, n)
    centres = torch.linspace(half, n - half - 1, MULTI_PTS_WINDOWS).round().long().tolist()
    return torch.cat([resampled[c - half:c + half] for c in centres])


def resize_frames(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, h, w] with integer values in [0, 255] (bicubic, antialiased, as the
    released pipeline resizes uint8 video tensors)."""
    x = frames.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255)


def patchify(video: torch.Tensor, patch: int, temporal: int, merge: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Qwen2-VL's flat patch layout.

    video: float [T, C, H, W] (T a multiple of ``temporal``; H, W multiples of patch * merge). Returns
    ([grid_t * grid_h * grid_w, C * temporal * patch * patch], (grid_t, grid_h, grid_w)), patches ordered by
    time, then merge window (row, column), then position inside the window; each patch flattened as (C, t, y, x).
    """
    t, c, h, w = video.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = video.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


@dataclass
class VisionSpec:
    """The base model's pixel pipeline (``preprocessor_config.json``)."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    patch: int
    temporal: int
    merge: int
    rescale: float

    @classmethod
    def load(cls, base_dir: str) -> "VisionSpec":
        path = os.path.join(base_dir, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"videoalign: missing {path} (the Qwen2-VL base model's preprocessor config: "
                                    "image_mean, image_std, patch_size, temporal_patch_size, merge_size)")
        with open(path) as f:
            cfg = json.load(f)
        try:
            return cls(tuple(cfg["image_mean"]), tuple(cfg["image_std"]), int(cfg.get("patch_size", 14)),
                       int(cfg.get("temporal_patch_size", 2)), int(cfg.get("merge_size", 2)),
                       float(cfg.get("rescale_factor", 1 / 255)))
        except KeyError as e:
            raise ValueError(f"videoalign: {path} lacks {e.args[0]!r}") from e


def video_pixels(frames: torch.Tensor, idx: torch.Tensor, size: Tuple[int, int], spec: VisionSpec):
    """One clip, uint8 [T, H, W, 3] -> (flat normalised patches, grid (t, h, w))."""
    x = resize_frames(frames[idx], size) * spec.rescale
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[0] % spec.temporal:
        x = torch.cat([x, x[-1:].expand(spec.temporal - x.shape[0] % spec.temporal, -1, -1, -1)])
    return patchify(x, spec.patch, spec.temporal, spec.merge)


# ------------------------------------------------------------------------------------------------ checkpoints

def _find_checkpoint(root: str, step: Optional[int]) -> str:
    dirs = [d for d in glob.glob(os.path.join(root, "checkpoint-*")) if os.path.isdir(d)]
    steps = {}
    for d in dirs:
        tail = os.path.basename(d).split("-", 1)[1]
        if tail.isdigit():
            steps[int(tail)] = d
    if step is not None and step != -1:
        if step not in steps:
            raise FileNotFoundError(f"videoalign: {os.path.join(root, f'checkpoint-{step}')} not found; "
                                    f"available steps: {sorted(steps) or 'none'}")
        return steps[step]
    if steps:
        return steps[max(steps)]
    return root


def _checkpoint_files(ckpt: str) -> Dict[str, str]:
    full = os.path.join(ckpt, "model.pth")
    if os.path.isfile(full):
        return {"full": full}
    files = {k: os.path.join(ckpt, n) for k, n in (("adapter", "adapter_model.safetensors"),
                                                   ("adapter_config", "adapter_config.json"),
                                                   ("non_lora", "non_lora_state_dict.pth"))}
    for name, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"videoalign: missing {path}; a checkpoint folder holds either model.pth or "
                                    "adapter_config.json + adapter_model.safetensors + non_lora_state_dict.pth")
    return files


def to_v5_key(key: str) -> str:
    """A transformers-4.45 Qwen2-VL key (possibly PEFT-wrapped) in the transformers-5 layout, PEFT prefix removed."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


_LORA = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.weight$")
_LORA_EMB = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(\.[^.]+)?$")


def split_state(state: Dict[str, torch.Tensor]):
    """Separate plain weights from LoRA factors. Returns (weights by v5 key, {module: {A, B, embedding}})."""
    plain, lora = {}, {}
    for key, val in state.items():
        k = to_v5_key(key)
        m = _LORA.match(k) or _LORA_EMB.match(k)
        if m:
            entry = lora.setdefault(m["mod"], {})
            entry["A" if m["kind"].endswith("A") else "B"] = val
            entry["embedding"] = "embedding" in m["kind"]
            continue
        if ".original_module." in k:
            continue  # PEFT keeps the untrained copy of a module it saves; the trained one is below
        k = k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        plain[k] = val
    return plain, lora


def lora_scale(module: str, rank: int, peft_cfg: Dict, adapter_cfg: Dict) -> float:
    """The LoRA scaling of one module: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), as the released code builds
    its LoraConfig, from ``model_config.json``'s ``peft_lora_config``; ``adapter_config.json`` fills what that lacks
    (and may add an ``alpha_pattern``). ``r`` is the rank the checkpoint's factors have."""
    want = peft_cfg.get("lora_r")
    if want is not None and int(want) != rank:
        raise ValueError(f"videoalign: LoRA factors of {module} have rank {rank}, peft_lora_config.lora_r is {want}")
    alpha = peft_cfg.get("lora_alpha", adapter_cfg.get("lora_alpha", rank))
    legacy = _to_v445_name(module)
    for pattern, value in (adapter_cfg.get("alpha_pattern") or {}).items():
        if any(re.fullmatch(rf"(.*\.)?{pattern}", name) for name in (module, legacy)):
            alpha = value
    rslora = peft_cfg.get("use_rslora", adapter_cfg.get("use_rslora", False))
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _to_v445_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def attach_lora(model: torch.nn.Module, lora: Dict[str, Dict], scales: Dict[str, float]) -> None:
    """Wrap each module named in ``lora`` with PEFT's LoRA layer (unmerged: ``base(x) + B(A(x)) * scale``, computed
    in the dtype the model is later cast to, as PEFT runs the released model) and load its factors."""
    from collections import Counter

    from peft import LoraConfig, inject_adapter_in_model

    modules = dict(model.named_modules())
    for mod, ab in lora.items():
        if "A" not in ab or "B" not in ab or mod not in modules:
            raise KeyError(f"videoalign: incomplete or unknown LoRA module {mod!r} in the checkpoint")
    ranks = {mod: int(ab["A"].shape[0]) for mod, ab in lora.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(lora), lora_dropout=0.0, bias="none",
                     rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0})
    inject_adapter_in_model(cfg, model, adapter_name="default")
    with torch.no_grad():
        for mod, ab in lora.items():
            layer = model.get_submodule(mod)
            if ab["embedding"]:
                a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
            else:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            for name, param, value in (("A", a, ab["A"]), ("B", b, ab["B"])):
                if param.shape != value.shape:
                    raise ValueError(f"videoalign: LoRA {name} of {mod} has shape {tuple(value.shape)}, the module "
                                     f"expects {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
            layer.scaling["default"] = scales[mod]


def load_reward_weights(model: torch.nn.Module, files: Dict[str, str], peft_cfg: Dict, vocab_grew: bool) -> None:
    """Load a released checkpoint into ``model`` (5.x layout, with ``rm_head``); LoRA factors are attached unmerged."""
    from safetensors.torch import load_file

    adapter_cfg: Dict = {}
    if "full" in files:
        state = torch.load(files["full"], map_location="cpu", weights_only=True)
    else:
        state = dict(load_file(files["adapter"]))
        state.update(torch.load(files["non_lora"], map_location="cpu", weights_only=True))
        with open(files["adapter_config"]) as f:
            adapter_cfg = json.load(f)
    plain, lora = split_state(state)
    own = model.state_dict()
    unknown = [k for k in plain if k not in own]
    if unknown:
        raise KeyError(f"videoalign: checkpoint keys not in the Qwen2-VL reward model: {unknown[:5]}"
                       f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all)")
    need = ["rm_head.weight"] + (["model.language_model.embed_tokens.weight"] if vocab_grew else [])
    absent = [k for k in need if k not in plain]
    if absent:
        raise KeyError(f"videoalign: checkpoint lacks {absent} (the reward head, and the embeddings of the added "
                       "reward tokens, must come from the checkpoint)")
    for k, v in plain.items():
        if own[k].shape != v.shape:
            raise ValueError(f"videoalign: checkpoint {k} has shape {tuple(v.shape)}, model expects "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(plain, strict=False)
    if lora:
        scales = {mod: lora_scale(mod, int(ab["A"].shape[0]), peft_cfg, adapter_cfg)
                  for mod, ab in lora.items() if "A" in ab}
        attach_lora(model, lora, scales)


# ------------------------------------------------------------------------------------------------- the reward

def _read_model_config(path: str) -> Dict:
    cfg_path = os.path.join(path, "model_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"videoalign: missing {cfg_path} (VideoReward's config with data_config, "
                                "model_config, peft_lora_config and inference_config)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for section in ("data_config", "model_config"):
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"videoalign: {cfg_path} lacks the '{section}' section")
    return cfg


def _resolve_base(path: str, cfg: Dict, base_model: Optional[str]) -> str:
    name = base_model or cfg["model_config"].get("model_name_or_path")
    if not name:
        raise ValueError(f"videoalign: no base model: pass base_model=... or set model_config.model_name_or_path "
                         f"in {os.path.join(path, 'model_config.json')}")
    for cand in (name, os.path.join(path, name)):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise FileNotFoundError(f"videoalign: base model {name!r} is not a local directory with config.json "
                            "(code never downloads weights: pass base_model=/path/to/Qwen2-VL-2B-Instruct)")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str, model_cfg: Dict, base: str) -> torch.dtype:
    """The scoring dtype. ``auto`` follows the checkpoint's ``model_config.torch_dtype`` (the released code loads
    the model in it on every device; the release says bfloat16); its ``auto`` means the base model's
    ``config.json`` dtype, and no setting means float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"videoalign: dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    want = model_cfg.get("torch_dtype")
    if want == "auto":
        with open(os.path.join(base, "config.json")) as f:
            base_cfg = json.load(f)
        want = base_cfg.get("torch_dtype") or base_cfg.get("dtype") or (base_cfg.get("text_config") or {}).get(
            "torch_dtype")
    if want is None:
        return torch.float32
    if want not in DTYPES:
        raise ValueError(f"videoalign: model_config.torch_dtype {want!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[want]


@register("videoalign")
class VideoAlign:
    """VideoReward scores ``VQ, MQ, TA, Overall`` of uint8 clips ``[B, T, H, W, 3]`` (T >= 2) for their prompts.

    path: the released directory (``model_config.json`` + ``checkpoint-*``). base_model: local Qwen2-VL directory
    (default: ``model_config.model_name_or_path``). video_fps: frame rate of the clips given (Wan: 16; a call may
    pass its own). fps / num_frames / max_pixels: override ``data_config`` (at most one of fps and num_frames; a
    frame count, given or from the config, wins over fps, as in the released code); min_pixels: the frame-area
    floor (Qwen2-VL's video default, 128 * 28 * 28). sample_type: override ``data_config.sample_type``
    (``uniform`` or ``multi_pts``). dtype: "auto" (the checkpoint's ``model_config.torch_dtype``: bf16 for the
    release), "bfloat16", "float16" or "float32". batch_size: clips per forward (None: the whole batch).
    """

    def __init__(
        self,
        path: str,
        base_model: Optional[str] = None,
        checkpoint_step: Optional[int] = None,
        device: Optional[str] = None,
        dtype: str = "auto",
        video_fps: float = 16.0,
        fps: Optional[float] = None,
        num_frames: Optional[int] = None,
        max_pixels: Optional[int] = None,
        min_pixels: int = VIDEO_MIN_PIXELS,
        sample_type: Optional[str] = None,
        use_norm: bool = True,
        batch_size: Optional[int] = None,
    ):
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

        if not os.path.isdir(path):
            raise FileNotFoundError(f"videoalign: checkpoint directory {path} does not exist")
        cfg = _read_model_config(path)
        data, mcfg = cfg["data_config"], cfg["model_config"]
        self.inference = cfg.get("inference_config")
        files = _checkpoint_files(_find_checkpoint(path, checkpoint_step))
        base = _resolve_base(path, cfg, base_model)
        self.vision = VisionSpec.load(base)

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, mcfg, base)

        self.template = data.get("prompt_template_type", "detailed_special")
        build_prompt("", self.template)
        if fps is not None and num_frames is not None:
            raise ValueError(f"videoalign: give fps ({fps}) or num_frames ({num_frames}), not both")
        self.video_fps = float(video_fps)
        self.num_frames = num_frames if num_frames is not None else data.get("num_frames")
        self.fps = float(fps if fps is not None else data.get("fps") or 2.0)
        self.sample_type = sample_type or data.get("sample_type") or "uniform"
        if self.sample_type not in ("uniform", "multi_pts"):
            raise ValueError(f"videoalign: sample_type {self.sample_type!r} is not supported "
                             "('uniform' or 'multi_pts')")
        self.max_pixels = int(max_pixels if max_pixels is not None else data.get("max_frame_pixels", 240 * 320))
        self.min_pixels = int(min_pixels)
        self.use_norm = bool(use_norm)
        self.batch_size = batch_size
        # As the released reward model: the special tokens exist only with use_special_tokens, and then decide the
        # read-out whatever reward_token says.
        use_special = bool(mcfg.get("use_special_tokens", False))
        self.reward_token = "special" if use_special else mcfg.get("reward_token", "last")
        if self.reward_token == "special" and not use_special:
            raise ValueError("videoalign: model_config.reward_token 'special' needs use_special_tokens: true (the "
                             "reward tokens are added to the vocabulary only then)")
        if self.reward_token not in ("special", "last"):
            raise ValueError(f"videoalign: model_config.reward_token {self.reward_token!r} is not supported "
                             "('special' or 'last')")
        if self.use_norm and self.inference is not None:
            missing = [f"{d}_{s}" for d in DIMS for s in ("mean", "std") if f"{d}_{s}" not in self.inference]
            if missing:
                raise ValueError(f"videoalign: inference_config lacks {missing}")

        tok = AutoTokenizer.from_pretrained(base, local_files_only=True, padding_side="right")
        base_len = len(tok)
        if use_special:
            tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        self.tokenizer = tok
        self.chat_template = self._chat_template(base, tok)

        model = Qwen2VLForConditionalGeneration.from_pretrained(
            base, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
        vocab_grew = len(tok) != base_len
        if vocab_grew:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        hidden = model.config.text_config.hidden_size
        model.rm_head = torch.nn.Linear(hidden, int(mcfg.get("output_dim", 1)), bias=False)
        load_reward_weights(model, files, cfg.get("peft_lora_config") or {}, vocab_grew)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.files = files

        self.video_token_id = model.config.video_token_id
        if tok.convert_tokens_to_ids(VIDEO_PAD) != self.video_token_id:
            raise ValueError(f"videoalign: tokenizer's {VIDEO_PAD} id {tok.convert_tokens_to_ids(VIDEO_PAD)} differs "
                             f"from the model's video_token_id {self.video_token_id}")
        self.reward_ids = tok.convert_tokens_to_ids(list(REWARD_TOKENS))

    @staticmethod
    def _chat_template(base: str, tok) -> str:
        if getattr(tok, "chat_template", None):
            return tok.chat_template
        for name in ("chat_template.jinja", "chat_template.json"):
            p = os.path.join(base, name)
            if os.path.isfile(p):
                with open(p) as f:
                    return json.load(f)["chat_template"] if name.endswith(".json") else f.read()
        raise FileNotFoundError(f"videoalign: no chat template in {base} (tokenizer_config.json, chat_template.jinja "
                                "or chat_template.json)")

    def frame_indices(self, total: int, video_fps: Optional[float] = None) -> torch.Tensor:
        """The frames sampled from a clip of ``total`` frames at ``video_fps`` (default: the reward's)."""
        vfps = float(video_fps if video_fps is not None else self.video_fps)
        if self.sample_type == "multi_pts":
            return multi_pts_indices(total, vfps)
        return sample_indices(total, frame_count(total, vfps, self.fps, self.num_frames))

    def preprocess(self, frames: torch.Tensor, prompts: List[str],
                   video_fps: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """uint8 [B, T, H, W, 3] + B prompts -> model inputs (input_ids, attention_mask, position_ids,
        pixel_values_videos, video_grid_thw), on the CPU. position_ids: [3, B, L], sequential on every section."""
        b, t, h, w, _ = frames.shape
        idx = self.frame_indices(t, video_fps)
        size = smart_resize(h, w, self.vision.patch * self.vision.merge, self.min_pixels, self.max_pixels)
        pixels, grids, texts = [], [], []
        for i in range(b):
            p, grid = video_pixels(frames[i], idx, size, self.vision)
            pixels.append(p)
            grids.append(grid)
            chat = [{"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": build_prompt(prompts[i], self.template)}]}]
            text = self.tokenizer.apply_chat_template(chat, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            tokens = grid[0] * grid[1] * grid[2] // self.vision.merge**2
            if text.count(VIDEO_PAD) != 1:
                raise ValueError(f"videoalign: the chat template must place one {VIDEO_PAD} per clip, got "
                                 f"{text.count(VIDEO_PAD)}")
            texts.append(text.replace(VIDEO_PAD, VIDEO_PAD * tokens))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"]
        # The released reward model calls the 4.45 language model with position_ids=None: positions 0..L-1, the same
        # on the temporal, height and width rotary sections (no M-RoPE).
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, b, -1)
        return {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"],
            "position_ids": positions,
            "pixel_values_videos": torch.cat(pixels),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    def _raw(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs -> raw head outputs [B, 3] (VQ, MQ, TA) in float32."""
        ids = inputs["input_ids"]
        dev = {k: v.to(self.device) for k, v in inputs.items()}
        dev["pixel_values_videos"] = dev["pixel_values_videos"].to(self.dtype)
        with torch.inference_mode():
            hidden = self.model.model(**dev, use_cache=False).last_hidden_state
            if self.reward_token == "special":
                pos = []
                for tid, tok in zip(self.reward_ids, REWARD_TOKENS):
                    hits = (ids == tid).nonzero()
                    if hits.shape[0] != ids.shape[0] or not torch.equal(hits[:, 0], torch.arange(ids.shape[0])):
                        raise ValueError(f"videoalign: every sample needs exactly one {tok} token")
                    pos.append(hits[:, 1])
                pos = torch.stack(pos, dim=1).to(self.device)  # [B, 3]
                h = torch.gather(hidden, 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
                logits = self.model.rm_head(h).float()  # [B, 3, out]
                out = logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]
            else:
                last = inputs["attention_mask"].sum(1).to(self.device) - 1
                out = self.model.rm_head(hidden[torch.arange(ids.shape[0], device=self.device), last]).float()
                if out.shape[-1] != 3:
                    raise ValueError(f"videoalign: reward_token 'last' needs output_dim 3, got {out.shape[-1]}")
        return out.cpu()

    def __call__(self, frames: torch.Tensor, prompts: List[str], *,
                 video_fps: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Scores of B clips; ``video_fps`` overrides the reward's frame rate for this call (a file's own rate)."""
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3:
            got = getattr(frames, "shape", frames)
            raise ValueError(f"videoalign: frames must be uint8 [B, T, H, W, 3], got {got}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"videoalign: frames must be uint8, got {frames.dtype}")
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"videoalign: {frames.shape[0]} clips but {len(prompts)} prompts")
        if video_fps is not None and not (video_fps > 0 and math.isfinite(video_fps)):
            raise ValueError(f"videoalign: video_fps must be a positive number, got {video_fps!r}")
        step = self.batch_size or frames.shape[0]
        raw = torch.cat([self._raw(self.preprocess(frames[s:s + step], list(prompts[s:s + step]), video_fps))
                         for s in range(0, frames.shape[0], step)])
        out = {}
        for j, d in enumerate(DIMS):
            v = raw[:, j]
            if self.use_norm and self.inference is not None:
                v = (v - float(self.inference[f"{d}_mean"])) / float(self.inference[f"{d}_std"])
            out[d] = v
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out
