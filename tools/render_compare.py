#!/usr/bin/env python
"""Render the same prompts with the same seeds from several models, side by side, into an mp4 and a contact sheet.

Every model starts each prompt from the same initial noise (the prompt's seed), so the columns differ only by the
models. Models are diffusers Wan directories, run directories (their final/, else their newest checkpoint), or
DeepSpeed checkpoints of a run (``runs/<name>/checkpoints/<tag>``). Example (embedded default)::

    python tools/render_compare.py --model base=assets/toy_wan --model runs/branchgrpo \\
        --prompt "a red circle moving left" --prompt "a blue square moving up" --seeds 0 1 \\
        --reward temporal_consistency --out compare.mp4

The mp4 plays the prompts one after another (``--repeat`` times each); every frame shows the models' clips side by
side, each column labelled with its model's name, the prompt and seed as a caption, and, with ``--reward``, each
clip's scores under it. The PNG contact sheet shows selected frames (``--sheet-frames``) of every clip, one row per
prompt, and a JSON file next to the mp4 records the settings and the scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
SCORE_TEXT = (170, 220, 255)


class UserError(Exception):
    """A bad option or input file: reported in one line, without a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one and the help text does not already describe it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] or default == "" \
                or default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------------ options
def parse_reward(spec: str):
    """``name`` or ``name:key=value,key=value`` -> (name, options); values are parsed as YAML scalars."""
    import yaml

    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--reward {spec!r}: options must look like key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    if not name.strip():
        raise UserError(f"--reward {spec!r}: missing the reward's name")
    return name.strip(), options


def build_rewards(specs: Sequence[str]):
    """[(name, rm)] from ``--reward`` specs; unknown names and options become UserError."""
    import reward_models

    out = []
    for spec in specs:
        name, options = parse_reward(spec)
        try:
            out.append((name, reward_models.build(name, **options)))
        except (KeyError, TypeError) as err:
            raise UserError(f"--reward {spec!r}: {err.args[0] if err.args else err}") from err
    return out


def score_clips(rewards, frames, prompts: list[str]):
    """Score clips with every reward -> ({term: [per clip]}, headline terms).

    A reward's headline is its own-named term when it has one (temporal_consistency), else all of its terms
    (videoalign: VQ, MQ, TA, Overall). A term named by two rewards keeps the first reward's value.
    """
    scores: dict[str, list[float]] = {}
    headline: list[str] = []
    for name, rm in rewards:
        out = rm(frames, prompts)
        for key, value in out.items():
            scores.setdefault(key, [float(v) for v in value.detach().cpu().float()])
        headline += [name] if name in out else list(out)
    return scores, list(dict.fromkeys(headline))


def pick_keys(scores: dict[str, list[float]], headline: list[str], requested: list[str] | None) -> list[str]:
    """Terms printed under the clips: the requested ones (checked), else the headline terms."""
    if not requested:
        return headline
    missing = [k for k in requested if k not in scores]
    if missing:
        raise UserError(f"--score-keys: {missing} not among the rewards' terms ({', '.join(scores)})")
    return list(requested)


def read_prompt_args(prompts: list[str], prompt_file: str | None) -> list[str]:
    from video_branch.data import PromptFileError, read_prompts

    out = list(prompts or [])
    if prompt_file:
        try:
            out += read_prompts(prompt_file, key="--prompts")
        except PromptFileError as err:
            raise UserError(str(err)) from err
    if not out:
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)")
    return out


def seeds_for(seeds: list[int] | None, n: int) -> list[int]:
    """One seed per prompt: the given list (its length must be n, or 1 to share it), else 0..n-1."""
    if not seeds:
        return list(range(n))
    if len(seeds) == 1:
        return seeds * n
    if len(seeds) != n:
        raise UserError(f"--seeds: give one seed per prompt ({n}) or a single seed, got {len(seeds)}")
    return list(seeds)


