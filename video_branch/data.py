"""Prompt sets and the per-iteration choice of prompts for each data-parallel member."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np


class PromptFileError(ValueError):
    """A missing, unreadable or empty prompt file."""


def read_prompts(path: str | Path, key: str = "prompt file") -> List[str]:
    """One prompt per non-empty line; ``#`` starts a comment line. Raises PromptFileError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"{key} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{key} {p} cannot be read: {e}") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PromptFileError(f"{key} {p} holds no prompts (expected one prompt per line)")
    return prompts


def iteration_prompts(prompts: List[str], *, seed: int, iteration: int, dp_rank: int, per_rank: int) -> List[int]:
    """Indices of the prompts a data-parallel member trains on at an iteration.

    Deterministic in (seed, iteration, dp_rank), so a resumed run and every rank of a sequence-parallel group agree.
    """
    rng = np.random.default_rng([seed, iteration, dp_rank, 0x5EED])
    return [int(i) for i in rng.integers(0, len(prompts), size=per_rank)]


def tree_seed(seed: int, iteration: int, dp_rank: int, tree: int) -> int:
    """Seed of one tree's noise generator (identical across the ranks of an SP group)."""
    return int(np.random.default_rng([seed, iteration, dp_rank, tree, 0x7EE]).integers(0, 2**62))
