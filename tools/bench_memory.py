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
    """Counts the distinct storages autograd saves for backward while active, parameters excluded.

    With `attribute(blocks)`, each storage is also labelled by the transformer block whose forward first saved it
    (`block<i>`, else `outer`), and the tensors a block receives as inputs are recorded as `held` (what gradient
    checkpointing keeps alive between forward and backward instead of the block's saved tensors).
    """

    def __init__(self, params):
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.held: dict[int, tuple[int, str]] = {}
        self._label = "outer"

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in self._params and s.device.type != "meta":
            self.storages[s.data_ptr()] = s.nbytes()
            self.labels.setdefault(s.data_ptr(), self._label)
        return t

    def attribute(self, blocks) -> list:
        """Label saved storages by block and record block inputs; returns the hook handles (remove them after)."""
        handles = []

        def tensors(obj):
            if torch.is_tensor(obj):
                yield obj
            elif isinstance(obj, (tuple, list)):
                for o in obj:
                    yield from tensors(o)

        for i, block in enumerate(blocks):
            def pre(module, args, kwargs, i=i):
                self._label = f"block{i}"
                for t in tensors((args, tuple(kwargs.values()))):
                    s = t.untyped_storage()
                    if s.data_ptr() not in self._params:
                        self.held.setdefault(s.data_ptr(), (s.nbytes(), f"block{i}"))

            def post(module, args, output):
                self._label = "outer"

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post))
        return handles

    def by_label(self, exclude_held: bool = False) -> dict[str, int]:
        """Saved bytes by label; `exclude_held` leaves out block inputs (counted by `held_by_label` instead)."""
        out: dict[str, int] = {}
        for ptr, n in self.storages.items():
            if not (exclude_held and ptr in self.held):
                out[self.labels[ptr]] = out.get(self.labels[ptr], 0) + n
        return out

    def held_by_label(self, include_saved: bool = False) -> dict[str, int]:
        """Bytes of block inputs by the first block that received them; unless `include_saved`, only those that
        are not also saved tensors."""
        out: dict[str, int] = {}
        for ptr, (n, label) in self.held.items():
            if include_saved or ptr not in self.storages:
                out[label] = out.get(label, 0) + n
        return out

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


# ------------------------------------------------------------------------------------------ real-width calibration
CALIBRATION_POINTS = ((2, 8, 8, 16), (2, 16, 16, 16), (2, 8, 8, 64), (2, 16, 16, 64))  # latent F', h, w; text L
LORA_RANK = 64


def real_transformer(size: str, num_layers: int, dtype: str, lora_rank: int = 0, seed: int = 0):
    """A random WanTransformer3DModel at the real width of `size` with `num_layers` blocks, in `dtype` (Wan's float32
    modules kept in float32, as `from_pretrained(dtype=...)` does), optionally under LoRA on the attention."""
    from diffusers import WanTransformer3DModel

    from video_branch.models.real_shapes import transformer_config
    from video_branch.models.wan import resolve_dtype

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**transformer_config(size, num_layers))
    keep = model._keep_in_fp32_modules or ()
    target = resolve_dtype(dtype)
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(target)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return model.train()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def measure_saved(model, batch: int, latent_fhw, text_len: int, checkpointing: bool, seed: int = 0) -> dict:
    """Bytes kept for backward by one forward + flow-matching loss of `batch` latents [16, F', h, w] against
    `text_len` text tokens: autograd's saved tensors (parameters excluded) by block, plus, with gradient
    checkpointing, the block inputs the checkpoints hold. `total` is what stays alive from forward to backward."""
    from video_branch.models.wan import module_dtype_device

    base = _base(model)
    if checkpointing:
        base.enable_gradient_checkpointing()
    else:
        base.disable_gradient_checkpointing()
    dtype, device = module_dtype_device(base)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, *latent_fhw, generator=g).to(device, dtype)
    text = torch.randn(batch, text_len, base.config.text_dim, generator=g).to(device, dtype)
    saved = SavedActivations(model.parameters())
    handles = saved.attribute(base.blocks)
    try:
        with saved.hooks():
            loss = _flow_matching_loss(model, latents, text, 0.6)
    finally:
        for h in handles:
            h.remove()
    del loss
    n = len(base.blocks)
    # A checkpoint saves its block's inputs before the block runs: count them as that block's held inputs.
    labels, held = saved.by_label(exclude_held=checkpointing), saved.held_by_label(include_saved=checkpointing)
    rec = {"batch": batch, "latent": list(latent_fhw), "text_len": text_len, "checkpointing": checkpointing,
           "layers": n, "outer": labels.get("outer", 0), "blocks": [labels.get(f"block{i}", 0) for i in range(n)],
           "held": [held.get(f"block{i}", 0) for i in range(n)] if checkpointing else [0] * n}
    rec["total"] = rec["outer"] + sum(rec["blocks"]) + sum(rec["held"])
    return rec