# ------------------------------------------------------------------------------------------------------- layout
def text_width(text: str, scale: float, thickness: int = 1) -> int:
    import cv2

    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def line_height(scale: float) -> int:
    import cv2

    (_, h), base = cv2.getTextSize("Ag", FONT, scale, 1)
    return h + base + max(2, int(6 * scale))


def fit(text: str, max_width: int, scale: float) -> str:
    """The text, shortened with '...' until it fits max_width pixels."""
    if text_width(text, scale) <= max_width:
        return text
    while text and text_width(text + "...", scale) > max_width:
        text = text[:-1]
    return text + "..."


def wrap(text: str, max_width: int, scale: float) -> list[str]:
    """Greedy word wrap to max_width pixels (a word too long for a line is cut with '...')."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(lines[-1] + " " + word, scale) <= max_width:
            lines[-1] += " " + word
        else:
            lines.append(fit(word, max_width, scale))
    return lines or [""]


def put_text(img: np.ndarray, text: str, x: int, y_top: int, scale: float, colour=TEXT, centre_width: int = 0):
    """Draw text with its top at y_top; centred in [x, x + centre_width) when centre_width > 0."""
    import cv2

    (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
    if centre_width:
        x += max(0, (centre_width - w) // 2)
    cv2.putText(img, text, (int(x), int(y_top + h + max(1, int(3 * scale)))), FONT, scale, colour, 1, cv2.LINE_AA)


@dataclass
class Layout:
    """Pixel geometry of one composed frame: a header of labels, the cells, score lines, a caption."""

    columns: int
    cell_h: int
    cell_w: int
    margin: int
    line_h: int
    score_lines: int
    caption_lines: int

    @property
    def width(self) -> int:
        raw = self.columns * self.cell_w + (self.columns + 1) * self.margin
        return raw + raw % 2  # H.264 in yuv420p needs even sizes

    @property
    def cells_top(self) -> int:
        return self.margin + self.line_h

    @property
    def height(self) -> int:
        raw = self.cells_top + self.cell_h + self.margin + (self.score_lines + self.caption_lines) * self.line_h
        raw += self.margin
        return raw + raw % 2

    def x(self, column: int) -> int:
        return self.margin + column * (self.cell_w + self.margin)


def compose(layout: Layout, cells: list[np.ndarray], labels: list[str], scores: list[list[str]],
            caption: list[str], scale: float) -> np.ndarray:
    """One frame [height, width, 3]: labels over the cells, score lines under each, the caption at the bottom."""
    img = np.empty((layout.height, layout.width, 3), np.uint8)
    img[:] = BACKGROUND
    for c, (cell, label) in enumerate(zip(cells, labels)):
        x = layout.x(c)
        put_text(img, fit(label, layout.cell_w, scale), x, layout.margin // 2, scale, centre_width=layout.cell_w)
        img[layout.cells_top:layout.cells_top + layout.cell_h, x:x + layout.cell_w] = cell
        y = layout.cells_top + layout.cell_h + layout.margin // 2
        for line in scores[c] if scores else []:
            put_text(img, fit(line, layout.cell_w, scale), x, y, scale, SCORE_TEXT)
            y += layout.line_h
    y = layout.cells_top + layout.cell_h + layout.margin // 2 + layout.score_lines * layout.line_h
    for line in caption:
        put_text(img, line, layout.margin, y, scale)
        y += layout.line_h
    return img


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of [..., H, W, 3] by an integer factor (pixels stay crisp)."""
    if scale == 1:
        return frames
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def score_lines(keys: list[str], scores: dict[str, list[float]], row: int) -> list[str]:
    return [f"{k}: {scores[k][row]:.3f}" if math.isfinite(scores[k][row]) else f"{k}: n/a" for k in keys]


def caption_for(prompt: str, seed: int) -> str:
    return f"{prompt}   (seed {seed})"


