"""Will a run fit? Per-GPU memory of a config on N GPUs, and the changes that make it fit.

    python -m video_branch.plan --config configs/wan2.1_t2v_14b/branchgrpo.yaml --gpus 8 --gpu-memory 80GiB
    python -m video_branch.plan --config CONFIG --set video.num_frames=81 --gpus 16 --gpu-memory 80GiB --json

The model's shape comes from ``model.path``'s ``transformer/config.json`` when that directory exists, else from
``--model`` (or a path naming 1.3B or 14B). Activation bytes are measured coefficients (see ``video_branch.planning``
and ``tools/bench_memory.py --calibrate``); everything else is counted from the parameter counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, add_config_args, config_from_args
from .config.specs import config_accounting
from .core.objectives import objective_info
from .models.real_shapes import SIZES, transformer_config
from .planning import (
    Architecture,
    GiB,
    PlanError,
    Setting,
    format_plan,
    load_calibration,
    plan,
    suggestions,
)

_UNITS = {"gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '141 GB', '96' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = (m.group(2).lower() or "gib") if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise PlanError(f"--gpu-memory: expected a positive size such as 80GiB or 141GB, got {text!r}")
    return float(m.group(1)) * _UNITS[unit]


def architecture(cfg, model: Optional[str]) -> Architecture:
    """The transformer shape: the model directory's config, else ``--model`` or the size named in the path."""
    tc_file = Path(cfg.model.path) / "transformer" / "config.json"
    if tc_file.is_file():
        tc = json.loads(tc_file.read_text())
        name = model or next((s for s in SIZES if transformer_config(s)["num_attention_heads"] ==
                              tc.get("num_attention_heads") and transformer_config(s)["ffn_dim"] == tc.get("ffn_dim")),
                             None)
        if name is None:
            raise PlanError(f"model.path: {tc_file} is not the width of a calibrated Wan 2.1 model "
                            f"({', '.join(SIZES)})")
        return Architecture.from_transformer_config(name, tc)
    if model is None:
        found = [s for s in SIZES if re.search(rf"(?<![0-9.]){re.escape(s)}", Path(cfg.model.path).name.lower())]
        if len(found) != 1:
            raise PlanError(f"model.path: {cfg.model.path} has no transformer/config.json and names no size; "
                            f"pass --model {{{','.join(SIZES)}}}")
        model = found[0]
    return Architecture.from_transformer_config(model, transformer_config(model))


def _ds_sizes(path: str) -> dict:
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, ValueError):
        return {}
    out = {}
    if "stage3_prefetch_bucket_size" in zero:
        out["prefetch_params"] = int(zero["stage3_prefetch_bucket_size"])
    if "reduce_bucket_size" in zero:
        out["reduce_bucket"] = int(zero["reduce_bucket_size"])
    return out


def setting_from_config(cfg, gpus: int, model: Optional[str] = None) -> Setting:
    arch = architecture(cfg, model)
    acc = config_accounting(cfg, 0)
    info = objective_info(cfg.objective.name)
    rewards = tuple(str(opts.get("reward", name)) for name, opts in cfg.reward.components.items())
    return Setting(
        arch=arch, gpus=gpus, dtype=cfg.model.dtype, lora_rank=cfg.model.lora.rank,
        lora_targets=tuple(cfg.model.lora.target_modules), gradient_checkpointing=cfg.model.gradient_checkpointing,
        num_frames=cfg.video.num_frames, height=cfg.video.height, width=cfg.video.width,
        micro_batch=cfg.optim.micro_batch, cfg=cfg.rollout.guidance_scale != 1.0,
        text_tokens=cfg.model.max_sequence_length, sp_size=cfg.parallel.sp_size, zero_stage=cfg.parallel.zero_stage,
        gathered_weights=cfg.rollout.gathered_weights, frontier_batch=cfg.rollout.frontier_batch,
        decode_batch=cfg.rollout.decode_batch, store_on_cpu=cfg.rollout.store_on_cpu,
        nodes_per_prompt=int(acc["edges"]) + cfg.tree.roots, prompts_per_rank=cfg.train.prompts_per_rank,
        kl_reference=cfg.objective.kl_coef > 0 and info.reference,
        reference_copy=cfg.objective.kl_reference == "copy", full_copies=len(info.copies), rewards=rewards,
        attention=cfg.model.attention_backend, **_ds_sizes(cfg.parallel.ds_config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m video_branch.plan", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the ZeRO world)")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB (default 80GiB)")
    parser.add_argument("--model", choices=SIZES, help="the Wan 2.1 size when model.path has no transformer config")
    parser.add_argument("--calibration", type=Path, help="activation coefficients written by "
                        "tools/bench_memory.py --calibrate (default: the shipped measurement)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        memory = parse_memory(args.gpu_memory)
        if args.gpus < 1:
            raise PlanError(f"--gpus: expected a positive GPU count, got {args.gpus}")
        s = setting_from_config(cfg, args.gpus, args.model)
        cal = load_calibration(args.calibration)
        pl = plan(s, memory, cal)
        changes = [] if pl.fits else suggestions(s, memory, cal)
    except (ConfigError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    acc = config_accounting(cfg, 0)
    notes = [f"depth pruning changes no micro-batch's memory (edges are micro-batched); it cuts backward passes: "
             f"{acc['trained_edges']} of {acc['edges']} edges trained per prompt here"]
    if args.json:
        out = pl.to_dict()
        out["changes"] = changes
        out["trained_edges"], out["edges"] = acc["trained_edges"], acc["edges"]
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(pl, changes, notes))
    return 0 if pl.fits else 1


if __name__ == "__main__":
    sys.exit(main())
