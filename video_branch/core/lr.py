"""Learning-rate multipliers over optimizer steps: a linear warm-up, then a constant, linear or cosine decay."""

from __future__ import annotations

import math

from .errors import CoreError

__all__ = ["LR_DECAYS", "lr_multiplier"]

LR_DECAYS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay: str = "constant",
                  final_ratio: float = 0.0) -> float:
    """The factor on the base learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. After it, with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1] and ``r = final_ratio``:

    - ``constant``: 1;
    - ``linear``: ``r + (1 - r) * (1 - p)``;
    - ``cosine``: ``r + (1 - r) * (1 + cos(pi * p)) / 2``.

    So the last step of the run (``step = total_steps - 1``) trains at just above ``r`` and a step past the end at
    exactly ``r``. A warm-up longer than the run warms up only.
    """
    if decay not in LR_DECAYS:
        raise CoreError(f"decay must be one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if warmup_steps < 0 or total_steps < 0:
        raise CoreError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise CoreError(f"final_ratio must be in [0, 1], got {final_ratio!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    p = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
    shape = 1.0 - p if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return final_ratio + (1.0 - final_ratio) * shape
