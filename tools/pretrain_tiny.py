"""Pretrain the embedded default model on toy-world clips and save it as a diffusers directory.

    python tools/pretrain_tiny.py --out assets/toy_wan           # the shipped model (docs/TOYWORLD.md: time)

Stages, each with a progress bar: (1) render a fixed dataset of clips for the training prompts; (2) train the VAE to
reconstruct them (ToyVAE by default, ``--vae wan`` for AutoencoderKLWan); (3) calibrate the reward's shape references
on ground-truth clips passed through that VAE; (4) encode the dataset and set the VAE's latents_mean/std; (5) train the
WanTransformer3DModel and the UMT5 text encoder jointly by flow matching, with 10% empty prompts for
classifier-free guidance, evaluating the reward on training prompts (fresh seeds) at intervals; (6) save the pipeline,
the reward calibration, a log and a loss curve. Everything is seeded: the same command gives the same weights
(up to floating-point non-determinism of multi-threaded CPU kernels).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_models.toyworld import ToyWorldReward, reference_statistics
from video_branch.models.tiny import build_tiny_wan
from video_branch.toyworld.generate import generate
from video_branch.toyworld.grammar import split_prompts, vocabulary
from video_branch.toyworld.render import DEFAULT_FRAMES, DEFAULT_SIZE, render_batch
from video_branch.toyworld.short_text import short_embeddings, short_text_attention
from video_branch.toyworld.vae import ToyVAE

TRANSFORMER_KWARGS = {
    "patch_size": (1, 2, 2), "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
    "freq_dim": 64, "ffn_dim": 256, "num_layers": 4, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
TEXT_KWARGS = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0}
WAN_VAE_KWARGS = {"base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                      "temperal_downsample": [False, True, True]}


def vae_schedule(opt, args):
    """The VAE's one-cycle learning rate, with a warm-up of at least 2 steps (OneCycleLR divides by its length - 1,
    so 5% of 20 steps raised ZeroDivisionError)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps,
                                               pct_start=max(0.05, 2.0 / args.vae_steps))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/toy_wan", help="output diffusers directory")
    p.add_argument("--log-dir", default=None, help="where to write the log and loss curve (default: --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="frame height and width")
    p.add_argument("--clips-per-prompt", type=int, default=32, help="dataset clips per training prompt")
    p.add_argument("--vae", choices=["toy", "wan"], default="toy")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-from", default=None,
                   help="take the VAE from this directory (written by a run with the same seed and VAE flags) "
                        "instead of training it; the random stream is advanced as training would, so the rest of "
                        "the run is the same as a full run's")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--object-weight", type=float, default=10.0, help="extra loss weight on object pixels")
    p.add_argument("--l1-weight", type=float, default=1.0, help="weight of the absolute error beside the squared one")
    p.add_argument("--vae-channels", default="64,128", help="ToyVAE widths at H/2-H/4 and at H/8")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3000, help="transformer steps")
    p.add_argument("--patch", default="1,2,2",
                   help="transformer patch size (t,h,w); 1,1,1 gives one token per latent cell")
    p.add_argument("--text-pad", type=int, default=16,
                   help="text length prompts are zero-padded to, in training and in the saved model's use")
    p.add_argument("--position-code", type=float, default=2.0,
                   help="amplitude of ToyVAE's latent position code, in latent standard deviations (0: none)")
    p.add_argument("--schedule-steps", type=int, default=6000,
                   help="length of the learning-rate schedule (warm-up, cosine decay), at least --steps: "
                        "train --steps steps of it")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also save the pipeline at every validation step, as <out>/checkpoints/step<N>")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text-lr", type=float, default=1e-3, help="text encoder learning rate (0 keeps it frozen)")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=500, help="steps between validation rewards")
    p.add_argument("--eval-clips", type=int, default=48, help="validation clips (training prompts, fresh seeds)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--select", choices=["last", "best"], default="last",
                   help="checkpoint to save: the last one, or the best validation overall reward")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only rewrite <out>/toyworld_reward.json from the directory's VAE")
    args = p.parse_args(argv)
    for flag, value, least in (("--vae-steps", args.vae_steps, 3), ("--steps", args.steps, 1),
                               ("--eval-every", args.eval_every, 1), ("--text-pad", args.text_pad, 8)):
        if value < least:
            p.error(f"{flag}: expected an integer >= {least}, got {value}")
    if args.schedule_steps < args.steps:
        p.error(f"--schedule-steps: expected at least --steps ({args.steps}), got {args.schedule_steps}")
    if args.text_pad > 512:
        p.error(f"--text-pad: expected at most 512 (WanPipeline's length), got {args.text_pad}")
    if not math.isfinite(args.position_code) or args.position_code < 0:
        p.error(f"--position-code: expected a finite number >= 0, got {args.position_code}")
    try:
        args.patch_size = patch_size(args.patch)
    except ValueError as e:
        p.error(str(e))
    return args