def render(clips: list[np.ndarray], names: list[str], prompts: list[str], seeds: list[int],
           scores: list[dict[str, list[float]]] | None, keys: list[str], *, scale: int, margin: int,
           font_scale: float, repeat: int, sheet_frames: list[int]):
    """Compose the comparison video frames [P * T * repeat, H, W, 3] and the contact sheet [H', W', 3].

    clips: one uint8 array [P, T, h, w, 3] per model; scores: one {term: [P]} per model (or None).
    """
    num_p, num_t, h, w, _ = clips[0].shape
    gap = max(1, margin // 2)
    line_h = line_height(font_scale)
    full_w = len(clips) * w * scale + (len(clips) + 1) * margin - 2 * margin
    captions = [wrap(caption_for(p, s), full_w, font_scale) for p, s in zip(prompts, seeds)]
    n_caption = max(len(c) for c in captions)
    n_scores = len(keys) if scores else 0

    def columns_scores(row):
        return [score_lines(keys, sc, row) for sc in scores] if scores else []

    layout = Layout(len(clips), h * scale, w * scale, margin, line_h, n_scores, n_caption)
    video = []
    for p in range(num_p):
        lines = columns_scores(p)
        caption = captions[p] + [""] * (n_caption - len(captions[p]))
        segment = [compose(layout, [upscale(c[p, t], scale) for c in clips], names, lines, caption, font_scale)
                   for t in range(num_t)]
        video += segment * repeat
    k = len(sheet_frames)
    sheet_layout = Layout(len(clips), h * scale, k * w * scale + (k - 1) * gap, margin, line_h, n_scores, n_caption)
    rows = []
    for p in range(num_p):
        cells = []
        for c in clips:
            strip = np.empty((h * scale, sheet_layout.cell_w, 3), np.uint8)
            strip[:] = BACKGROUND
            for j, t in enumerate(sheet_frames):
                x = j * (w * scale + gap)
                strip[:, x:x + w * scale] = upscale(c[p, t], scale)
            cells.append(strip)
        labels = [f"{n}  [frames {', '.join(str(t % num_t) for t in sheet_frames)}]" for n in names]
        caption = captions[p] + [""] * (n_caption - len(captions[p]))
        rows.append(compose(sheet_layout, cells, labels, columns_scores(p), caption, font_scale))
    return np.stack(video), np.concatenate(rows, axis=0)


def parse_sheet_frames(spec: str | None, num_frames: int) -> list[int]:
    """'0,4,-1' -> frame indices (negatives count from the end); None -> up to 4 evenly spaced frames."""
    if not spec:
        count = min(4, num_frames)
        return sorted(set(np.linspace(0, num_frames - 1, count).round().astype(int).tolist()))
    try:
        idx = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sheet-frames {spec!r}: expected comma-separated frame indices, e.g. 0,4,8") from None
    bad = [i for i in idx if not -num_frames <= i < num_frames]
    if bad or not idx:
        raise UserError(f"--sheet-frames {spec!r}: indices must lie in [-{num_frames}, {num_frames - 1}] "
                        f"(clips have {num_frames} frames)")
    return [i % num_frames for i in idx]


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="render_compare.py",
        description="Render the same prompts with the same seeds from two or more models, side by side, into an "
                    "H.264 mp4 and a PNG contact sheet.",
        formatter_class=HelpFormatter)
    p.add_argument("--model", "-m", action="append", required=True, metavar="[NAME=]PATH",
                   help="a model: diffusers Wan directory, run directory (final/ or newest checkpoint), or a run's "
                        "checkpoints/<tag>; repeat for each column. NAME labels the column")
    p.add_argument("--prompt", "-p", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompt file, one prompt per line (# starts a comment)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="one seed per prompt, or one seed for all (default: 0, 1, 2, ...)")
    p.add_argument("--steps", type=int, default=20, help="ODE denoising steps")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 disables CFG)")
    p.add_argument("--negative-prompt", default="", help="negative prompt of CFG")
    p.add_argument("--shift", type=float, default=None,
                   help="flow shift (default: the first model's scheduler config, else 3.0)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 4k+1 (default: run config, else 9)")
    p.add_argument("--height", type=int, default=None,
                   help="clip height, multiple of 16 (default: run config, else 32)")
    p.add_argument("--width", type=int, default=None, help="clip width, multiple of 16 (default: run config, else 32)")
    p.add_argument("--fps", type=float, default=None, help="frames per second of the mp4 (default: run config, else 8)")
    p.add_argument("--resolution", metavar="HxW", help="shorthand for --height and --width, e.g. 480x832")
    p.add_argument("--scale", type=int, default=0,
                   help="integer nearest-neighbour enlargement of the clips (0: auto, about 256 px wide)")
    p.add_argument("--margin", type=int, default=8, help="pixels between and around the columns")
    p.add_argument("--font-scale", type=float, default=0.5, help="OpenCV font scale of labels and captions")
    p.add_argument("--repeat", type=int, default=1, help="times each prompt's clip plays in the mp4")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="score each clip and print the scores under it, e.g. temporal_consistency or "
                        "videoalign:path=/ckpt/VideoReward (repeatable)")
    p.add_argument("--score-keys", nargs="+", metavar="KEY", help="reward terms to print (default: the headline ones)")
    p.add_argument("--sheet-frames", metavar="I,J,...", help="frames shown in the contact sheet (default: 4 spread)")
    p.add_argument("--out", "-o", default="compare.mp4", help="output mp4")
    p.add_argument("--sheet", help="output PNG contact sheet (default: the mp4's path with .png)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="transformer and text encoder dtype")
    p.add_argument("--frontier-batch", type=int, default=32, help="clips per transformer call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _positive(name: str, value, minimum=1):
    if value is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def run_defaults(sources) -> dict:
    """Video settings of the first model that comes from a run (its config.yaml), else the config defaults."""
    from video_branch.config import VideoConfig

    out = {"num_frames": VideoConfig.num_frames, "height": VideoConfig.height, "width": VideoConfig.width,
           "fps": VideoConfig.fps}
    for src in sources:
        video = run_section(src, "video")
        if video is not None:
            out.update({k: video[k] for k in out if k in video})
            break
    return out


def run_section(source, key: str) -> dict | None:
    """Section ``key`` of the config.yaml of the run a model comes from ({} when absent); None when the model is not
    from a run, or the run has no config.yaml."""
    import yaml

    cfg_file = source.run_dir / "config.yaml" if source.run_dir is not None else None
    if cfg_file is None or not cfg_file.is_file():
        return None
    return (yaml.safe_load(cfg_file.read_text()) or {}).get(key) or {}


def text_length(source) -> int:
    """Text tokens to pad prompts to for this model: its run's ``model.max_sequence_length`` (config.yaml) when it
    comes from a run, else what its pipeline directory declares (``native_text_length``: 512 for Wan)."""
    from video_branch.engine.sampling import base_model_path
    from video_branch.toyworld.generate import native_text_length

    model = run_section(source, "model") or {}
    if isinstance(model.get("max_sequence_length"), int):
        return int(model["max_sequence_length"])
    return native_text_length(source.path if source.kind == "diffusers" else base_model_path(source.run_dir))


def scheduler_shift(source) -> float | None:
    """The flow shift in the model's scheduler config (FlowMatchEuler 'shift' or UniPC 'flow_shift')."""
    from video_branch.engine.sampling import base_model_path

    folder = source.path if source.kind == "diffusers" else base_model_path(source.run_dir)
    cfg_file = Path(folder) / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    value = cfg.get("flow_shift") if cfg.get("use_flow_sigmas") else cfg.get("shift", cfg.get("flow_shift"))
    return float(value) if value is not None else None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def quiet_libraries() -> None:
    """Hide the libraries' per-load progress bars and info logs: our own bar reports progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run(args) -> int:
    from tqdm import tqdm

    from video_branch.engine.sampling import generate, load_source, resolve_source
    from video_branch.video import write_mp4

    if len(args.model) < 1:
        raise UserError("give at least one --model")
    sources = [resolve_source(spec) for spec in args.model]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"models share the name(s) {dupes}: label them with --model NAME=PATH")
    if args.resolution:
        try:
            args.height, args.width = (int(v) for v in args.resolution.lower().split("x"))
        except ValueError:
            raise UserError(f"--resolution {args.resolution!r}: expected HxW, e.g. 480x832") from None
    for name in ("steps", "frames", "height", "width", "repeat", "frontier_batch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--scale", args.scale, 0)
    _positive("--margin", args.margin, 0)
    if args.fps is not None and args.fps <= 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    prompts = read_prompt_args(args.prompt, args.prompts)
    seeds = seeds_for(args.seeds, len(prompts))
    defaults = run_defaults(sources)
    num_frames = args.frames or defaults["num_frames"]
    height, width = args.height or defaults["height"], args.width or defaults["width"]
    fps = args.fps or defaults["fps"]
    shift = args.shift if args.shift is not None else (scheduler_shift(sources[0]) or 3.0)
    scale = args.scale or max(1, 256 // width)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {out}: the output must be an .mp4 file")
    sheet = Path(args.sheet) if args.sheet else out.with_suffix(".png")
    sheet_frames = parse_sheet_frames(args.sheet_frames, num_frames)
    rewards = build_rewards(args.reward)
    quiet_libraries()

    clips, scores = [], []
    total = len(sources) * (args.steps + 1 + (1 if rewards else 0))
    with tqdm(total=total, desc="render", unit="step", disable=args.quiet, file=sys.stderr) as bar:
        for src in sources:
            bar.set_description(f"{src.name}: load")
            models = load_source(src, dtype=args.dtype, device=device)
            bar.set_description(f"{src.name}: sample")
            base = bar.n

            def progress(done, _total, base=base):
                bar.update(base + done - bar.n)

            frames = generate(models, prompts, seeds, num_steps=args.steps, guidance_scale=args.guidance,
                              shift=shift, num_frames=num_frames, height=height, width=width,
                              negative_prompt=args.negative_prompt, frontier_batch=args.frontier_batch,
                              progress=progress, max_sequence_length=text_length(src))
            del models
            if rewards:
                bar.set_description(f"{src.name}: score")
                model_scores, headline = score_clips(rewards, frames, prompts)
                scores.append(model_scores)
                bar.update(1)
            clips.append(frames.numpy())
        bar.set_description("compose")
    keys = pick_keys(scores[0], headline, args.score_keys) if rewards else []
    video, contact = render(clips, names, prompts, seeds, scores if rewards else None, keys, scale=scale,
                            margin=args.margin, font_scale=args.font_scale, repeat=args.repeat,
                            sheet_frames=sheet_frames)
    write_mp4(out, video, fps=fps)
    import cv2

    sheet.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(sheet), cv2.cvtColor(contact, cv2.COLOR_RGB2BGR)):
        raise UserError(f"--sheet {sheet}: cannot write the PNG there")
    record = {
        "models": [{"name": s.name, "kind": s.kind, "path": str(s.path), "tag": s.tag} for s in sources],
        "prompts": prompts, "seeds": seeds,
        "settings": {"steps": args.steps, "guidance": args.guidance, "negative_prompt": args.negative_prompt,
                     "shift": shift, "frames": num_frames, "height": height, "width": width, "fps": fps,
                     "scale": scale, "dtype": args.dtype},
        "video": {"path": str(out), "frames": int(video.shape[0]), "height": int(video.shape[1]),
                  "width": int(video.shape[2])},
        "sheet": str(sheet),
        "scores": {s.name: sc for s, sc in zip(sources, scores)},
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}), {sheet}, "
          f"{out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from video_branch.video import VideoReadError

    try:
        return run(args)
    except (UserError, FileNotFoundError, ValueError, VideoReadError) as err:
        if args.debug:
            raise
        print(f"render_compare.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
