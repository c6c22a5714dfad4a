"""Peak memory of one training micro-step at sequence-parallel degree 1 and 2, and the backward cost of depth pruning.

    python tools/bench_memory.py --out runs/bench/memory.json          # ~2-3 min on 2 CPU cores

One micro-step is the forward and backward of a flow-matching loss (velocity MSE) for one multi-frame latent through a
WanTransformer3DModel, in a fresh process per setting so that the process peak belongs to that step alone. Settings:
sp_size 1 (one process) and 2 (two gloo ranks of one SP group, Ulysses attention), each with and without activation
checkpointing. Per rank it reports:
- `peak_rss_mib`: the process's peak resident set size (getrusage), and `step_rss_mib`: that peak minus the resident
  size just before the step (weights, inputs and imports excluded);
- `saved_activation_mib`: the bytes of distinct tensors autograd keeps for backward (parameters excluded): the
  allocator-independent measure of what sequence parallelism and checkpointing shrink;
- on CUDA, `cuda_max_allocated_mib` (torch.cuda.max_memory_allocated over the step);
- the step's forward and backward times (median of `--repeats` further steps).
Depth pruning does not change a micro-step's memory (edges are micro-batched); it removes backward passes. The depth
pruning table multiplies the trained edges per prompt (`video_branch.core.tree` accounting of the method presets) by the
measured time of one edge's forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20
METHODS = ("branchgrpo", "branchgrpo_deppru")


def _current_rss() -> int:
    """Resident bytes now (Linux /proc; elsewhere the peak so far, the best getrusage offers)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


class SavedActivations:
    """Counts the distinct storages autograd saves for backward while active, parameters excluded."""

    def __init__(self, params):
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in self._params and s.device.type != "meta":
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _model_config(args) -> dict:
    return {"patch_size": (1, 2, 2), "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
            "in_channels": 16, "out_channels": 16, "text_dim": 64, "freq_dim": 64, "ffn_dim": args.ffn,
            "num_layers": args.layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 256}


