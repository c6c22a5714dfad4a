"""Ulysses sequence parallelism: 2 gloo ranks give the same outputs and gradients as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from diffusers import WanTransformer3DModel

from video_branch.parallel.ulysses import check_sp_degree, padded_length, valid_sp_degrees

WORKER = Path(__file__).parent / "dist_workers" / "ulysses_worker.py"
# 2 heads x 16; latent [16, 3, 6, 10] with patch (1, 2, 2) -> 3 * 3 * 5 = 45 tokens: odd, so sp 2 pads one token.
CONFIG = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
          "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
          "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
ODD_HEADS = {**CONFIG, "num_attention_heads": 3}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _model(config: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    # A perturbation on every parameter keeps any gradient from being zero by construction (e.g. zero biases).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.train()


def _forward(model, case):
    return model(hidden_states=case["latents"], timestep=case["timestep"], encoder_hidden_states=case["text"],
                 return_dict=False)[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    model = _model(CONFIG, seed=0)
    data = {
        "config": CONFIG, "state": model.state_dict(),
        "odd_config": ODD_HEADS, "odd_state": _model(ODD_HEADS, seed=0).state_dict(),
        "latents": torch.randn(2, 16, 3, 6, 10, generator=g),
        "timestep": torch.tensor([900.0, 250.0]),  # one per sample, different within the batch
        "text": torch.randn(2, 7, 32, generator=g),
        "weight": torch.randn(2, 16, 3, 6, 10, generator=g),
        "guidance": 4.0,
    }
    # Single-process reference on the same weights and inputs.
    out = _forward(model, data)
    (out * data["weight"]).sum().backward()
    with torch.no_grad():
        cond = _forward(model, data)
        uncond = model(hidden_states=data["latents"], timestep=data["timestep"],
                       encoder_hidden_states=torch.zeros_like(data["text"]), return_dict=False)[0]
    reference = {"out": out.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                 "cfg": uncond + data["guidance"] * (cond - uncond)}

    workdir = tmp_path_factory.mktemp("ulysses")
    torch.save(data, workdir / "case.pt")
    port = str(free_port())
    repo = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(workdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    # Generous: on a fresh machine the first deepspeed.init_distributed JIT-compiles a shared-memory op (minutes
    # under load); afterwards the workers take ~40 s.
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("sequence-parallel workers did not finish in 600 s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    ranks = [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return reference, ranks


def _assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert ref.abs().max() > 0, f"reference gradient of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(got[name], ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_valid_degrees_are_common_divisors_of_heads_and_world():
    assert valid_sp_degrees(12, 8) == [1, 2, 4]  # Wan 1.3B on 8 ranks
    assert valid_sp_degrees(40, 8) == [1, 2, 4, 8]  # Wan 14B
    assert valid_sp_degrees(3, 4) == [1]
    with pytest.raises(ValueError, match=r"parallel.sp_size: 8 .*12 attention heads.*valid degrees: \[1, 2, 4\]"):
        check_sp_degree(12, 8, world_size=8)
    check_sp_degree(40, 8, world_size=16)


def test_padded_length_rounds_up_to_the_group_size():
    assert [padded_length(s, 2) for s in (44, 45, 46)] == [44, 46, 46]
    assert padded_length(32760, 8) == 32760 and padded_length(32760, 16) == 32768


def test_sp2_output_equals_single_process_on_every_rank(case):
    reference, ranks = case
    for r in ranks:
        assert r["sp_size"] == 2
        assert r["out"].shape == reference["out"].shape == (2, 16, 3, 6, 10)
        torch.testing.assert_close(r["out"], reference["out"], **TOL)


def test_sp2_parameter_gradients_sum_to_single_process_gradients(case):
    reference, ranks = case
    for r in ranks:
        _assert_grads_equal(r["grads"], reference["grads"])


def test_sp2_with_gradient_checkpointing_matches(case):
    reference, ranks = case
    for r in ranks:
        torch.testing.assert_close(r["out_ckpt"], reference["out"], **TOL)
        _assert_grads_equal(r["grads_ckpt"], reference["grads"])


def test_sp2_cfg_rollout_velocity_matches(case):
    reference, ranks = case
    for r in ranks:
        torch.testing.assert_close(r["cfg"], reference["cfg"], **TOL)


def test_zero3_with_loss_scale_gives_the_single_process_gradient(case):
    """DeepSpeed averages over both ranks of the group; loss * handle.loss_scale restores the full gradient."""
    reference, ranks = case
    for r in ranks:
        torch.testing.assert_close(r["out_zero3"], reference["out"], **TOL)
        _assert_grads_equal(r["grads_zero3"], reference["grads"])


def test_disable_restores_the_plain_transformer(case):
    reference, ranks = case
    for r in ranks:
        torch.testing.assert_close(r["out_disabled"], reference["out"], **TOL)


def test_heads_not_divisible_by_sp_size_stop_with_the_valid_degrees(case):
    _, ranks = case
    for r in ranks:
        assert r["heads_error"] is not None, "3 heads at sp_size 2 were accepted"
        assert "parallel.sp_size: 2" in r["heads_error"] and "3 attention heads" in r["heads_error"]
        assert "valid degrees: [1]" in r["heads_error"]

