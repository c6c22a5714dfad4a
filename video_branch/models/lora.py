"""LoRA on the Wan transformer (``model.lora``): apply with peft, the reference policy as the disabled adapter, and
export in diffusers' LoRA format (``WanPipeline.load_lora_weights`` loads it).

The policy is a ``peft.PeftModel`` around the transformer, so its state dict uses peft's keys
(``base_model.model.<module>.base_layer.weight``, ``...lora_A.default.weight``);
:func:`merge_lora_state` reads those from DeepSpeed checkpoints. The KL reference needs no second copy of the weights:
it is the same module evaluated with the adapter disabled, i.e. the frozen base model.
"""

from __future__ import annotations

from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def apply_lora(transformer: torch.nn.Module, lora_cfg) -> torch.nn.Module:
    """Wrap ``transformer`` in a peft LoRA model; only the adapter's parameters stay trainable.

    lora_cfg: a ``LoraConfig`` section (``rank`` >= 1, ``alpha``, ``dropout``, ``target_modules``). lora_B starts at
    zero, so the wrapped model computes exactly what the transformer did.
    """
    from peft import LoraConfig, get_peft_model

    if lora_cfg.rank < 1:
        raise ValueError(f"config key 'model.lora.rank': apply_lora needs a rank >= 1, got {lora_cfg.rank}")
    targets = list(lora_cfg.target_modules)
    names = [n for n, _ in transformer.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"config key 'model.lora.target_modules': {unmatched} match no module of the transformer "
                         f"(e.g. to_q, to_k, to_v, to_out.0, ffn.net.0.proj)")
    config = LoraConfig(r=int(lora_cfg.rank), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=targets, init_lora_weights=True)
    return get_peft_model(transformer, config)


def is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "disable_adapter")


def lora_scale(lora_cfg) -> float:
    return float(lora_cfg.alpha) / int(lora_cfg.rank)


class AdapterDisabled(torch.nn.Module):
    """The base model of a LoRA policy: calls ``policy`` with its adapter disabled (the KL reference)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        if not is_lora(policy):
            raise TypeError(f"AdapterDisabled needs a peft LoRA model, got {type(policy).__name__}")
        # Not a submodule (the weights belong to the policy); `.module` is where dtype and device are read from.
        object.__setattr__(self, "module", policy)

    def forward(self, *args, **kwargs):
        with self.module.disable_adapter():
            return self.module(*args, **kwargs)


def diffusers_lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers' transformer keys (``blocks.0.attn1.to_q.lora_A.weight``), on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(module)
    out = {}
    for key, value in state.items():
        out[key.removeprefix("base_model.model.")] = value.detach().to("cpu", torch.float32).clone()
    return out


def adapter_metadata(module: torch.nn.Module) -> dict:
    """The LoRA config as diffusers stores it next to the weights (so ``alpha`` survives a reload)."""
    cfg = module.peft_config["default"]
    return {"r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "lora_dropout": float(cfg.lora_dropout),
            "target_modules": sorted(cfg.target_modules), "use_dora": False, "use_rslora": bool(cfg.use_rslora),
            "bias": "none", "init_lora_weights": True}


def save_diffusers_lora(state: dict[str, torch.Tensor], metadata: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` as ``WanPipeline.save_lora_weights`` does."""
    from diffusers import WanPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=state,
                                  transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHT_NAME)
    return out_dir / LORA_WEIGHT_NAME


def merged_transformer(module: torch.nn.Module, state: dict[str, torch.Tensor], scale: float) -> torch.nn.Module:
    """A plain transformer (the base class, base config) holding ``W + scale * B @ A`` from a peft ``state``."""
    base = module.get_base_model()
    plain = type(base).from_config(base.config)
    missing, unexpected = plain.load_state_dict(merge_lora_state(state, scale), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"merging LoRA: keys missing {missing[:5]}, unexpected {unexpected[:5]}")
    return plain


def merge_lora_state(state: dict, scale: float) -> dict:
    """A peft-wrapped transformer's state dict -> the plain transformer's, with ``W += scale * B @ A`` merged.

    Keys ``base_model.model.<m>.base_layer.weight`` / ``.lora_A.default.weight`` / ``.lora_B.default.weight`` become
    ``<m>.weight``; a plain state dict is returned unchanged.
    """
    prefix = "base_model.model."
    if not any(k.startswith(prefix) for k in state):
        return state
    plain, lora_a, lora_b = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        if ".lora_A." in key:
            lora_a[key.split(".lora_A.")[0]] = value
        elif ".lora_B." in key:
            lora_b[key.split(".lora_B.")[0]] = value
        else:
            plain[key.replace(".base_layer.", ".")] = value
    for module, a in lora_a.items():
        if module not in lora_b or f"{module}.weight" not in plain:
            raise KeyError(f"checkpoint: LoRA weights of {module} are incomplete (lora_A, lora_B and base weight)")
        plain[f"{module}.weight"] = plain[f"{module}.weight"] + scale * (lora_b[module].float() @ a.float()).to(
            plain[f"{module}.weight"].dtype)
    return plain
