import math

import numpy as np
import pytest
import torch

from video_branch.core.schedule import flow_sigmas, model_timesteps


def _reference_sigmas(n: int, k: float) -> list[float]:
    out = []
    for i in range(n + 1):
        u = 1.0 - i / n
        out.append(k * u / (1.0 + (k - 1.0) * u))
    return out


@pytest.mark.parametrize("n,k", [(1, 3.0), (10, 3.0), (20, 3.0), (20, 5.0), (7, 0.5), (40, 1.0), (13, 0.1)])
def test_sigmas_match_shift_formula(n, k):
    s = flow_sigmas(n, k)
    assert s.dtype == torch.float32
    assert s.shape == (n + 1,)
    ref = np.array(_reference_sigmas(n, k), dtype=np.float64)
    np.testing.assert_allclose(s.numpy().astype(np.float64), ref, rtol=0, atol=1e-7)
    assert s[0].item() == 1.0
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all()), "sigmas must be strictly decreasing"


def test_default_shift_is_three_and_first_step_is_small():
    s = flow_sigmas(20)
    assert torch.equal(s, flow_sigmas(20, 3.0))
    # 3 * 0.95 / (1 + 2 * 0.95) = 2.85 / 2.9
    assert s[1].item() == pytest.approx(2.85 / 2.9, abs=1e-7)


def test_shift_one_is_uniform():
    s = flow_sigmas(8, 1.0)
    assert torch.allclose(s, torch.linspace(1.0, 0.0, 9), atol=1e-7)


def test_model_timesteps_are_thousand_times_sigmas():
    s = flow_sigmas(20, 3.0)
    t = model_timesteps(s)
    assert t.shape == s.shape and t.dtype == s.dtype
    assert t[0].item() == 1000.0 and t[-1].item() == 0.0
    assert t[1].item() == pytest.approx(1000.0 * 2.85 / 2.9, rel=1e-6)
    assert model_timesteps(0.5) == 500.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "20"])
def test_bad_num_steps_raises(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "x"])
def test_bad_shift_raises(bad):
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, bad)
