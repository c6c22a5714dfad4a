import logging
import math
import time

import numpy as np
import pytest
import torch

from reward_models import register
from reward_models.compose import ComposedReward, RewardOutputError, build_from_config, weighted_sum


def _frames(b, t=3):
    # Sample i is filled with the value i, so a reward can tell samples apart.
    return torch.arange(b, dtype=torch.uint8).view(b, 1, 1, 1, 1).expand(b, t, 8, 8, 3).contiguous()


def mean_pixel(frames, prompts):
    return {"mean": frames.float().mean(dim=(1, 2, 3, 4))}


def picky(frames, prompts):
    """Scores every sample as 10 * its pixel value, but raises whenever a prompt says 'bad'."""
    if any(p == "bad" for p in prompts):
        raise RuntimeError("cannot read this prompt")
    v = frames.float().mean(dim=(1, 2, 3, 4))
    return {"a": 10 * v, "b": v + 0.5}


@register("_compose_test_const")
class _Const:
    def __init__(self, value: float, scale: float = 1.0):
        self.value = value * scale

    def __call__(self, frames, prompts):
        return {"const": torch.full((frames.shape[0],), self.value)}


def test_weighted_sum_by_hand_and_nan_propagates():
    s = {"x": torch.tensor([1.0, 2.0, float("nan")]), "y": torch.tensor([10.0, 20.0, 30.0])}
    out = weighted_sum(s, {"x": 0.5, "y": 2.0})
    assert out[:2].tolist() == [0.5 + 20.0, 1.0 + 40.0]
    assert math.isnan(out[2].item())
    with pytest.raises(KeyError, match="z"):
        weighted_sum(s, {"z": 1.0})