def _flow_matching_loss(model, latents, text, t):
    """Velocity MSE at time t: x_t = (1 - t) x0 + t noise, target noise - x0 (Wan's timestep is 1000 t)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)).to(latents)
    x_t = (1 - t) * latents + t * noise
    pred = model(hidden_states=x_t, timestep=torch.full((latents.shape[0],), 1000.0 * t, device=latents.device),
                 encoder_hidden_states=text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, noise - latents)


def run_worker(args) -> None:
    """One rank of one setting: measure the first micro-step, then time `repeats` more; write a JSON record."""
    torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    from video_branch.parallel.ulysses import enable_sequence_parallel, sync_sp_gradients

    rank, group = 0, None
    if args.sp > 1:
        from video_branch.parallel.groups import init_distributed

        d = init_distributed(sp_size=args.sp, backend="auto", device=args.device)
        rank, group = d.rank, d.sp_group
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**_model_config(args)).to(device).train()
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    handle = enable_sequence_parallel(model, group)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, args.frames, args.height, args.width, generator=g).to(device)
    text = torch.randn(1, 16, 64, generator=g).to(device)
    saved = SavedActivations(model.parameters())

    def step(count: bool):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if count:
            with saved.hooks():
                loss = _flow_matching_loss(model, latents, text, 0.6)
        else:
            loss = _flow_matching_loss(model, latents, text, 0.6)
        t1 = time.perf_counter()
        loss.backward()
        sync_sp_gradients(model, group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _current_rss()
    step(count=True)
    record = {
        "sp_size": handle.sp_size, "rank": rank, "checkpointing": bool(args.checkpointing),
        "tokens": (args.frames * args.height * args.width) // 4,
        "peak_rss_mib": _peak_rss() / MIB, "rss_before_step_mib": rss_before / MIB,
        "step_rss_mib": max(0, _peak_rss() - rss_before) / MIB, "saved_activation_mib": saved.nbytes / MIB,
    }
    if device.type == "cuda":
        record["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    times = [step(count=False) for _ in range(args.repeats)]
    record["forward_s"] = statistics.median(t[0] for t in times)
    record["backward_s"] = statistics.median(t[1] for t in times)
    Path(args.result).write_text(json.dumps(record))
    if group is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(args, sp: int, checkpointing: bool, workdir: Path) -> list[dict]:
    """Launch the `sp` ranks of one setting as fresh processes; return their records in rank order."""
    port = str(_free_port())
    procs, results = [], []
    for rank in range(sp):
        result = workdir / f"sp{sp}_ckpt{int(checkpointing)}_rank{rank}.json"
        cmd = [sys.executable, __file__, "--worker", "--sp", str(sp), "--result", str(result),
               "--checkpointing", str(int(checkpointing)), "--device", args.device, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--frames", str(args.frames), "--height", str(args.height),
               "--width", str(args.width), "--layers", str(args.layers), "--heads", str(args.heads),
               "--head-dim", str(args.head_dim), "--ffn", str(args.ffn)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if sp > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(sp), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        results.append(result)
    for rank, p in enumerate(procs):
        log = p.communicate()[0]
        if p.returncode != 0:
            raise RuntimeError(f"bench_memory: sp {sp}, checkpointing {checkpointing}, rank {rank} failed:\n"
                               f"{log[-3000:]}")
    return [json.loads(r.read_text()) for r in results]


def depth_pruning_cost(settings: list[dict]) -> list[dict]:
    """Per prompt and iteration: trained edges (preset accounting) x measured forward+backward time per edge."""
    from video_branch.config import load_config
    from video_branch.config.specs import config_accounting

    rows = []
    accounts = {m: config_accounting(load_config(None, [], method=m)) for m in METHODS}
    for method, acc in accounts.items():
        for s in settings:
            if s["rank"] != 0:
                continue
            rows.append({
                "method": method, "sp_size": s["sp_size"], "checkpointing": s["checkpointing"],
                "edges": acc["edges"], "trained_edges": acc["trained_edges"],
                "cost_vs_branchgrpo": acc["trained_edges"] / accounts["branchgrpo"]["trained_edges"],
                "backward_s_per_edge": s["backward_s"], "train_s_per_edge": s["forward_s"] + s["backward_s"],
                "backward_s_per_prompt": acc["trained_edges"] * s["backward_s"],
                "train_s_per_prompt": acc["trained_edges"] * (s["forward_s"] + s["backward_s"]),
            })
    return rows


def markdown(report: dict) -> str:
    """The tables docs/BENCHMARKS.md shows."""
    head = ("| sp_size | checkpointing | rank | tokens/rank | peak RSS (MiB) | step RSS (MiB) "
            "| saved activations (MiB) | forward (s) | backward (s) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in report["settings"]:
        lines.append(f"| {s['sp_size']} | {'on' if s['checkpointing'] else 'off'} | {s['rank']} "
                     f"| {-(-s['tokens'] // s['sp_size'])} | {s['peak_rss_mib']:.0f} | {s['step_rss_mib']:.0f} "
                     f"| {s['saved_activation_mib']:.1f} | {s['forward_s']:.2f} | {s['backward_s']:.2f} |")
    head = ("| method | sp_size | checkpointing | trained edges / prompt | backward s / edge | backward s / prompt "
            "| fwd+bwd s / prompt | vs branchgrpo |")
    lines += ["", head, "|---|---|---|---|---|---|---|---|"]
    for r in report["depth_pruning"]:
        lines.append(f"| {r['method']} | {r['sp_size']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['trained_edges']} / {r['edges']} | {r['backward_s_per_edge']:.2f} "
                     f"| {r['backward_s_per_prompt']:.0f} | {r['train_s_per_prompt']:.0f} "
                     f"| {r['cost_vs_branchgrpo']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON report path (required unless --worker)")
    parser.add_argument("--sp-sizes", default="1,2", help="comma-separated SP degrees to measure")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--frames", type=int, default=9, help="latent frames")
    parser.add_argument("--height", type=int, default=24, help="latent height (even)")
    parser.add_argument("--width", type=int, default=40, help="latent width (even)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.out is None:
        parser.error("--out: give the JSON report path")
    if args.height % 2 or args.width % 2:
        parser.error(f"--height/--width: latent sizes must be even for patch (1, 2, 2); got {args.height}x{args.width}")
    try:
        sp_sizes = [int(s) for s in args.sp_sizes.split(",")]
    except ValueError:
        parser.error(f"--sp-sizes: expected comma-separated integers, got {args.sp_sizes!r}")
    from video_branch.parallel.ulysses import check_sp_degree

    for sp in sp_sizes:
        check_sp_degree(args.heads, sp)

    started = time.time()
    settings = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in sp_sizes:
            for ckpt in (False, True):
                print(f"sp_size {sp}, checkpointing {'on' if ckpt else 'off'} ...", flush=True)
                settings += run_setting(args, sp, ckpt, Path(tmp))
    report = {
        "command": "python tools/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "device": args.device, "threads_per_rank": args.threads,
        "model": {k: v for k, v in _model_config(args).items() if k != "patch_size"},
        "latent": [16, args.frames, args.height, args.width], "settings": settings,
        "depth_pruning": depth_pruning_cost(settings), "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
