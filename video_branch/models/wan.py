"""Loading a diffusers-format Wan text-to-video directory from local disk, and one velocity evaluation.

The directory is what `WanPipeline.save_pretrained` writes: `model_index.json` naming `[library, ClassName]` per
component, and one subfolder per component. Classes are imported from the named library, so a VAE class from this
package (e.g. `["video_branch.toyworld", "ToyVAE"]`) loads the same way as `["diffusers", "AutoencoderKLWan"]`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import set_attention_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


@dataclass
class WanComponents:
    """The loaded parts of a Wan model; a part not asked for is None."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    path: Path


def resolve_dtype(dtype: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    """Map a config dtype name to a torch dtype, naming `key` and the accepted names when it is unknown."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{key}: unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")


def _missing_model_files(folder: Path) -> list[str]:
    """Files a model subfolder lacks: its config.json, and weights (all shards, when sharded)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    files = [p.name for p in folder.iterdir() if p.is_file()]
    indexes = [f for f in files if f.endswith(_INDEX_SUFFIXES)]
    if indexes:
        for index in indexes:
            shards = sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
            missing += [s for s in shards if not (folder / s).is_file()]
    elif not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        missing.append(f"weights (*{', *'.join(_WEIGHT_SUFFIXES)})")
    return missing


def _missing_tokenizer_files(folder: Path) -> list[str]:
    missing = [] if (folder / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        missing.append("tokenizer.json or spiece.model")
    return missing


def read_model_index(path: str | Path, components: tuple[str, ...] = COMPONENTS) -> dict:
    """Validate the directory for `components` without loading weights; return its model_index.json.

    Raises FileNotFoundError naming the directory, the component and the missing file(s).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Wan model directory {path} does not exist")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"Wan model directory {path} has no model_index.json (expected a diffusers-format "
                                "directory as written by WanPipeline.save_pretrained)")
    index = json.loads(index_file.read_text())
    problems = []
    for name in (*components, "scheduler"):
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or None in entry:
            problems.append(f"component '{name}': model_index.json has no [library, class] entry for it")
            continue
        folder = path / name
        if not folder.is_dir():
            problems.append(f"component '{name}': subfolder {name}/ is missing")
            continue
        if name == "scheduler":
            missing = [] if (folder / "scheduler_config.json").is_file() else ["scheduler_config.json"]
        elif name == "tokenizer":
            missing = _missing_tokenizer_files(folder)
        else:
            missing = _missing_model_files(folder)
        if missing:
            problems.append(f"component '{name}': missing {', '.join(f'{name}/{m}' for m in missing)}")
    if problems:
        raise FileNotFoundError(f"Wan model directory {path} is incomplete:\n  " + "\n  ".join(problems))
    return index


def _import_class(library: str, class_name: str, component: str) -> type:
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"component '{component}': cannot import {class_name} from {library} "
                          f"(named in model_index.json): {err}") from err


def _load_component(path: Path, name: str, entry: list, dtype: torch.dtype) -> Any:
    cls = _import_class(entry[0], entry[1], name)
    folder = str(path / name)
    if name == "tokenizer":
        return cls.from_pretrained(folder, local_files_only=True)
    # Both diffusers' ModelMixin and transformers' PreTrainedModel accept `dtype` and a local folder.
    return cls.from_pretrained(folder, dtype=dtype, local_files_only=True)


def load_wan(
    path: str | Path,
    dtype: str = "float32",
    attention_backend: str = "native",
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    components: tuple[str, ...] = COMPONENTS,
    vae_dtype: str = "float32",
) -> WanComponents:
    """Load a local diffusers-format Wan directory (never the hub).

    The transformer and text encoder load in `dtype`; the VAE in `vae_dtype` (Wan's VAE is usually kept in float32:
    it is small and decoding in half precision shows banding). The text encoder and VAE are frozen and in eval mode;
    the transformer is in train mode with trainable parameters, and the caller decides what to train.
    """
    torch_dtype = resolve_dtype(dtype, "model.dtype")
    torch_vae_dtype = resolve_dtype(vae_dtype, "model.vae_dtype")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"load_wan: unknown components {unknown}; accepted: {', '.join(COMPONENTS)}")
    path = Path(path)
    index = read_model_index(path, tuple(components))
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())

    loaded: dict[str, Any] = dict.fromkeys(COMPONENTS)
    for name in components:
        loaded[name] = _load_component(path, name, index[name], torch_vae_dtype if name == "vae" else torch_dtype)

    for name in ("vae", "text_encoder"):
        if loaded[name] is not None:
            loaded[name] = loaded[name].to(device).eval().requires_grad_(False)
    transformer = loaded["transformer"]
    if transformer is not None:
        transformer = transformer.to(device).train().requires_grad_(True)
        set_attention_backend(transformer, attention_backend)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
    return WanComponents(
        transformer=transformer,
        vae=loaded["vae"],
        text_encoder=loaded["text_encoder"],
        tokenizer=loaded["tokenizer"],
        scheduler_config=scheduler_config,
        path=path,
    )


def module_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of a module (also through a DeepSpeed engine's `.module`).

    Parameters that diffusers and transformers keep in float32 on purpose (`_keep_in_fp32_modules`, e.g. Wan's
    norms and time embedder) do not count, as in `ModelMixin.dtype`.
    """
    module = getattr(module, "module", module)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    first = None
    for name, param in module.named_parameters():
        first = param if first is None else first
        if param.is_floating_point() and not any(k in name for k in keep):
            return param.dtype, param.device
    if first is None:
        raise ValueError(f"{type(module).__name__} has no parameters to take a dtype and device from")
    return first.dtype, first.device


def velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """One transformer evaluation: the flow velocity at `latents`.

    latents [B, C, F, H, W]; timesteps [B] (= 1000 * s, or per token [B, tokens]); prompt_embeds [B, L, D].
    Returns float32 [B, C, F, H, W]. Timesteps stay float32, as in WanPipeline: in bfloat16, 1000 * s would be
    rounded to steps of 4 near s = 1, and the transformer casts them itself after the sinusoidal projection.
    """
    if latents.ndim != 5:
        raise ValueError(f"velocity: latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
    batch = latents.shape[0]
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    if timesteps.ndim not in (1, 2) or timesteps.shape[0] != batch:
        raise ValueError(f"velocity: timesteps must be [B={batch}] (or [B, tokens]), got {tuple(timesteps.shape)}")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != batch:
        raise ValueError(f"velocity: prompt_embeds must be [B={batch}, L, D], got {tuple(prompt_embeds.shape)}")
    dtype, device = module_dtype_device(transformer)
    out = transformer(
        hidden_states=latents.to(device=device, dtype=dtype),
        timestep=timesteps.to(device=device, dtype=torch.float32),
        encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype),
        return_dict=False,
    )[0]
    return out.float()
