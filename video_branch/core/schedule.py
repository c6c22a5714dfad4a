"""Flow-matching noise schedule shared by every method.

Convention (Wan, rectified flow): ``x_s = (1 - s) * x0 + s * eps`` with ``s`` in [0, 1]; ``s = 1`` is pure noise.
A rollout of ``N`` steps walks the sigmas ``s_0 = 1 > s_1 > ... > s_N = 0``.
"""

from __future__ import annotations

import math

import torch

from .errors import CoreError

__all__ = ["flow_sigmas", "model_timesteps"]


def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """Shifted flow-matching sigmas for an ``num_steps``-step rollout.

    ``u_i = 1 - i / N`` for ``i = 0..N`` and ``s_i = k * u_i / (1 + (k - 1) * u_i)`` with ``k = shift``.
    A shift above 1 spends more of the steps at high noise (Wan uses 3.0 at 480p, 5.0 at 720p).

    Args:
        num_steps: ``N >= 1``, the number of denoising steps.
        shift: ``k > 0``, the flow shift; ``1`` gives the uniform schedule ``s_i = u_i``.

    Returns:
        float32 tensor of shape ``[N + 1]``, strictly decreasing, with ``s_0 == 1`` and ``s_N == 0`` exactly.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise CoreError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    try:
        k = float(shift)
    except (TypeError, ValueError):
        raise CoreError(f"shift must be a finite number > 0, got {shift!r}") from None
    if not math.isfinite(k) or k <= 0:
        raise CoreError(f"shift must be a finite number > 0, got {shift!r}")

    # Formed in float64 so each float32 sigma is the correctly rounded value of the formula.
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    s = k * u / (1.0 + (k - 1.0) * u)
    # For shifts like 0.1, 1 + (k - 1) differs from k by an ulp; the endpoints are definitions, not results.
    s[0] = 1.0
    s[-1] = 0.0
    return s.to(torch.float32)


def model_timesteps(sigmas: torch.Tensor | float) -> torch.Tensor | float:
    """The timestep Wan's transformer takes for a sigma: ``t = 1000 * s``.

    Args:
        sigmas: a tensor of any shape (e.g. ``[N + 1]`` from :func:`flow_sigmas`, or ``[B]``), or a float.

    Returns:
        ``1000 * sigmas``, same shape and dtype (a float for a float).
    """
    return 1000.0 * sigmas
