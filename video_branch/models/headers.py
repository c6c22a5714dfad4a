"""What can be checked in a Wan directory without reading weights: configs, safetensors headers, the tokenizer.

A run checks these before it loads anything (``video_branch.engine.preflight``), so a corrupt file, a wrong
sequence-parallel degree or a LoRA target that matches nothing stops in seconds, not after minutes of loading.
Errors are :class:`ModelFileError` with one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .wan import _import_class, read_model_index


class ModelFileError(ValueError):
    """A model file that is missing, unreadable or corrupt (one line, naming the file)."""


def component_config(path: str | Path, component: str) -> Dict:
    """``<path>/<component>/config.json`` as a dict."""
    f = Path(path) / component / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{f} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _safetensors_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def safetensors_keys(path: str | Path, component: str) -> List[str]:
    """Every tensor name in the component's safetensors files, read from their headers (no tensor data is read).

    Raises ModelFileError naming a file whose header is corrupt or whose data does not cover what the header
    promises (a truncated download)."""
    from safetensors import SafetensorError, safe_open

    keys: List[str] = []
    for f in _safetensors_files(Path(path) / component):
        try:
            with safe_open(str(f), framework="pt") as h:  # validates the header against the file size
                keys.extend(h.keys())
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{f} is corrupt or truncated: {e}") from None
    return keys


def check_weight_headers(path: str | Path, components=("transformer", "vae", "text_encoder")) -> Dict[str, List[str]]:
    """Validate the headers of every component's safetensors files; returns {component: tensor names}."""
    return {c: safetensors_keys(path, c) for c in components}


def module_names(tensor_names: List[str]) -> List[str]:
    """Module paths that own the given parameters (``blocks.0.attn1.to_q.weight`` -> ``blocks.0.attn1.to_q``)."""
    return sorted({k.rsplit(".", 1)[0] for k in tensor_names if "." in k})


def load_tokenizer(path: str | Path):
    """The model's tokenizer (its files only; no weights)."""
    path = Path(path)
    index = read_model_index(path, ("tokenizer",))
    entry = index["tokenizer"]
    cls = _import_class(entry[0], entry[1], "tokenizer")
    try:
        return cls.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the tokenizer files is reported with the folder
        raise ModelFileError(f"{path / 'tokenizer'} cannot be loaded: {type(e).__name__}: {e}") from None


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` as the prompt encoder sees them (cleaned as WanPipeline does, special tokens included)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return len(tokenizer(prompt_clean(prompt), add_special_tokens=True, truncation=False).input_ids)
