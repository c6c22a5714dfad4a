"""Every check that needs no weights, run before a run loads anything or touches its run directory.

From the config, the files' headers and the model's ``config.json``: the prompt files and every prompt's token count
against ``model.max_sequence_length``, the model directory and its safetensors headers, the sequence-parallel degree
against the transformer's heads and the world size, LoRA target modules against the transformer's parameter names,
``parallel.ds_config``, and the rewards (names, options and their files, see ``reward_models.registry.check``).
Each failure is a :class:`PreflightError` with one line naming the config key or the file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from reward_models import registry

from ..config import ConfigError
from ..data import PromptFileError, read_prompts
from ..models.headers import (
    ModelFileError,
    check_weight_headers,
    component_config,
    load_tokenizer,
    module_names,
    token_count,
)
from ..models.wan import read_model_index
from ..parallel.ulysses import check_sp_degree


class PreflightError(ConfigError):
    """A bad input found before any weights are read (one line naming the config key or the file)."""


@dataclass
class Inputs:
    """What the checks read and the run keeps: its prompts, and how long the checks took."""

    train_prompts: List[str]
    eval_prompts: List[str]
    seconds: float


def check_inputs(cfg, world_size: int | None = None) -> Inputs:
    """Run every check (see the module docstring); ``world_size`` defaults to the launcher's ``WORLD_SIZE``."""
    t0 = time.perf_counter()
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        train = read_prompts(cfg.train.prompt_file, key="train.prompt_file")
        heldout = read_prompts(cfg.eval.prompt_file, key="eval.prompt_file")
        if cfg.eval.num_prompts:
            heldout = heldout[: cfg.eval.num_prompts]
        _check_ds_config(cfg.parallel.ds_config)
        read_model_index(cfg.model.path)
        tensors = check_weight_headers(cfg.model.path)
        _check_transformer(cfg, tensors["transformer"], world)
        _check_prompt_lengths(cfg, [("train.prompt_file", cfg.train.prompt_file),
                                    ("eval.prompt_file", cfg.eval.prompt_file)])
        _check_rewards(cfg.reward.components)
    except (ModelFileError, FileNotFoundError, PromptFileError) as e:
        raise PreflightError(_one_line(e)) from None
    return Inputs(train, heldout, time.perf_counter() - t0)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e.args[0] if e.args else e).splitlines() if line.strip())


def _check_ds_config(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise PreflightError(f"config key 'parallel.ds_config': DeepSpeed config file {p} not found")
    try:
        ds = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreflightError(f"config key 'parallel.ds_config': {p} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise PreflightError(f"config key 'parallel.ds_config': {p} must hold a JSON object")


def _check_transformer(cfg, tensor_names: Sequence[str], world: int) -> None:
    t = component_config(cfg.model.path, "transformer")
    heads = t.get("num_attention_heads")
    sp = cfg.parallel.sp_size
    if world % sp:
        raise PreflightError(f"config key 'parallel.sp_size': {sp} does not divide the world size {world}; "
                             f"accepted: {[d for d in range(1, world + 1) if world % d == 0]}")
    if sp > 1 and isinstance(heads, int):
        try:
            check_sp_degree(heads, sp, world)
        except ValueError as e:
            msg = str(e).removeprefix("parallel.sp_size: ")
            raise PreflightError(f"config key 'parallel.sp_size': {msg} ({Path(cfg.model.path) / 'transformer'})"
                                 ) from None
    lora = cfg.model.lora
    if lora.rank > 0 and tensor_names:
        names = module_names(list(tensor_names))
        unmatched = [m for m in lora.target_modules if not any(n == m or n.endswith("." + m) for n in names)]
        if unmatched:
            raise PreflightError(f"config key 'model.lora.target_modules': {unmatched} match no module of the "
                                 f"transformer in {Path(cfg.model.path) / 'transformer'} (e.g. to_q, to_k, to_v, "
                                 "to_out.0, ffn.net.0.proj)")


def _check_prompt_lengths(cfg, files: Sequence[Tuple[str, str]]) -> None:
    limit = cfg.model.max_sequence_length
    tokenizer = load_tokenizer(cfg.model.path)
    too_long = []
    for key, path in files:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            prompt = line.strip()
            if not prompt or prompt.startswith("#"):
                continue
            n = token_count(tokenizer, prompt)
            if n > limit:
                too_long.append(f"{path}:{i} ({key}) {prompt!r} has {n} tokens")
    neg = cfg.rollout.negative_prompt
    if neg and token_count(tokenizer, neg) > limit:
        too_long.append(f"rollout.negative_prompt {neg!r} has {token_count(tokenizer, neg)} tokens")
    if too_long:
        more = f" (and {len(too_long) - 3} more)" if len(too_long) > 3 else ""
        raise PreflightError(f"config key 'model.max_sequence_length': {limit} tokens, but "
                             + "; ".join(too_long[:3]) + more
                             + ": shorten those prompts or raise model.max_sequence_length")


def _check_rewards(components: Dict[str, Dict]) -> None:
    for name, opts in components.items():
        opts = dict(opts)
        opts.pop("weight", None)
        opts.pop("key", None)
        reg = opts.pop("reward", name)
        try:
            registry.check(reg, **opts)
        except (KeyError, TypeError, ValueError, FileNotFoundError, OSError) as e:
            raise PreflightError(f"config key 'reward.components.{name}': {_one_line(e)}") from None
