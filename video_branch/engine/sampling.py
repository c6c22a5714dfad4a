"""Deterministic ODE sampling of clips from a Wan model, through the same rollout the trainer uses.

Each prompt is one tree of independent ODE chains (``ode_spec``) whose noise comes from its own seed, so a
(prompt, seed) pair starts from the same initial latent whatever the model, the batch it shares, or the micro-batch
size: differences between models' clips are differences between the models. Rendering comparisons, generator
evaluation and the trainer's held-out evaluation all sample through :func:`generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.tree import TreeSpec
from ..models.lora import merge_lora_state
from ..models.text import PromptEncoder
from ..models.vae import decode_to_frames
from ..models.wan import COMPONENTS, load_wan, module_dtype_device, velocity
from .rollout import rollout

PATCH = 2  # Wan's spatial patch size: latent height and width must be even


def ode_spec(num_steps: int, shift: float, clips: int) -> TreeSpec:
    """``clips`` independent ODE chains per prompt (no log-probs, nothing trained)."""
    return TreeSpec(num_steps=num_steps, roots=clips, split_steps=(), branching=1, split_noise="independent",
                    correlation=0.0, kinds=("ode",) * num_steps, sde_form="dance", eta=0.0, split_eta=None,
                    shift=shift)


def compression(vae) -> tuple[int, int]:
    """(temporal, spatial) compression factors of a Wan-interface VAE, from its config.

    ``scale_factor_temporal`` / ``scale_factor_spatial`` (what WanPipeline reads; AutoencoderKLWan and ToyVAE have
    them), else AutoencoderKLWan's ``temperal_downsample`` (sic), else Wan 2.1's 4 and 8.
    """
    cfg = vae.config
    tdown = getattr(cfg, "temperal_downsample", None)
    t_factor = 2 ** sum(bool(x) for x in tdown) if tdown is not None else 4
    s_factor = 2 ** len(tdown) if tdown is not None else 8
    return (int(getattr(cfg, "scale_factor_temporal", None) or t_factor),
            int(getattr(cfg, "scale_factor_spatial", None) or s_factor))


def latent_shape_for(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F', h, w) of one clip's latent; raises ValueError naming the size that the VAE and patching cannot take.

    Frames must be ``1 + k * temporal`` (Wan: 4k + 1); height and width multiples of ``spatial * 2`` (Wan: 16).
    """
    t_factor, s_factor = compression(vae)
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (num_frames - 1) % t_factor:
        raise ValueError(f"num_frames={num_frames}: must be 1 + {t_factor}k (e.g. {1 + t_factor}, {1 + 2 * t_factor}, "
                         f"{1 + 4 * t_factor}) for this VAE")
    step = s_factor * PATCH
    for name, value in (("height", height), ("width", width)):
        if value % step:
            raise ValueError(f"{name}={value}: must be a multiple of {step} for this model")
    return (int(vae.config.z_dim), 1 + (num_frames - 1) // t_factor, height // s_factor, width // s_factor)


def _model_fn(transformer, device):
    def fn(x, t, emb):
        return velocity(transformer, x.to(device), t.to(device), emb.to(device))

    return fn


@torch.no_grad()
def generate(
    models,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    shift: float = 3.0,
    num_frames: int,
    height: int,
    width: int,
    negative_prompt: str = "",
    frontier_batch: int = 32,
    progress: Callable[[int, int], None] | None = None,
    clips_per_prompt: int = 1,
    encoder=None,
    transformer=None,
    max_sequence_length: int = 512,
    decode_batch: int | None = 16,
) -> torch.Tensor:
    """Sample clips by Euler ODE steps from per-prompt seeds; returns uint8 ``[len(prompts) * clips, T, H, W, 3]``.

    models: a ``WanComponents`` (``vae`` is required; ``text_encoder`` and ``tokenizer`` unless ``encoder`` is given;
    ``transformer`` unless ``transformer`` is given). prompts / seeds: one seed per prompt; prompt ``i`` draws all
    its noise from a generator seeded with ``seeds[i]`` (its ``clips_per_prompt`` chains in order), so repeating a
    prompt with the same seed repeats its clips. Rows are prompt-major: row ``i * clips + c`` is clip ``c`` of
    prompt ``i``. encoder: a ``PromptEncoder`` to reuse (its cache); transformer: the module to sample from instead
    of ``models.transformer`` (e.g. a DeepSpeed engine's module). progress: ``progress(done, total)`` over the
    ``num_steps`` denoising steps and a final decoding step (``total = num_steps + 1``).
    The transformer is put in eval mode while sampling and returned to its previous mode.
    """
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ValueError("generate: no prompts given")
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: one seed per prompt expected, got {len(seeds)} seeds for {len(prompts)} prompts")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"generate: num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(clips_per_prompt, bool) or not isinstance(clips_per_prompt, int) or clips_per_prompt < 1:
        raise ValueError(f"generate: clips_per_prompt must be an integer >= 1, got {clips_per_prompt!r}")
    if guidance_scale < 0:
        raise ValueError(f"generate: guidance_scale must be >= 0, got {guidance_scale!r}")
    module = transformer if transformer is not None else models.transformer
    if module is None or models.vae is None:
        raise ValueError("generate: the model needs a transformer and a VAE (load them with load_wan)")
    shape = latent_shape_for(models.vae, num_frames, height, width)
    if encoder is None:
        if models.text_encoder is None or models.tokenizer is None:
            raise ValueError("generate: the model has no text encoder / tokenizer loaded, and no encoder was given")
        encoder = PromptEncoder(models.text_encoder, models.tokenizer, max_sequence_length=max_sequence_length)

    _, device = module_dtype_device(module)
    emb = encoder.encode(prompts)
    neg = encoder.encode([negative_prompt])[0] if guidance_scale != 1.0 else None
    spec = ode_spec(num_steps, shift, clips_per_prompt)
    total = num_steps + 1
    step_progress = (lambda done, _n: progress(done, total)) if progress is not None else None

    inner = getattr(module, "module", module)
    was_training = inner.training
    inner.eval()
    try:
        res = rollout(spec, _model_fn(module, device), emb, latent_shape=shape, seeds=seeds, negative_embeds=neg,
                      guidance_scale=guidance_scale, frontier_batch=frontier_batch, store_on_cpu=True, device=device,
                      progress=step_progress)
    finally:
        inner.train(was_training)
    _, vae_device = module_dtype_device(models.vae)
    frames = decode_to_frames(models.vae, res.leaf_latents.to(vae_device), batch_size=decode_batch).cpu()
    if progress is not None:
        progress(total, total)
    return frames


# ------------------------------------------------------------------------------------------------- model sources
@dataclass
class ModelSource:
    """Where a model to sample from comes from.

    kind: "diffusers" (a directory with model_index.json, e.g. a run's final/) or "checkpoint" (a DeepSpeed ZeRO
    checkpoint of a run: the transformer's weights on top of the run's ``model.path``). path: the diffusers directory,
    or the run's ``checkpoints/`` directory; tag: the checkpoint's tag; run_dir: the run directory, if any.
    """

    name: str
    kind: str
    path: Path
    tag: str | None = None
    run_dir: Path | None = None


def _run_config(run_dir: Path) -> dict:
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"run directory {run_dir} has no config.yaml (needed to find the base model of its "
                                "checkpoint)")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    return cfg if isinstance(cfg, dict) else {}


