"""The memory planner: parameter and ZeRO arithmetic by hand, activation predictions against saved-tensor
measurements at real widths, and the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from video_branch.models.real_shapes import parameter_count, transformer_config
from video_branch.planning import (
    Architecture,
    GiB,
    PlanError,
    Setting,
    load_calibration,
    plan,
    suggestions,
    training_activations,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _arch(size, layers=None):
    return Architecture.from_transformer_config(size, transformer_config(size, layers))


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_parameter_counts_equal_the_built_model(size):
    for layers in (None, 3):
        assert _arch(size, layers).params == parameter_count(transformer_config(size, layers))


def test_zero3_partitions_weights_gradients_and_adam_state():
    cal = load_calibration()
    arch = _arch("1.3b")
    n = arch.params
    full = plan(Setting(arch=arch, gpus=8, dtype="bfloat16"), 80 * GiB, cal)
    assert full.terms["parameters"] == pytest.approx(2 * n / 8)
    assert full.terms["gradients"] == pytest.approx(6 * n / 8)  # bf16 gradient + the fp32 one of the step
    assert full.terms["optimizer"] == pytest.approx(12 * n / 8)
    stage1 = plan(Setting(arch=arch, gpus=8, dtype="bfloat16", zero_stage=1), 80 * GiB, cal)
    assert stage1.terms["parameters"] == pytest.approx(2 * n) and stage1.terms["gradients"] == pytest.approx(6 * n)
    lora = plan(Setting(arch=arch, gpus=8, dtype="bfloat16", lora_rank=16), 80 * GiB, cal)
    adapters = 16 * 30 * 2 * 4 * (1536 + 1536)  # rank x layers x 2 attentions x 4 projections x (in + out)
    assert lora.terms["optimizer"] == pytest.approx(12 * adapters / 8)
    assert lora.terms["parameters"] == pytest.approx(2 * (n + adapters) / 8)
    copy = plan(Setting(arch=arch, gpus=8, dtype="bfloat16", gathered_weights=True, kl_reference=True), 80 * GiB,
                cal)
    assert copy.terms["rollout_copy"] == pytest.approx(2 * n) and copy.terms["reference"] == pytest.approx(2 * n)
    # A LoRA policy's reference: its disabled adapter costs nothing; objective.kl_reference=copy one bf16 transformer.
    lora_kl = dict(arch=arch, gpus=8, dtype="bfloat16", lora_rank=16, kl_reference=True)
    assert plan(Setting(**lora_kl), 80 * GiB, cal).terms["reference"] == 0
    assert plan(Setting(**lora_kl, reference_copy=True), 80 * GiB, cal).terms["reference"] == pytest.approx(2 * n)


def test_checkpointing_and_sequence_parallel_shrink_activations():
    cal = load_calibration()
    base = Setting(arch=_arch("14b"), gpus=8, num_frames=81, gradient_checkpointing=False, sp_size=1)
    a = training_activations(base, cal)["saved"]
    ck = training_activations(Setting(**{**base.__dict__, "gradient_checkpointing": True}), cal)["saved"]
    sp = training_activations(Setting(**{**base.__dict__, "sp_size": 8}), cal)["saved"]
    assert ck < a / 20
    assert sp == pytest.approx(a / 8, rel=0.02)


def test_a_setting_that_does_not_fit_gets_changes_that_do():
    cal = load_calibration()
    s = Setting(arch=_arch("14b"), gpus=8, num_frames=81, gradient_checkpointing=False, micro_batch=2)
    assert not plan(s, 80 * GiB, cal).fits
    out = suggestions(s, 80 * GiB, cal)
    assert any(o["fits"] for o in out)
    assert all(o["peak_gib"] > 0 for o in out)


def test_bad_settings_name_the_key():
    cal = load_calibration()
    with pytest.raises(PlanError, match="parallel.sp_size: 5"):
        plan(Setting(arch=_arch("14b"), gpus=8, sp_size=5), 80 * GiB, cal)
    with pytest.raises(PlanError, match="reward.components"):
        plan(Setting(arch=_arch("1.3b"), gpus=8, rewards=("nosuchreward",)), 80 * GiB, cal)
    with pytest.raises(PlanError, match="calibration file"):
        load_calibration(Path("/nonexistent/calibration.json"))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_activation_prediction_matches_saved_tensor_measurement(lora):
    """At a real width and a size no calibration point has (3 blocks, batch 2, 120 tokens, 24 text tokens)."""
    import bench_memory as bm

    torch.set_num_threads(2)
    cal = load_calibration()
    model = bm.real_transformer("1.3b", 3, "bfloat16", bm.LORA_RANK if lora else 0)
    for ckpt in (False, True):
        measured = bm.measure_saved(model, 2, (2, 12, 20), 24, ckpt)["total"]
        s = Setting(arch=_arch("1.3b", 3), gpus=1, dtype="bfloat16", lora_rank=bm.LORA_RANK if lora else 0,
                    gradient_checkpointing=ckpt, num_frames=5, height=96, width=160, micro_batch=2, cfg=False,
                    text_tokens=24)
        predicted = training_activations(s, cal)["saved"]
        assert abs(predicted / measured - 1) < 0.10, (ckpt, predicted, measured)


def _plan_cli(capsys, *args):
    from video_branch.plan import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config,gpus", [("configs/wan2.1_t2v_1.3b/branchgrpo.yaml", 8),
                                         ("configs/wan2.1_t2v_1.3b/dancegrpo.yaml", 8),
                                         ("configs/wan2.1_t2v_14b/branchgrpo.yaml", 8),
                                         ("configs/wan2.1_t2v_14b/dancegrpo.yaml", 8)])
def test_shipped_wan_configs_fit_8_h100(capsys, config, gpus):
    code, out, err = _plan_cli(capsys, "--config", str(ROOT / config), "--gpus", str(gpus), "--gpu-memory", "80GiB")
    assert code == 0, out + err
    assert "FITS" in out


def test_cli_errors_are_one_line_and_name_the_flag(capsys):
    config = str(ROOT / "configs/wan2.1_t2v_1.3b/branchgrpo.yaml")
    code, out, err = _plan_cli(capsys, "--config", config, "--gpus", "8", "--gpu-memory", "lots")
    assert code == 2
    assert err.strip().splitlines() == ["error: --gpu-memory: expected a positive size such as 80GiB or 141GB, "
                                        "got 'lots'"]
    code, out, err = _plan_cli(capsys, "--config", str(ROOT / "configs/wan2.1_t2v_14b/branchgrpo.yaml"), "--gpus",
                               "8", "--set", "parallel.sp_size=3")
    assert code == 2 and "parallel.sp_size" in err and len(err.strip().splitlines()) == 1
