"""One rank of the sequence-parallel equivalence test (tests/test_ulysses.py launches two of these on gloo).

Reads `case.pt` from the work directory (transformer config and weights, inputs, loss weights), runs the same
computations as the single-process reference with sp_size 2, and writes `rank{r}.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _loss(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (out * weight).sum()


def _forward(model, case):
    return model(hidden_states=case["latents"], timestep=case["timestep"],
                 encoder_hidden_states=case["text"], return_dict=False)[0]


def _train_step(model, case, sp_group):
    from video_branch.parallel.ulysses import sync_sp_gradients

    model.zero_grad(set_to_none=True)
    out = _forward(model, case)
    _loss(out, case["weight"]).backward()
    sync_sp_gradients(model, sp_group)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _cfg_rollout_step(model, case):
    """A no-grad classifier-free-guided velocity, as a rollout takes it (two forwards, cond and uncond)."""
    with torch.no_grad():
        cond = _forward(model, case)
        uncond = model(hidden_states=case["latents"], timestep=case["timestep"],
                       encoder_hidden_states=torch.zeros_like(case["text"]), return_dict=False)[0]
    return uncond + case["guidance"] * (cond - uncond)


def _zero3_step(model, case, sp_group):
    """One micro-step through a ZeRO-3 engine with the loss scaled by handle.loss_scale; full gradients."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from video_branch.parallel.ulysses import enable_sequence_parallel

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config, dist_init_required=False)
    handle = enable_sequence_parallel(engine, sp_group)
    out = engine(hidden_states=case["latents"], timestep=case["timestep"], encoder_hidden_states=case["text"],
                 return_dict=False)[0]
    engine.backward(_loss(out, case["weight"]) * handle.loss_scale)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    handle.remove()
    return out.detach(), grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    workdir = parser.parse_args().workdir
    torch.set_num_threads(1)
    from diffusers import WanTransformer3DModel

    from video_branch.parallel.groups import init_distributed
    from video_branch.parallel.ulysses import disable_sequence_parallel, enable_sequence_parallel

    d = init_distributed(sp_size=2, backend="gloo", device="cpu")
    case = torch.load(workdir / "case.pt", weights_only=False)
    result: dict = {"rank": d.rank}

    def fresh(config=case["config"], state=case["state"]):
        model = WanTransformer3DModel(**config)
        model.load_state_dict(state)
        return model.train()

    model = fresh()
    handle = enable_sequence_parallel(model, d.sp_group)
    result["sp_size"] = handle.sp_size
    result["out"], result["grads"] = _train_step(model, case, d.sp_group)
    result["cfg"] = _cfg_rollout_step(model, case)
    model.enable_gradient_checkpointing()
    result["out_ckpt"], result["grads_ckpt"] = _train_step(model, case, d.sp_group)
    model.disable_gradient_checkpointing()
    disable_sequence_parallel(handle)
    with torch.no_grad():
        result["out_disabled"] = _forward(model, case)  # local again: no collective, the full model on each rank

    try:
        enable_sequence_parallel(fresh(case["odd_config"], case["odd_state"]), d.sp_group)
        result["heads_error"] = None
    except ValueError as err:
        result["heads_error"] = str(err)

    model = fresh()
    model.enable_gradient_checkpointing()
    result["out_zero3"], result["grads_zero3"] = _zero3_step(model, case, d.sp_group)

    torch.save(result, workdir / f"rank{d.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