def resolve_source(spec: str) -> ModelSource:
    """Parse ``[NAME=]PATH`` into a :class:`ModelSource`.

    PATH may be a diffusers Wan directory; a run directory (its ``final/`` if present, else its newest checkpoint);
    a run's ``checkpoints/`` directory (the tag in ``latest``); or one checkpoint ``checkpoints/<tag>/``.
    NAME defaults to the directory's name (the run's name for ``final/`` and checkpoints, with ``@tag``).
    Raises FileNotFoundError naming the path and what was expected there.
    """
    name, sep, raw = spec.partition("=")
    if not sep or not name or Path(spec).exists():
        name, raw = "", spec
    path = Path(raw).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {raw}: no such file or directory")
    if not path.is_dir():
        raise FileNotFoundError(f"model {raw}: expected a directory (a diffusers Wan directory, a run directory or a "
                                "DeepSpeed checkpoint), got a file")
    path = path.resolve()
    if (path / "model_index.json").is_file():
        is_run = path.name == "final" and any((path.parent / f).exists() for f in ("metrics.jsonl", "config.yaml"))
        run_dir = path.parent if is_run else None
        default = run_dir.name if run_dir is not None else path.name
        return ModelSource(name or default, "diffusers", path, run_dir=run_dir)
    if (path / "final" / "model_index.json").is_file():
        return ModelSource(name or path.name, "diffusers", path / "final", run_dir=path)
    ckpts, tag = None, None
    if (path / "checkpoints").is_dir():
        ckpts = path / "checkpoints"
    elif (path / "latest").is_file() or path.name == "checkpoints":
        ckpts = path
    elif path.parent.name == "checkpoints" and any(p.name.endswith("model_states.pt") for p in path.iterdir()):
        ckpts, tag = path.parent, path.name
    if ckpts is None:
        raise FileNotFoundError(f"model {raw}: not a diffusers Wan directory (no model_index.json), nor a run "
                                "directory (no final/ or checkpoints/), nor a DeepSpeed checkpoint")
    if tag is None:
        latest = ckpts / "latest"
        if not latest.is_file() or not latest.read_text().strip():
            raise FileNotFoundError(f"model {raw}: {ckpts} has no 'latest' file naming a checkpoint (and the run "
                                    "has no final/)")
        tag = latest.read_text().strip()
        if not (ckpts / tag).is_dir():
            raise FileNotFoundError(f"model {raw}: {latest} names checkpoint '{tag}', but {ckpts / tag} is missing")
    run_dir = ckpts.parent
    return ModelSource(name or f"{run_dir.name}@{tag}", "checkpoint", ckpts, tag=tag, run_dir=run_dir)