def patch_size(text: str) -> tuple[int, int, int]:
    """"1,2,2" -> (1, 2, 2); the latent (3 x 4 x 4 at 9 frames of 32x32) must divide by it."""
    try:
        t, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--patch: expected three integers t,h,w such as 1,2,2; got {text!r}") from None
    if min(t, h, w) < 1:
        raise ValueError(f"--patch: every entry must be >= 1, got {text!r}")
    return t, h, w


def set_text_length(model_dir: Path, length: int) -> None:
    """Record in ``<model_dir>/tokenizer/tokenizer_config.json`` (``model_max_length``) how many text tokens the
    saved transformer was trained to read."""
    cfg_file = Path(model_dir) / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_max_length"] = int(length)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def save_pipeline(pipe, model_dir: Path, text_pad: int) -> None:
    """``pipe.save_pretrained(model_dir)``, with the text length the transformer reads when it is below 512
    (``video_branch.toyworld.generate.native_text_length`` reads it back)."""
    pipe.save_pretrained(str(model_dir))
    if text_pad < 512:
        set_text_length(model_dir, text_pad)


def to_unit(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    return frames_u8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """Pixels that differ from the top-left pixel (the plain background): [B, 1, T, H, W] float."""
    return ((x - x[..., :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()


def train_vae(vae, data: torch.Tensor, args, rng: np.random.Generator, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = vae_schedule(opt, args)
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        x = to_unit(data[rng.integers(0, len(data), args.vae_batch)])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode_unclamped(z) if hasattr(vae, "decode_unclamped") else vae.decode(z).sample
        obj = object_mask(x)
        w = 1.0 + args.object_weight * obj
        rec_loss = (w * (rec - x) ** 2).mean() + args.l1_weight * (w * (rec - x).abs()).mean()
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        obj_err = (((rec.detach() - x).abs() * obj).sum() / obj.sum().clamp_min(1) / 3).item()
        log["vae_loss"].append(rec_loss.item())
        log["vae_object_error"].append(obj_err)
        bar.set_postfix(loss=f"{rec_loss.item():.4f}", obj_err=f"{obj_err:.3f}")
    vae.eval()


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
    out = [to_uint8(vae.decode(vae.encode(to_unit(frames[i:i + batch])).latent_dist.mode()).sample)
           for i in range(0, len(frames), batch)]
    return torch.cat(out)


@torch.no_grad()
def encode_dataset(vae, data: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([vae.encode(to_unit(data[i:i + batch])).latent_dist.mode() for i in range(0, len(data), batch)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def calibration_indices(n_clips: int, clips_per_prompt: int) -> np.ndarray:
    return np.arange(0, n_clips, max(1, clips_per_prompt // 2))


def write_calibration(vae, gt: torch.Tensor, prompts, out: Path):
    """Measure the reward's shape references on ground-truth clips after a VAE round trip; write them to
    ``out/toyworld_reward.json``. Returns (reward using them, reconstruction metrics)."""
    rec = reconstruct(vae, gt)
    means, cov = reference_statistics(rec, prompts)
    # A floor of 0.02^2 on the variances keeps the kernel finite where decoded ground truth barely varies.
    cov = (torch.tensor(cov) + 4e-4 * torch.eye(len(cov))).tolist()
    calibration = {"shape_prototypes": {s: [f] for s, f in means.items()}, "feature_covariance": cov,
                   "source": f"{len(prompts)} training-prompt clips decoded by this directory's VAE"}
    path = out / "toyworld_reward.json"
    path.write_text(json.dumps(calibration, indent=1))
    reward = ToyWorldReward(calibration=str(path), temporal=False)
    scores = reward(rec, [p.text for p in prompts])
    return reward, {"psnr": psnr(rec, gt), **{k: float(v.mean()) for k, v in scores.items()}}


def recalibrate(args) -> dict:
    """Rewrite ``<out>/toyworld_reward.json`` for an existing directory (after a change to the reward's features)."""
    from video_branch.toyworld.evaluate import load_pipeline

    vae = load_pipeline(args.out).vae
    rng = np.random.default_rng(args.seed)
    train_prompts, _ = split_prompts()
    prompts = [p for p in train_prompts for _ in range(args.clips_per_prompt)]
    seeds = rng.integers(0, 2**31 - 1, size=len(prompts))
    idx = calibration_indices(len(prompts), args.clips_per_prompt)
    gt = torch.from_numpy(render_batch([prompts[i] for i in idx], [seeds[i] for i in idx], args.frames, args.size))
    _, metrics = write_calibration(vae, gt, [prompts[i] for i in idx], Path(args.out))
    print(f"recalibrated {args.out}: reconstruction {metrics}")
    return metrics


def flow_matching_loss(transformer, x0, emb, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss on normalised latents x0 [B, C, F, h, w] with sigmas drawn as the sampler visits them."""
    b = x0.shape[0]
    u = torch.sigmoid(torch.randn(b, generator=gen))
    sigma = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=emb, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise - x0)


def validate(pipe, reward, prompts, seeds, guidance: float, num_frames: int, size: int, text_pad: int = 512) -> dict:
    frames = generate(pipe, prompts, seeds, guidance_scale=guidance, num_frames=num_frames, size=size,
                      max_sequence_length=text_pad)
    scores = reward(frames, prompts)
    return {k: float(v.mean()) for k, v in scores.items()}


def save_curve(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, key, title in ((axes[0], "vae_loss", "VAE reconstruction loss"),
                           (axes[1], "loss", "flow-matching loss")):
        y = np.asarray(log[key])
        if len(y):
            ax.plot(y, alpha=0.3)
            k = max(1, len(y) // 50)
            ax.plot(np.arange(len(y) - k + 1) + k - 1, np.convolve(y, np.ones(k) / k, mode="valid"))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    for key in ("colour", "shape", "direction", "overall"):
        xs = [e["step"] for e in log["validation"]]
        axes[2].plot(xs, [e[key] for e in log["validation"]], marker="o", label=key)
    axes[2].set_title("validation reward (training prompts)")
    axes[2].set_xlabel("step")
    axes[2].set_ylim(0, 1)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.calibrate_only:
        return recalibrate(args)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out
    out.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = {"args": vars(args), "vae_loss": [], "vae_object_error": [], "loss": [], "validation": [], "time_s": {}}
    t_start = time.time()

    train_prompts, _ = split_prompts()
    prompts = [p for p in train_prompts for _ in range(args.clips_per_prompt)]
    seeds = rng.integers(0, 2**31 - 1, size=len(prompts))
    data = torch.from_numpy(np.stack([render_batch([p], [s], args.frames, args.size)[0]
                                      for p, s in tqdm(list(zip(prompts, seeds)), desc="render", dynamic_ncols=True)]))
    texts = [p.text for p in prompts]
    log["time_s"]["render"] = time.time() - t_start

    t0 = time.time()
    if args.vae_from:
        vae_cls = ToyVAE if args.vae == "toy" else __import__("diffusers").AutoencoderKLWan
        vae = vae_cls.from_pretrained(str(Path(args.vae_from) / "vae")).eval()
        for _ in range(args.vae_steps):  # the batches train_vae would have drawn
            rng.integers(0, len(data), args.vae_batch)
        log["vae_from"] = str(args.vae_from)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 3)
            channels = tuple(int(c) for c in args.vae_channels.split(","))
            vae = ToyVAE(channels=channels) if args.vae == "toy" else __import__("diffusers").AutoencoderKLWan(
                **WAN_VAE_KWARGS)
        train_vae(vae, data, args, rng, log)
    log["time_s"]["vae"] = time.time() - t0

    calib_idx = calibration_indices(len(prompts), args.clips_per_prompt)
    reward, log["vae_reconstruction"] = write_calibration(vae, data[calib_idx], [prompts[i] for i in calib_idx], out)
    tqdm.write(f"VAE reconstruction: {log['vae_reconstruction']}")

    latents = encode_dataset(vae, data)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    if args.position_code and args.vae == "toy":
        vae.register_to_config(position_code=args.position_code)
        latents = latents + vae.position_offset(*latents.shape[3:])
    x0_all = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    pipe = build_tiny_wan(None, seed=args.seed, vocab=vocabulary(), transformer_kwargs={**TRANSFORMER_KWARGS,
                                                                           "patch_size": args.patch_size},
                          vae=vae, text_kwargs=TEXT_KWARGS, shift=3.0)
    transformer, text_encoder = pipe.transformer, pipe.text_encoder
    shift = pipe.scheduler.config.shift
    groups = [{"params": list(transformer.parameters()), "lr": args.lr}]
    if args.text_lr > 0:
        groups.append({"params": list(text_encoder.parameters()), "lr": args.text_lr})
    else:
        text_encoder.requires_grad_(False)
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    horizon = args.schedule_steps
    warmup = min(200, horizon // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
                       * (0.5 * (1 + math.cos(math.pi * min(s, horizon) / horizon)) * 0.9 + 0.1))
    gen = torch.Generator().manual_seed(args.seed + 4)
    val_prompts = [train_prompts[i % len(train_prompts)].text for i in range(args.eval_clips)]
    val_seeds = [10_000 + i for i in range(args.eval_clips)]
    checkpoints = {}

    def checkpoint(step):
        transformer.eval()
        text_encoder.eval()
        v = validate(pipe, reward, val_prompts, val_seeds, args.guidance, args.frames, args.size, args.text_pad)
        v["step"] = step
        log["validation"].append(v)
        checkpoints[step] = (copy.deepcopy(transformer.state_dict()), copy.deepcopy(text_encoder.state_dict()))
        if args.keep_checkpoints:
            save_pipeline(pipe, out / "checkpoints" / f"step{step}", args.text_pad)
        tqdm.write(f"step {step}: validation " + ", ".join(f"{k} {x:.3f}" for k, x in v.items() if k != "step"))
        transformer.train()
        text_encoder.train(args.text_lr > 0)

    t0 = time.time()
    transformer.train()
    text_encoder.train(args.text_lr > 0)
    bar = tqdm(range(args.steps), desc="transformer", dynamic_ncols=True)
    for step in bar:
        idx = rng.integers(0, len(data), args.batch)
        batch_texts = ["" if rng.random() < args.cfg_dropout else texts[i] for i in idx]
        with short_text_attention(transformer) as fast_attn:
            emb, fast_attn["bias"] = short_embeddings(pipe.tokenizer, text_encoder, batch_texts, args.text_pad)
            loss = flow_matching_loss(transformer, x0_all[idx], emb, shift, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
    log["time_s"]["transformer"] = time.time() - t0

    if args.select == "best":
        chosen = max(log["validation"], key=lambda v: v["overall"])["step"]
    else:
        chosen = log["validation"][-1]["step"]
    tr_state, te_state = checkpoints[chosen]
    transformer.load_state_dict(tr_state)
    text_encoder.load_state_dict(te_state)
    log["selected_step"] = chosen
    transformer.eval()
    text_encoder.eval()
    save_pipeline(pipe, out, args.text_pad)
    log["time_s"]["total"] = time.time() - t_start
    (log_dir / "pretrain_log.json").write_text(json.dumps(log))
    save_curve(log, log_dir / "loss_curve.png")
    tqdm.write(f"saved {out} (step {chosen}) in {log['time_s']['total'] / 60:.1f} min")
    return log


if __name__ == "__main__":
    main()