def test_one_failing_sample_is_nan_only_for_that_sample(caplog):
    rm = ComposedReward({"picky": (picky, 1.0, "a"), "mean": (mean_pixel, 0.5)})
    frames = _frames(4)
    prompts = ["ok", "bad", "ok", "ok"]
    with caplog.at_level(logging.WARNING):
        out = rm(frames, prompts)
    assert torch.isnan(out["picky"][1]) and torch.isnan(out["picky/b"][1])
    keep = [0, 2, 3]
    assert out["picky"][keep].tolist() == [0.0, 20.0, 30.0]
    assert out["picky/b"][keep].tolist() == [0.5, 2.5, 3.5]
    assert out["mean"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert rm.last_failures == {"picky": [1], "mean": []}
    assert any("picky" in r.getMessage() and "cannot read this prompt" in r.getMessage() for r in caplog.records)
    total = rm.total(out)
    assert math.isnan(total[1].item())
    assert total[keep].tolist() == [0.0 + 0.0, 20.0 + 1.0, 30.0 + 1.5]


def test_a_transient_failure_is_retried_once():
    calls = []

    def flaky(frames, prompts):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise OSError("transient")
        return {"v": torch.ones(frames.shape[0])}

    rm = ComposedReward({"flaky": (flaky, 1.0)}, retries=1)
    out = rm(_frames(3), ["a", "b", "c"])
    assert calls == [3, 3]
    assert out["flaky"].tolist() == [1.0, 1.0, 1.0]
    assert rm.last_failures["flaky"] == []


def test_a_reward_that_always_fails_gives_all_nan_with_known_keys():
    state = {"broken": False}

    def sometimes(frames, prompts):
        if state["broken"]:
            raise RuntimeError("GPU fell off")
        return {"q": torch.zeros(frames.shape[0]), "Overall": torch.ones(frames.shape[0])}

    rm = ComposedReward({"s": (sometimes, 1.0)})
    first = rm(_frames(2), ["a", "b"])
    assert first["s"].tolist() == [1.0, 1.0]  # primary key falls back to 'Overall'
    state["broken"] = True
    second = rm(_frames(2), ["a", "b"])
    assert set(second) == {"s", "s/q", "s/Overall"}
    assert all(torch.isnan(v).all() for v in second.values())
    assert rm.last_failures["s"] == [0, 1]


def test_protocol_violations_raise_instead_of_nan():
    rm = ComposedReward({"bad": (lambda f, p: {"v": torch.zeros(5)}, 1.0)})
    with pytest.raises(RewardOutputError, match="bad"):
        rm(_frames(2), ["a", "b"])


def test_calls_are_timed():
    def slow(frames, prompts):
        time.sleep(0.05)
        return {"v": torch.zeros(frames.shape[0])}

    rm = ComposedReward({"slow": (slow, 1.0), "fast": (mean_pixel, 1.0)})
    rm(_frames(2), ["a", "b"])
    assert rm.last_times["slow"] >= 0.05
    assert rm.last_times["fast"] < rm.last_times["slow"]


def test_build_from_config_weights_and_options():
    rm = build_from_config({
        "_compose_test_const": {"weight": 2.0, "value": 3.0},
        "other": {"weight": 0.5, "reward": "_compose_test_const", "value": 1.0, "scale": 4.0},
        "temporal_consistency": {"weight": 1.0, "require_motion": False},
    })
    assert rm.weights == {"_compose_test_const": 2.0, "other": 0.5, "temporal_consistency": 1.0}
    pan = np.stack([np.roll(np.indices((16, 16)).sum(0) % 7 * 30, t, axis=1) for t in range(4)]).astype(np.uint8)
    frames = torch.from_numpy(np.repeat(pan[None, ..., None], 3, axis=-1))
    out = rm(frames, ["p"])
    assert out["_compose_test_const"].tolist() == [3.0]
    assert out["other"].tolist() == [4.0]
    assert 0.0 <= out["temporal_consistency"].item() <= 1.0
    expected = 2.0 * 3.0 + 0.5 * 4.0 + out["temporal_consistency"].item()
    assert rm.total(out).item() == pytest.approx(expected)


def test_build_from_config_errors_name_the_reward_and_option():
    with pytest.raises(ValueError, match="'tc'.*missing 'weight'"):
        build_from_config({"tc": {"reward": "temporal_consistency"}})
    with pytest.raises(TypeError, match="'temporal_consistency'.*unknown option 'require_moton'.*require_motion"):
        build_from_config({"temporal_consistency": {"weight": 1.0, "require_moton": True}})
    with pytest.raises(TypeError, match="'_compose_test_const'.*missing required option.*value"):
        build_from_config({"_compose_test_const": {"weight": 1.0}})
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        build_from_config({"no_such_reward": {"weight": 1.0}})
    with pytest.raises(ValueError, match="'tc'.*weight"):
        build_from_config({"tc": {"weight": "heavy", "reward": "temporal_consistency"}})


def test_components_with_the_same_reward_and_options_share_one_model_and_one_call():
    from reward_models.compose import build_from_config
    from reward_models.registry import register

    calls = []

    @register("shared_test_reward")
    class Shared:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, frames, prompts):
            calls.append(frames.shape[0])
            m = frames.float().mean(dim=(1, 2, 3, 4))
            return {"A": m * self.scale, "B": -m * self.scale}

    rm = build_from_config({
        "a": {"reward": "shared_test_reward", "key": "A", "weight": 1.0, "scale": 2.0},
        "b": {"reward": "shared_test_reward", "key": "B", "weight": 0.5, "scale": 2.0},
        "c": {"reward": "shared_test_reward", "key": "A", "weight": 1.0, "scale": 3.0},
    })
    frames = torch.full((2, 3, 4, 4, 3), 10, dtype=torch.uint8)
    out = rm(frames, ["x", "y"])
    assert rm.rewards["a"] is rm.rewards["b"] and rm.rewards["c"] is not rm.rewards["a"]
    assert calls == [2, 2]  # a and b share one call; c has other options
    assert torch.allclose(out["a"], torch.full((2,), 20.0)) and torch.allclose(out["b"], torch.full((2,), -20.0))
    assert torch.allclose(out["c"], torch.full((2,), 30.0))