def base_model_path(run_dir: Path) -> Path:
    cfg = _run_config(run_dir)
    base = (cfg.get("model") or {}).get("path")
    if not base:
        raise ValueError(f"{run_dir / 'config.yaml'}: no model.path (the base model of the run's checkpoints)")
    candidates = ([Path(base)] if Path(base).is_absolute()
                  else [Path(base), run_dir / base, run_dir.parent.parent / base])
    for c in candidates:
        if (c / "model_index.json").is_file():
            return c
    raise FileNotFoundError(f"{run_dir / 'config.yaml'}: model.path {base!r} is not a diffusers Wan directory "
                            f"(looked in {', '.join(str(c) for c in candidates)})")


def load_source(source: ModelSource, *, dtype: str = "float32", device="cpu", components=None):
    """Load a :class:`ModelSource` as ``WanComponents`` (for checkpoints: the run's base model with the trained
    transformer weights from ``zero_to_fp32``)."""
    components = tuple(components or COMPONENTS)
    if source.kind == "diffusers":
        return load_wan(source.path, dtype=dtype, device=device, components=components)
    if source.kind != "checkpoint":
        raise ValueError(f"model source kind must be 'diffusers' or 'checkpoint', got {source.kind!r}")
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    base = base_model_path(source.run_dir)
    # load_state_dict copies (and casts) into the loaded parameters, so the base model's fp32-kept modules stay fp32.
    models = load_wan(base, dtype=dtype, device=device, components=components)
    # zero_to_fp32 prints and draws progress bars per shard; errors still raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(source.path), tag=source.tag)
    lora = (_run_config(source.run_dir).get("model") or {}).get("lora") or {}
    rank = int(lora.get("rank") or 0)
    state = merge_lora_state(state, float(lora.get("alpha", 16.0)) / rank if rank else 0.0)
    if "transformer" in components:
        result = models.transformer.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {source.path / source.tag}: weights that the transformer of {base} does not "
                             f"have: {result.unexpected_keys[:5]}")
        if len(result.missing_keys) == len(models.transformer.state_dict()):
            raise ValueError(f"checkpoint {source.path / source.tag}: no weights of the transformer of {base}")
    return models