def _fit(rows: list[tuple[float, float, float]]) -> list[float]:
    """Least-squares [per token, per text token, constant] bytes per sample from (tokens, text tokens, bytes)."""
    a = torch.tensor([[t, l, 1.0] for t, l, _ in rows], dtype=torch.float64)
    b = torch.tensor([[y] for _, _, y in rows], dtype=torch.float64)
    return [float(v) for v in torch.linalg.lstsq(a, b).solution.flatten()]


VAE_POINTS = ((5, 64, 64), (9, 64, 64), (5, 128, 128), (9, 128, 128))  # frames, height, width


def peak_allocated(fn) -> int:
    """Peak bytes the CPU allocator holds above its level at the call, while `fn()` runs (torch profiler memory
    events: every allocation and free, so the peak includes the temporaries of every operator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each operator's own allocations (self: its children report theirs) and the frees recorded outside operators.
    events = sorted((e.time_range.end if e.name != "[memory]" else e.time_range.start, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def measure_rollout(model, batch: int, latent_fhw, text_len: int, seed: int = 0) -> int:
    """Peak transient bytes of one no-grad transformer forward (a rollout call), inputs and weights excluded."""
    from video_branch.models.wan import module_dtype_device

    base = _base(model)
    dtype, device = module_dtype_device(base)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, *latent_fhw, generator=g).to(device, dtype)
    text = torch.randn(batch, text_len, base.config.text_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 600.0, device=device)

    def fwd():
        with torch.no_grad():
            model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)

    fwd()  # warm-up: first-call allocations (kernels, caches) are not the steady state
    return peak_allocated(fwd)


def measure_vae_decode(vae, frames: int, height: int, width: int) -> int:
    """Peak transient bytes of decoding one clip of `frames` x `height` x `width` (float32, no grad)."""
    from video_branch.models.vae import decode_to_frames

    latents = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
    return peak_allocated(lambda: decode_to_frames(vae, latents))


def calibrate_inference(sizes, dtypes) -> dict:
    """Rollout-forward coefficients per size and dtype, and the VAE decode's, from allocator peaks."""
    out: dict = {}
    for size in sizes:
        for dtype in dtypes:
            model = real_transformer(size, 2, dtype).eval()
            rows = []
            for f, h, w, length in CALIBRATION_POINTS:
                rows.append((f * (h // 2) * (w // 2), length, measure_rollout(model, 1, (f, h, w), length)))
            out.setdefault(size, {})[dtype] = _fit(rows)
            print(f"calibrated rollout {size} {dtype}: {out[size][dtype][0]:.0f} B/token", flush=True)
            del model
    from diffusers import AutoencoderKLWan

    from video_branch.models.real_shapes import REAL_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**REAL_VAE).eval()
    rows = [(f * h * w, h * w, measure_vae_decode(vae, f, h, w)) for f, h, w in VAE_POINTS]
    a = torch.tensor([[x, y, 1.0] for x, y, _ in rows], dtype=torch.float64)
    b = torch.tensor([[z] for _, _, z in rows], dtype=torch.float64)
    vae_c = [float(v) for v in torch.linalg.lstsq(a, b).solution.flatten()]
    print(f"calibrated VAE decode: {vae_c[0]:.0f} B per frame-pixel, {vae_c[1]:.0f} B per pixel", flush=True)
    return {"inference": out, "vae": vae_c, "vae_points": rows}


def calibrate(sizes, dtypes, modes=("full", "lora")) -> dict:
    """Per-sample saved-activation coefficients of the planner, measured on 2-block models at the real widths."""
    out: dict = {}
    for size in sizes:
        for dtype in dtypes:
            for mode in modes:
                model = real_transformer(size, 2, dtype, LORA_RANK if mode == "lora" else 0)
                rows: dict[str, list] = {k: [] for k in ("outer", "first_block", "block", "outer_ckpt",
                                                          "first_held", "held")}
                for f, h, w, length in CALIBRATION_POINTS:
                    tokens = f * (h // 2) * (w // 2)
                    plain = measure_saved(model, 1, (f, h, w), length, False)
                    ckpt = measure_saved(model, 1, (f, h, w), length, True)
                    for key, value in (("outer", plain["outer"]), ("first_block", plain["blocks"][0]),
                                       ("block", plain["blocks"][1]), ("outer_ckpt", ckpt["outer"]),
                                       ("first_held", ckpt["held"][0]), ("held", ckpt["held"][1])):
                        rows[key].append((tokens, length, value))
                out.setdefault(size, {}).setdefault(dtype, {})[mode] = {k: _fit(v) for k, v in rows.items()}
                print(f"calibrated {size} {dtype} {mode}: block {out[size][dtype][mode]['block'][0]:.0f} B/token, "
                      f"{out[size][dtype][mode]['block'][1]:.0f} B/text token", flush=True)
                del model
    return out


VALIDATION_POINT = {"layers": 3, "batch": 2, "latent": (3, 12, 20), "text_len": 32}
VALIDATION_VAE = (13, 64, 96)


def _setting(size: str, layers: int, dtype: str, lora: bool, ckpt: bool, batch: int, latent, text_len: int):
    from video_branch.models.real_shapes import transformer_config
    from video_branch.planning import Architecture, Setting

    f, h, w = latent
    arch = Architecture.from_transformer_config(size, transformer_config(size, layers))
    return Setting(arch=arch, gpus=1, dtype=dtype, lora_rank=LORA_RANK if lora else 0, gradient_checkpointing=ckpt,
                   num_frames=4 * (f - 1) + 1, height=8 * h, width=8 * w, micro_batch=batch, cfg=False,
                   text_tokens=text_len, frontier_batch=batch, decode_batch=1)


def validation_rows(calibration: dict, point: dict = VALIDATION_POINT, vae_point=VALIDATION_VAE) -> list[dict]:
    """Predicted vs measured bytes at a size none of the calibration points has (depth, batch, tokens, text)."""
    from video_branch.planning import rollout_activations, training_activations, vae_decode

    rows = []
    for size, by_dtype in calibration.items():
        if size in ("vae", "vae_points"):
            continue
        for dtype, modes in by_dtype.items():
            if dtype == "inference":
                continue
            for mode in modes:
                model = real_transformer(size, point["layers"], dtype, LORA_RANK if mode == "lora" else 0)
                for ckpt in (False, True):
                    st = _setting(size, point["layers"], dtype, mode == "lora", ckpt, point["batch"],
                                  point["latent"], point["text_len"])
                    measured = measure_saved(model, point["batch"], point["latent"], point["text_len"], ckpt)["total"]
                    rows.append({"what": "training saved", "size": size, "dtype": dtype, "mode": mode,
                                 "checkpointing": ckpt, "layers": point["layers"], "batch": point["batch"],
                                 "tokens": st.tokens(), "text_len": point["text_len"],
                                 "predicted": training_activations(st, calibration)["saved"], "measured": measured})
                if mode == "full" and dtype in calibration[size].get("inference", {}):
                    st = _setting(size, point["layers"], dtype, False, False, point["batch"], point["latent"],
                                  point["text_len"])
                    rows.append({"what": "rollout forward", "size": size, "dtype": dtype, "mode": "-",
                                 "checkpointing": False, "layers": point["layers"], "batch": point["batch"],
                                 "tokens": st.tokens(), "text_len": point["text_len"],
                                 "predicted": rollout_activations(st, calibration),
                                 "measured": measure_rollout(model.eval(), point["batch"], point["latent"],
                                                             point["text_len"])})
                del model
    if "vae" in calibration:
        from diffusers import AutoencoderKLWan

        from video_branch.models.real_shapes import REAL_VAE

        torch.manual_seed(0)
        vae = AutoencoderKLWan(**REAL_VAE).eval()
        f, h, w = vae_point
        st = _setting("1.3b", 1, "float32", False, False, 1, (1 + (f - 1) // 4, h // 8, w // 8), 16)
        rows.append({"what": "VAE decode", "size": f"{f}x{h}x{w}", "dtype": "float32", "mode": "-",
                     "checkpointing": False, "layers": "-", "batch": 1, "tokens": st.tokens(), "text_len": "-",
                     "predicted": vae_decode(st, calibration), "measured": measure_vae_decode(vae, f, h, w)})
    for r in rows:
        r["error"] = r["predicted"] / r["measured"] - 1 if r["measured"] else float("inf")
    return rows


def validation_markdown(rows: list[dict]) -> str:
    lines = ["| what | model | dtype | training | checkpointing | layers x batch x tokens (+ text) | predicted (MiB) "
             "| measured (MiB) | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ckpt = "on" if r["checkpointing"] else "off"
        lines.append(f"| {r['what']} | {r['size']} | {r['dtype']} | {r['mode']} | {ckpt} "
                     f"| {r['layers']} x {r['batch']} x {r['tokens']} (+{r['text_len']}) | {r['predicted'] / MIB:.2f} "
                     f"| {r['measured'] / MIB:.2f} | {100 * r['error']:+.1f}% |")
    return "\n".join(lines)


def validate(args) -> int:
    from video_branch.planning import load_calibration

    torch.set_num_threads(args.threads)
    started = time.time()
    cal = load_calibration(args.validate)
    rows = validation_rows(cal)
    report = {"command": "python tools/bench_memory.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "point": VALIDATION_POINT, "rows": rows, "wall_s": time.time() - started,
              "max_abs_error": max(abs(r["error"]) for r in rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(validation_markdown(rows))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s); largest error {100 * report['max_abs_error']:.1f}%")
    return 0


def merge_calibration(training: dict, inference: dict) -> dict:
    """One coefficient tree: size -> dtype -> full/lora, size -> inference -> dtype, and the VAE's."""
    out = json.loads(json.dumps(training))
    for size, by_dtype in inference["inference"].items():
        out.setdefault(size, {})["inference"] = by_dtype
    out["vae"], out["vae_points"] = inference["vae"], inference["vae_points"]
    return out


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
    parser.add_argument("--calibrate", metavar="SIZES", help="instead of the settings above: measure the memory "
                        "planner's saved-activation coefficients on 2-block models at the real widths of these Wan "
                        "2.1 sizes (comma-separated: 1.3b,14b) and write them to --out")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="with --calibrate: compute dtypes to measure")
    parser.add_argument("--validate", type=Path, metavar="CALIBRATION",
                        help="instead of the settings above: compare the planner's activation predictions (from "
                             "this calibration JSON) with fresh measurements at sizes not used to calibrate")
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
    if args.calibrate:
        from video_branch.models.real_shapes import SIZES

        sizes = [x.strip().lower() for x in args.calibrate.split(",") if x.strip()]
        dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
        bad = [x for x in sizes if x not in SIZES]
        if bad or not sizes:
            parser.error(f"--calibrate: unknown sizes {bad or sizes}; accepted: {', '.join(SIZES)}")
        bad = [x for x in dtypes if x not in ("float32", "bfloat16")]
        if bad or not dtypes:
            parser.error(f"--dtypes: unknown dtypes {bad or dtypes}; accepted: float32, bfloat16")
        torch.set_num_threads(args.threads)
        started = time.time()
        report = {"command": "python tools/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "torch": torch.__version__, "points": [list(p) for p in CALIBRATION_POINTS], "lora_rank": LORA_RANK,
                  "coefficients": merge_calibration(calibrate(sizes, dtypes), calibrate_inference(sizes, dtypes))}
        report["wall_s"] = time.time() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
        return 0
    if args.validate:
        return validate(args)
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
