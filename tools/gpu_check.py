"""One prepared check on a GPU: the real-shape random Wan 2.1 1.3B transformer in bf16, measured against the CPU and
the memory planner.

    python tools/gpu_check.py --out runs/gpu_check                 # on the GPU machine (via tools/gpu_check.sh)
    python tools/gpu_check.py --device cpu --out runs/gpu_check    # the same steps at a small size, on the CPU

Steps (each timed; the whole run is sized to stay under 8 minutes on one H200):
1. forward + backward of the model at a small size on the device, compared with the same computation in float32
   on the CPU (relative error of the output and of the gradient of a LoRA-free parameter);
2. `--iterations` training iterations of the branchgrpo and dancegrpo presets at a real clip size: rollout
   (no-grad forwards over the tree's nodes, CFG batched), and the trained edges' forward + backward in micro-batches
   with activation checkpointing; s/iteration per preset and their ratio, rollout FLOP/s against the chip's peak;
3. the planner's training micro-batch prediction against the measured peak (`torch.cuda.max_memory_allocated` on
   the GPU; the allocator peak of the torch profiler on the CPU).
Writes `OUT/gpu_check.json` and `OUT/gpu_check.txt`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MIB = 2**20
H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100/H200 SXM (FLOP/s)
SIZES = {  # device -> (layers, frames, height, width, text tokens, micro_batch)
    "cuda": {"layers": 30, "frames": 33, "height": 480, "width": 832, "text": 512, "micro_batch": 1},
    "cpu": {"layers": 2, "frames": 5, "height": 32, "width": 32, "text": 16, "micro_batch": 4},
}
# The CPU run shrinks the trees (6 steps; 8 leaves, 4 chains) so the same steps finish in about a minute.
CPU_TREES = {"branchgrpo": ["tree.num_steps=6", "tree.split_steps=[0,1,2]"],
             "dancegrpo": ["tree.num_steps=6", "tree.roots=4"]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def transformer_flops(arch, tokens: int, text: int) -> float:
    """Matmul FLOPs of one forward of one sample (2 per multiply-add; attention scores included)."""
    d, f, n = arch.dim, arch.ffn, arch.num_layers
    per_layer = 2 * tokens * (4 * d * d) + 2 * tokens * 2 * d * d + 2 * text * 2 * d * d + 2 * tokens * 2 * d * f
    per_layer += 4 * tokens * tokens * d + 4 * tokens * text * d
    return n * per_layer


def step_forward_backward(device, layers: int) -> dict:
    """Step 1: the device's bf16 forward/backward against float32 on the CPU at a small size."""
    import bench_memory as bm

    ref = bm.real_transformer("1.3b", layers, "float32", seed=0)
    dev = bm.real_transformer("1.3b", layers, "bfloat16", seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    text = torch.randn(1, 32, 4096, generator=g)
    t = torch.tensor([700.0])

    def run(model, dtype, dev_):
        out = model(hidden_states=x.to(dev_, dtype), timestep=t.to(dev_), encoder_hidden_states=text.to(dev_, dtype),
                    return_dict=False)[0].float()
        out.square().mean().backward()
        grad = model.blocks[0].ffn.net[2].weight.grad.float().cpu()
        return out.detach().cpu(), grad

    t0 = time.perf_counter()
    o_ref, g_ref = run(ref, torch.float32, torch.device("cpu"))
    o_dev, g_dev = run(dev, torch.bfloat16, device)
    _sync(device)
    rel = float((o_dev - o_ref).norm() / o_ref.norm())
    rel_g = float((g_dev - g_ref).norm() / g_ref.norm())
    return {"output_rel_error": rel, "grad_rel_error": rel_g, "ok": rel < 0.05 and rel_g < 0.1,
            "wall_s": time.perf_counter() - t0}


def _preset_counts(method: str, num_steps: int | None, small: bool = False):
    """Per-prompt tree accounting of a preset (nodes evaluated per step, trained edges) from the config layer."""
    from video_branch.config import load_config
    from video_branch.config.specs import config_accounting, tree_spec

    sets = list(CPU_TREES[method]) if small else []
    sets += [f"tree.num_steps={num_steps}"] if num_steps else []
    cfg = load_config(None, sets, method=method)
    acc = config_accounting(cfg, 0)
    spec = tree_spec(cfg, 0)
    evaluated = [int(v) for v in spec.live_per_depth()[:-1]]
    return evaluated, int(acc["trained_edges"])


def step_iterations(device, size: dict, iterations: int, num_steps: int | None) -> dict:
    """Step 2: timed rollout + training iterations of branchgrpo and dancegrpo (CFG on, checkpointing on)."""
    import bench_memory as bm

    from video_branch.models.real_shapes import transformer_config
    from video_branch.planning import Architecture

    model = bm.real_transformer("1.3b", size["layers"], "bfloat16").to(device)
    model.enable_gradient_checkpointing()
    arch = Architecture.from_transformer_config("1.3b", transformer_config("1.3b", size["layers"]))
    fl, h, w = 1 + (size["frames"] - 1) // 4, size["height"] // 8, size["width"] // 8
    tokens = fl * (h // 2) * (w // 2)
    text = torch.randn(1, size["text"], 4096, device=device, dtype=torch.bfloat16)
    out = {"tokens": tokens, "layers": size["layers"], "presets": {}}
    frontier = 8
    for method in ("branchgrpo", "dancegrpo"):
        evaluated, trained = _preset_counts(method, num_steps, small=device.type == "cpu")
        rollout_s = flops = 0.0
        train_s = 0.0
        for _ in range(iterations):
            t0 = time.perf_counter()
            with torch.no_grad():
                for nodes in evaluated:
                    for start in range(0, nodes, frontier):
                        b = 2 * min(frontier, nodes - start)  # CFG: conditional and unconditional together
                        x = torch.randn(b, 16, fl, h, w, device=device, dtype=torch.bfloat16)
                        model(hidden_states=x, timestep=torch.full((b,), 500.0, device=device),
                              encoder_hidden_states=text.expand(b, -1, -1), return_dict=False)
                        flops += b * transformer_flops(arch, tokens, size["text"])
            _sync(device)
            t1 = time.perf_counter()
            rollout_s += t1 - t0
            mb = size["micro_batch"]
            for start in range(0, trained, mb):
                b = 2 * min(mb, trained - start)
                x = torch.randn(b, 16, fl, h, w, device=device, dtype=torch.bfloat16)
                v = model(hidden_states=x, timestep=torch.full((b,), 500.0, device=device),
                          encoder_hidden_states=text.expand(b, -1, -1), return_dict=False)[0]
                v.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            _sync(device)
            train_s += time.perf_counter() - t1
        out["presets"][method] = {
            "forward_batches": sum(math.ceil(n / frontier) for n in evaluated), "trained_edges": trained,
            "rollout_s": rollout_s / iterations, "train_s": train_s / iterations,
            "s_per_iteration": (rollout_s + train_s) / iterations, "rollout_flops_per_s": flops / rollout_s,
        }
    p = out["presets"]
    out["dance_over_branch"] = p["dancegrpo"]["s_per_iteration"] / p["branchgrpo"]["s_per_iteration"]
    return out


def step_memory(device, size: dict) -> dict:
    """Step 3: the planner's training micro-batch peak against the measured peak of one micro-step."""
    import bench_memory as bm

    from video_branch.models.real_shapes import transformer_config
    from video_branch.planning import Architecture, Setting, load_calibration, training_activations

    model = bm.real_transformer("1.3b", size["layers"], "bfloat16").to(device)
    model.enable_gradient_checkpointing()
    fl, h, w = 1 + (size["frames"] - 1) // 4, size["height"] // 8, size["width"] // 8
    b = 2 * size["micro_batch"]
    x = torch.randn(b, 16, fl, h, w, device=device, dtype=torch.bfloat16)
    text = torch.randn(b, size["text"], 4096, device=device, dtype=torch.bfloat16)

    def micro_step():
        v = model(hidden_states=x, timestep=torch.full((b,), 500.0, device=device), encoder_hidden_states=text,
                  return_dict=False)[0]
        v.float().square().mean().backward()

    micro_step()  # warm-up, so gradients are allocated before the measured step
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        micro_step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated(device) - base
    else:
        measured = bm.peak_allocated(micro_step)
    arch = Architecture.from_transformer_config("1.3b", transformer_config("1.3b", size["layers"]))
    s = Setting(arch=arch, gpus=1, dtype="bfloat16", gradient_checkpointing=True, num_frames=size["frames"],
                height=size["height"], width=size["width"], micro_batch=size["micro_batch"], cfg=True,
                text_tokens=size["text"])
    act = training_activations(s, load_calibration())
    return {"measured_peak_mib": measured / MIB, "planned_peak_mib": act["peak"] / MIB,
            "planned_saved_mib": act["saved"] / MIB, "ratio": act["peak"] / measured if measured else float("nan")}


def summary(report: dict) -> str:
    it, mem, fb = report["iterations"], report["memory"], report["forward_backward"]
    p = it["presets"]
    lines = [f"device {report['device']} ({report['device_name']}), {it['layers']} layers, "
             f"{it['tokens']} tokens/sample",
             f"1. bf16 vs float32 CPU: output rel. error {fb['output_rel_error']:.4f}, gradient "
             f"{fb['grad_rel_error']:.4f} ({'ok' if fb['ok'] else 'MISMATCH'})"]
    for m, r in p.items():
        lines.append(f"2. {m}: {r['s_per_iteration']:.2f} s/iteration (rollout {r['rollout_s']:.2f}, train "
                     f"{r['train_s']:.2f}); rollout {r['rollout_flops_per_s'] / 1e12:.3f} TFLOP/s = "
                     f"{100 * r['rollout_flops_per_s'] / H200_BF16_PEAK:.2f}% of an H100/H200's bf16 peak")
    lines.append(f"   dancegrpo / branchgrpo time: {it['dance_over_branch']:.2f}")
    lines.append(f"3. training micro-step peak: measured {mem['measured_peak_mib']:.0f} MiB, planned "
                 f"{mem['planned_peak_mib']:.0f} MiB (planned / measured {mem['ratio']:.2f})")
    lines.append(f"total {report['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="output folder (gpu_check.json, gpu_check.txt)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per preset (cuda 2, cpu 1)")
    parser.add_argument("--layers", type=int, default=None, help="transformer depth (cuda 30 = real, cpu 2)")
    parser.add_argument("--frames", type=int, default=None, help="clip frames, 4k+1")
    parser.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: the presets' 20; "
                        "the split steps must lie below it)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu for the small CPU run")
    size = dict(SIZES[args.device])
    if args.layers is not None:
        size["layers"] = args.layers
    if args.frames is not None:
        if args.frames < 1 or (args.frames - 1) % 4:
            parser.error(f"--frames: expected 4k+1 frames (1, 5, 9, ..., 33), got {args.frames}")
        size["frames"] = args.frames
    iterations = args.iterations or (2 if args.device == "cuda" else 1)
    num_steps = args.num_steps
    device = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    report = {"device": args.device, "torch": torch.__version__, "size": size, "iterations_per_preset": iterations,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    report["forward_backward"] = step_forward_backward(device, 1)
    print("step 1 done", flush=True)
    report["iterations"] = step_iterations(device, size, iterations, num_steps)
    print("step 2 done", flush=True)
    report["memory"] = step_memory(device, size)
    report["wall_s"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = summary(report)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    return 0 if report["forward_backward"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
