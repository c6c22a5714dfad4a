"""The learning-rate schedule: warm-up, then a constant, linear or cosine decay, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from video_branch.config import ConfigError, load_config
from video_branch.core.errors import CoreError
from video_branch.core.lr import lr_multiplier
from video_branch.engine.setup import lr_lambda


def test_warmup_rises_linearly_to_the_base_rate():
    assert [lr_multiplier(s, 4, 12) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_constant_ignores_the_run_length():
    assert lr_multiplier(500, 0, 10, "constant") == 1.0


def test_linear_decay_reaches_the_final_ratio():
    # warm-up 4 steps, 12 in all: the decay spans steps 4 .. 12; step 8 is half way.
    assert lr_multiplier(4, 4, 12, "linear", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(8, 4, 12, "linear", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(12, 4, 12, "linear", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(40, 4, 12, "linear", 0.1) == pytest.approx(0.1)


def test_cosine_decay_by_hand():
    # p = 0.25: (1 + cos(pi / 4)) / 2 = (1 + 0.70710678) / 2
    assert lr_multiplier(2, 0, 8, "cosine") == pytest.approx(0.85355339)
    assert lr_multiplier(4, 0, 8, "cosine", 0.2) == pytest.approx(0.6)
    assert lr_multiplier(8, 0, 8, "cosine", 0.2) == pytest.approx(0.2)
    values = [lr_multiplier(s, 0, 8, "cosine") for s in range(9)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kwargs", [{"decay": "step"}, {"final_ratio": 1.5}, {"warmup_steps": -1}])
def test_bad_schedule_values_are_rejected(kwargs):
    args = {"step": 0, "warmup_steps": 2, "total_steps": 10, **kwargs}
    with pytest.raises(CoreError):
        lr_multiplier(**args)


def test_config_schedule_counts_the_optimizer_steps_of_the_iterations():
    # The demo's trees with a step every 12 trained edges: 120 edges, 10 optimizer steps per iteration.
    cfg = load_config("configs/tiny/demo.yaml", ["optim.minibatch=12", "train.iterations=5",
                                                 "optim.warmup_iterations=2", "optim.lr_decay=linear",
                                                 "optim.lr_final_ratio=0.0"])
    f = lr_lambda(cfg)
    assert f(9) == pytest.approx(0.5)  # 10 of 20 warm-up steps
    assert f(19) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.5)  # half way through steps 20 .. 50
    assert f(49) == pytest.approx(1 / 30)
    cos = lr_lambda(load_config("configs/tiny/demo.yaml", ["optim.minibatch=12", "train.iterations=4",
                                                           "optim.warmup_iterations=0", "optim.lr_decay=cosine"]))
    assert cos(10) == pytest.approx((1 + math.cos(math.pi * 10 / 40)) / 2)


def test_a_bad_decay_name_in_the_config_names_the_key():
    with pytest.raises(ConfigError, match="optim.lr_decay"):
        load_config("configs/tiny/demo.yaml", ["optim.lr_decay=exponential"])
