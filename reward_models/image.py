"""Image rewards for the single-frame case: HPS-v2.1, PickScore and CLIP score, all on transformers' CLIPModel.

Each scores frame 0 (``frames="first"``, default) or the mean over all frames (``frames="mean"``) of uint8 clips
``[B, T, H, W, 3]``; T = 1 is an image. Weights come from local paths only.

- ``pickscore``: a CLIPModel directory (PickScore_v1) and a processor directory (tokenizer +
  ``preprocessor_config.json``; PickScore uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's). Score
  ``logit_scale.exp() * cos(image, text)`` (about 18-23 for real images).
- ``clip_score``: a CLIPModel directory (its own tokenizer and preprocessor config unless ``processor`` is given).
  Score ``w * max(cos(image, text), 0)`` with ``w = 2.5`` (CLIP-S, Hessel et al. 2021).
- ``hps``: HPS-v2.1 is an open_clip ViT-H-14 fine-tuned as a whole; its checkpoint (``HPS_v2.1_compressed.pt``,
  ``{"state_dict": ...}`` or a bare state dict in open_clip's key layout) is converted to a CLIPModel here, so
  open_clip is not needed. Dimensions are read from the state dict; head counts follow open_clip's ViT-H-14 rule
  (text width / 64, vision width / 80) unless given. The tokenizer is a CLIP BPE tokenizer directory (open_clip's
  vocabulary, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Score ``cos(image, text)`` (HPS-v2.1: about 0.2-0.4).

Pixels: resize the shorter side to ``size.shortest_edge`` (bicubic, antialiased, rounded to uint8 values as PIL
does), centre-crop to ``crop_size``, scale to [0, 1], normalise with ``image_mean`` / ``image_std``
(``preprocessor_config.json``; HPS uses OpenAI CLIP's statistics at 224). Prompts are tokenized to 77 tokens,
truncated.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .registry import register

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _need(path: str, what: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist (weights are never downloaded; give a local path)")
    return path


def clip_pixels(frames: torch.Tensor, short: int, crop: Tuple[int, int], mean, std) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, crop_h, crop_w] (CLIP's resize, centre crop, normalise)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = short / min(h, w)
    size = (max(short, int(h * scale)) if h > w else short, max(short, int(w * scale)) if w > h else short)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
    ch, cw = crop
    top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
    if top < 0 or left < 0:
        x = F.pad(x, (max(0, -left), max(0, cw - size[1] - max(0, -left)), max(0, -top),
                      max(0, ch - size[0] - max(0, -top))))
        top, left = max(top, 0), max(left, 0)
    x = x[..., top:top + ch, left:left + cw] / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _read_pixel_config(processor_dir: str) -> Dict:
    path = os.path.join(processor_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path} (CLIP image preprocessing: size, crop_size, image_mean, image_std)")
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("size", 224)
    short = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", short)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    return {"short": int(short), "crop": crop, "mean": tuple(cfg.get("image_mean", OPENAI_MEAN)),
            "std": tuple(cfg.get("image_std", OPENAI_STD))}


class _ClipReward:
    """Shared machinery: a CLIPModel, its tokenizer and pixel pipeline, frame selection, batching."""

    key = "score"

    def __init__(self, model, tokenizer, pixels: Dict, frames: str, device: Optional[str], dtype: str,
                 batch_size: int):
        if frames not in ("first", "mean"):
            raise ValueError(f"{self.key}: frames must be 'first' or 'mean', got {frames!r}")
        dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"{self.key}: dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        if int(batch_size) < 1:
            raise ValueError(f"{self.key}: batch_size must be >= 1, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtypes[dtype] or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.frames = frames
        self.batch_size = int(batch_size)

    def features(self, images: torch.Tensor, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, H, W, 3], N prompts -> L2-normalised (image, text) features [N, D] in float32."""
        p = self.pixels
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)
        img_f, txt_f = [], []
        with torch.inference_mode():
            for s in range(0, images.shape[0], self.batch_size):
                px = clip_pixels(images[s:s + self.batch_size], p["short"], p["crop"], p["mean"], p["std"])
                img_f.append(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
                txt_f.append(self.model.get_text_features(
                    input_ids=tok["input_ids"][s:s + self.batch_size].to(self.device)))
        img = torch.cat([getattr(f, "pooler_output", f) for f in img_f]).float()
        txt = torch.cat([getattr(f, "pooler_output", f) for f in txt_f]).float()
        return F.normalize(img, dim=-1).cpu(), F.normalize(txt, dim=-1).cpu()

    def score(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3:
            got = getattr(frames, "shape", frames)
            raise ValueError(f"{self.key}: frames must be uint8 [B, T, H, W, 3], got {got}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"{self.key}: frames must be uint8, got {frames.dtype}")
        b, t = frames.shape[:2]
        if len(prompts) != b:
            raise ValueError(f"{self.key}: {b} clips but {len(prompts)} prompts")
        if self.frames == "first":
            images, texts, per = frames[:, 0], list(prompts), 1
        else:
            images, texts, per = frames.reshape(b * t, *frames.shape[2:]), [p for p in prompts for _ in range(t)], t
        img, txt = self.features(images, texts)
        cos = (img * txt).sum(-1).view(b, per)
        return {self.key: self.score(cos).mean(dim=1)}


def _load_clip(path: str, what: str):
    from transformers import CLIPModel

    _need(os.path.join(_need(path, what), "config.json"), f"{what} config")
    return CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def _load_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_need(path, what), local_files_only=True)


@register("pickscore")
class PickScore(_ClipReward):
    """PickScore_v1: ``logit_scale.exp() * cos``. path: CLIPModel dir; processor: tokenizer + preprocessor dir."""

    key = "pickscore"

    def __init__(self, path: str, processor: Optional[str] = None, frames: str = "first",
                 device: Optional[str] = None, dtype: str = "auto", batch_size: int = 16):
        proc = processor or path
        model = _load_clip(path, "pickscore model")
        super().__init__(model, _load_tokenizer(proc, "pickscore processor"), _read_pixel_config(proc), frames,
                         device, dtype, batch_size)
        self.logit_scale = float(model.logit_scale.detach().float().exp())

    def score(self, cos):
        return self.logit_scale * cos


@register("clip_score")
class ClipScore(_ClipReward):
    """CLIP-S: ``w * max(cos, 0)``. path: CLIPModel dir; processor: tokenizer + preprocessor dir (default: path)."""

    key = "clip_score"

    def __init__(self, path: str, processor: Optional[str] = None, w: float = 2.5, frames: str = "first",
                 device: Optional[str] = None, dtype: str = "auto", batch_size: int = 16):
        proc = processor or path
        super().__init__(_load_clip(path, "clip_score model"), _load_tokenizer(proc, "clip_score processor"),
                         _read_pixel_config(proc), frames, device, dtype, batch_size)
        self.w = float(w)

    def score(self, cos):
        return self.w * cos.clamp_min(0)


# ------------------------------------------------------------------------------------ open_clip -> CLIPModel

def _layers(state: Dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not idx:
        raise KeyError(f"hps: no '{prefix}*' keys in the checkpoint (not an open_clip CLIP state dict?)")
    return max(idx) + 1


def open_clip_to_hf(state: Dict[str, torch.Tensor], text_heads: Optional[int] = None,
                    vision_heads: Optional[int] = None, eos_token_id: int = 49407):
    """An open_clip CLIP state dict (e.g. ViT-H-14 / HPS-v2.1) -> (CLIPConfig, CLIPModel state dict).

    Dimensions come from tensor shapes; heads default to open_clip's rule (text width / 64, vision width / 80).
    """
    from transformers import CLIPConfig

    try:
        tw = state["token_embedding.weight"].shape[1]
        vw = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        n_pos = state["visual.positional_embedding"].shape[0]
        proj_dim = state["visual.proj"].shape[1]
        vocab, ctx = state["token_embedding.weight"].shape[0], state["positional_embedding"].shape[0]
        t_ff = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        v_ff = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"hps: checkpoint lacks {e.args[0]!r} (expected an open_clip CLIP state dict)") from e
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid != n_pos - 1:
        raise ValueError(f"hps: visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
    t_layers, v_layers = _layers(state, "transformer.resblocks."), _layers(state, "visual.transformer.resblocks.")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=tw, intermediate_size=t_ff, num_hidden_layers=t_layers,
                         num_attention_heads=text_heads or tw // 64, max_position_embeddings=ctx, hidden_act="gelu",
                         layer_norm_eps=1e-5, projection_dim=proj_dim, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=vw, intermediate_size=v_ff, num_hidden_layers=v_layers,
                           num_attention_heads=vision_heads or vw // 80, image_size=grid * patch, patch_size=patch,
                           hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=proj_dim),
        projection_dim=proj_dim)

    out = {"logit_scale": state["logit_scale"].reshape(())}

    def block(src: str, dst: str):
        qkv_w, qkv_b = state[f"{src}.attn.in_proj_weight"], state[f"{src}.attn.in_proj_bias"]
        for name, w, b in zip(("q", "k", "v"), qkv_w.chunk(3), qkv_b.chunk(3)):
            out[f"{dst}.self_attn.{name}_proj.weight"], out[f"{dst}.self_attn.{name}_proj.bias"] = w, b
        pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
        for a, b_ in pairs:
            for p in ("weight", "bias"):
                out[f"{dst}.{b_}.{p}"] = state[f"{src}.{a}.{p}"]

    for i in range(t_layers):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    for i in range(v_layers):
        block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    for p in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{p}"] = state[f"ln_final.{p}"]
        out[f"vision_model.pre_layrnorm.{p}"] = state[f"visual.ln_pre.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = state[f"visual.ln_post.{p}"]
    # open_clip projects with x @ P; a Linear computes x @ W.T.
    out["text_projection.weight"] = state["text_projection"].T.contiguous()
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    return cfg, out


@register("hps")
class HPSv21(_ClipReward):
    """HPS-v2.1: ``cos(image, text)`` of the fine-tuned open_clip ViT-H-14.

    checkpoint: ``HPS_v2.1_compressed.pt``; tokenizer: a CLIP tokenizer directory; text_heads / vision_heads:
    override the head counts for non-ViT-H-14 checkpoints; size: input resolution (default: the checkpoint's).
    """

    key = "hps"

    def __init__(self, checkpoint: str, tokenizer: str, frames: str = "first", device: Optional[str] = None,
                 dtype: str = "auto", batch_size: int = 16, text_heads: Optional[int] = None,
                 vision_heads: Optional[int] = None):
        from transformers import CLIPModel

        raw = torch.load(_need(checkpoint, "hps checkpoint"), map_location="cpu", weights_only=True)
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"hps: {checkpoint} holds {type(raw).__name__}, expected a state dict")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        tok = _load_tokenizer(tokenizer, "hps tokenizer")
        cfg, hf_state = open_clip_to_hf(state, text_heads, vision_heads, eos_token_id=tok.eos_token_id)
        model = CLIPModel(cfg)
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise KeyError(f"hps: converted checkpoint does not fit CLIPModel: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        side = cfg.vision_config.image_size
        super().__init__(model, tok, {"short": side, "crop": (side, side), "mean": OPENAI_MEAN, "std": OPENAI_STD},
                         frames, device, dtype, batch_size)

    def score(self, cos):
        return cos
