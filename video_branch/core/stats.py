"""Summary statistics of per-clip scores: means with 95% confidence intervals, paired before/after changes."""

from __future__ import annotations

import math
from typing import Dict

import numpy as np


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (ignoring NaN)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(1.96 * x.std(ddof=1) / math.sqrt(x.size))


def paired_change(before: Dict, after: Dict) -> Dict[str, float]:
    """Per reward term: mean after - before over the same clips (same prompts and seeds) and its 95% CI half-width.

    ``before`` and ``after`` are evaluation summaries with a ``per_clip`` mapping {term: [clips]}.
    """
    out = {}
    for k, b in before.get("per_clip", {}).items():
        a = after.get("per_clip", {}).get(k)
        if a is None or len(a) != len(b):
            continue
        m, ci = mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        out[k], out[k + "_ci95"] = m, ci
    return out
