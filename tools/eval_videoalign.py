#!/usr/bin/env python
"""Evaluate a generator with VideoAlign, or VideoAlign itself on VideoGen-RewardBench.

Generator evaluation (``generate``): sample one clip per (prompt, seed) with fixed seeds, write it as mp4, score the
decoded mp4 with VideoAlign (VQ, MQ, TA, Overall) and the temporal-consistency reward, and write::

    OUT/videos/<id>.mp4     the clips; id = p<prompt index, 5 digits>_c<clip index>: p00000_c0, p00000_c1, p00001_c0
    OUT/results.jsonl       one row per scored clip: id, prompt, seed, video, and every score
    OUT/summary.json        mean, 95% confidence interval (normal, 1.96 s / sqrt(n)) and n per metric
    OUT/summary.md          the same as a markdown table
    OUT/settings.json       the settings the folder was made with (a rerun with other settings is refused); written
                            once the reward models load, so a mistyped --videoalign leaves nothing behind

Given ``--baseline`` (another evaluation's folder or results.jsonl with the same prompts and seeds), clips are paired
by (prompt, seed) and the summary adds the mean paired difference with its confidence interval and the win / tie /
loss rates. Reruns skip clips already in results.jsonl; a clip whose mp4 exists but is unscored is scored from the
file. A missing or corrupt mp4 is reported and regenerated (with ``--model``) or skipped (without it: scoring videos
made elsewhere, named OUT/videos/<id>.mp4); a clip the rewards cannot score is reported and left out (a rerun tries
it again). VideoAlign samples each file at the frame rate its container states.

Reward-model evaluation (``rewardbench``): a VideoGen-RewardBench CSV (path_A, path_B, prompt, VQ, MQ, TA, Overall
with labels A / B / same; its fps and num_frames columns are not used: as in the released evaluation, a video is
sampled at its container's frame rate). Each video is scored once per prompt (cached in OUT/scores.jsonl, keyed by
the CSV's path and prompt; prefill it to evaluate scores from elsewhere); a video that cannot be read or scored is
recorded there with its error, its pairs are skipped, and a rerun without --videoalign reports it again (with
--videoalign it is tried again). Per dimension: accuracy without ties (pairs labelled same are left out; a zero score
difference counts as wrong) and accuracy with ties as the released calc_accuracy.py defines it (Deutsch et al. 2023,
"Ties Matter"): pairs sorted by |difference| (stable), the first k of them predicted ties and the others the side
of their sign, best k from 1 to N, reported with the |difference| of the k-th pair as the tie threshold.

Results files are JSON lines; a torn last line (an interrupted write) is dropped with a warning before the next
append, and any other line that is not a JSON object stops the run with an error naming the file and the line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from render_compare import HelpFormatter, UserError, parse_reward, quiet_libraries, resolve_device, run_defaults

VIDEOALIGN_KEYS = ("VQ", "MQ", "TA", "Overall")
MAIN_KEYS = (*VIDEOALIGN_KEYS, "temporal_consistency")
LABELS = {"A": 1, "B": -1, "same": 0}
Z95 = 1.959963984540054


# -------------------------------------------------------------------------------------------------------- stats
def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, 95% CI half-width (normal approximation) and n of the finite values (CI NaN for n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    std = float(x.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "std": std, "ci95": Z95 * std / math.sqrt(n) if n > 1 else float("nan"), "n": n}


def paired_difference(ours: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Paired differences ours - base over pairs where both are finite: mean, CI, and win / tie / loss rates."""
    a, b = np.asarray(ours, np.float64), np.asarray(base, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    out = mean_ci(d)
    n = max(d.size, 1)
    out.update(win_rate=float((d > 0).sum() / n) if d.size else float("nan"),
               tie_rate=float((d == 0).sum() / n) if d.size else float("nan"),
               loss_rate=float((d < 0).sum() / n) if d.size else float("nan"))
    return {"mean_diff": out.pop("mean"), **out}


def accuracy_without_ties(human: Sequence[int], diff: Sequence[float]) -> float:
    """Share of pairs with a preference (human label +1 / -1) whose score difference has the same sign.

    human: N labels (1: A preferred, -1: B, 0: tie); diff: N score differences score(A) - score(B).
    Human ties are left out; a zero difference counts as a wrong prediction. NaN when no pair has a preference.
    """
    h, m = np.asarray(human), np.asarray(diff, np.float64)
    pref = h != 0
    if not pref.any():
        return float("nan")
    return float((h[pref] * m[pref] > 0).mean())


def accuracy_with_ties(human: Sequence[int], diff: Sequence[float]) -> tuple[float, float]:
    """Tie-calibrated pairwise accuracy as the released calc_accuracy.py computes it.

    Pairs are sorted by |diff| (stable: equal |diff| keep their input order); for k = 1..N the first k pairs are
    predicted ties and the others the side their sign gives; a pair is right when a predicted tie meets a human
    tie (label 0) or a predicted side meets the human preference. Returns (best accuracy, the |diff| of the k-th
    pair for the first best k). The sweep starts at one predicted tie, and a run of equal |diff| may be split, as
    in the released code. (NaN, NaN) for no pairs. O(N log N).
    """
    h, m = np.asarray(human), np.asarray(diff, np.float64)
    if h.size == 0:
        return float("nan"), float("nan")
    a = np.abs(m)
    order = np.argsort(a, kind="stable")
    a, h, m = a[order], h[order], m[order]
    ties_in = np.cumsum(h == 0)  # human ties among the first k (predicted ties): right
    agree = (h != 0) & (h * m > 0)
    agree_out = agree.sum() - np.cumsum(agree)  # preferences after the first k with the right sign
    correct = ties_in + agree_out
    k = int(np.argmax(correct))  # the first maximum, as the released code keeps the first strict improvement
    return float(correct[k] / h.size), float(a[k])


# ------------------------------------------------------------------------------------------------------ prompts
def read_prompt_set(path: str) -> list[str]:
    """Prompts from a TXT file (one per line) or a CSV with a `prompt_en` or `prompt` column (duplicates dropped,
    first occurrence order kept: VideoAlign's evaluation CSVs repeat a prompt per compared pair)."""
    from video_branch.data import PromptFileError, read_prompts

    p = Path(path)
    if p.suffix.lower() != ".csv":
        try:
            return read_prompts(p, key="--prompts")
        except PromptFileError as err:
            raise UserError(str(err)) from err
    rows = read_csv(p, "--prompts")
    column = next((c for c in ("prompt_en", "prompt") if c in rows[0]), None)
    if column is None:
        raise UserError(f"--prompts {p}: a CSV needs a 'prompt_en' or 'prompt' column, found {list(rows[0])}")
    prompts = list(dict.fromkeys(r[column].strip() for r in rows if (r.get(column) or "").strip()))
    if not prompts:
        raise UserError(f"--prompts {p}: column '{column}' holds no prompts")
    return prompts


def read_csv(path: Path, option: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{option} {path}: cannot be read as CSV: {err}") from err
    if not rows:
        raise UserError(f"{option} {path}: no rows")
    return rows


# ------------------------------------------------------------------------------------------------------ records
def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file ([] when it does not exist). A last line without its newline that is not valid
    JSON (an interrupted write) is left out; any other line that is not a JSON object raises UserError naming the
    file and the line."""
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read: {err}") from err
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):  # no newline after it: torn by an interrupted write
                continue
            raise UserError(f"{path} line {i}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def repair_jsonl(path: Path) -> None:
    """Make ``path`` end with a newline before rows are appended: a torn last line (an interrupted write) is
    dropped with a warning; a complete last row that only lacks its newline gets it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"warning: {path}: dropped a torn last line ({len(tail)} bytes, an interrupted write)", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(cut)
        return
    with path.open("ab") as f:
        f.write(b"\n")


def append_jsonl(path: Path, rows: list[dict]) -> None:
    repair_jsonl(path)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def metric_keys(rows: list[dict]) -> list[str]:
    """Numeric score keys of the rows: the main ones first, then the others in first-seen order."""
    skip = {"prompt_index", "clip", "seed"}
    seen = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in skip and (isinstance(v, (int, float)) or v is None)
                              and not isinstance(v, bool)))
    return [k for k in MAIN_KEYS if k in seen] + [k for k in seen if k not in MAIN_KEYS]


def summarise(rows: list[dict], baseline_rows: list[dict] | None = None) -> dict:
    keys = metric_keys(rows)
    summary = {"n_clips": len(rows),
               "metrics": {k: mean_ci([r[k] if r.get(k) is not None else float("nan") for r in rows]) for k in keys}}
    if baseline_rows is not None:
        base = {(r["prompt"], r["seed"]): r for r in baseline_rows}
        pairs = [(r, base[(r["prompt"], r["seed"])]) for r in rows if (r["prompt"], r["seed"]) in base]
        nan = float("nan")
        summary["baseline"] = {
            "n_pairs": len(pairs),
            "metrics": {k: paired_difference([o.get(k) if o.get(k) is not None else nan for o, _ in pairs],
                                             [b.get(k) if b.get(k) is not None else nan for _, b in pairs])
                        for k in keys if any(k in b for _, b in pairs)},
        }
    return summary


def markdown_table(summary: dict, title: str) -> str:
    has_base = "baseline" in summary
    head = "| metric | mean | 95% CI | n |"
    rule = "|---|---:|---:|---:|"
    if has_base:
        head += " Δ vs baseline | 95% CI | win | tie | loss |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [f"### {title}", "", f"{summary['n_clips']} clips"
             + (f", {summary['baseline']['n_pairs']} paired with the baseline" if has_base else ""), "", head, rule]
    for k, s in summary["metrics"].items():
        line = f"| {k} | {_fmt(s['mean'])} | ± {_fmt(s['ci95'])} | {s['n']} |"
        if has_base:
            d = summary["baseline"]["metrics"].get(k)
            if d is None:
                line += " | | | | |"
            else:
                line += (f" {d['mean_diff']:+.3f} | ± {_fmt(d['ci95'])} | {_pct(d['win_rate'])} | "
                         f"{_pct(d['tie_rate'])} | {_pct(d['loss_rate'])} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%"


def write_json(path: Path, obj) -> None:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------ scoring
def build_videoalign(args, video_fps: float):
    import reward_models

    options = {}
    for spec in args.videoalign_option or []:
        options.update(parse_reward("videoalign:" + spec)[1])
    options.setdefault("video_fps", video_fps)
    options.setdefault("device", resolve_device(args.device))
    if args.videoalign_base:
        options["base_model"] = args.videoalign_base
    try:
        return reward_models.build("videoalign", path=args.videoalign, **options)
    except (KeyError, TypeError) as err:
        raise UserError(f"--videoalign-option: {err.args[0] if err.args else err}") from err
    except FileNotFoundError as err:
        raise UserError(f"--videoalign {args.videoalign}: {err}") from err


def container_fps(path: Path) -> float | None:
    """The frame rate a video file's container states (decord's average rate, what the released VideoAlign code
    samples by; ffmpeg's where decord cannot open the file); None when neither can tell."""
    try:
        import decord

        fps = float(decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1).get_avg_fps())
    except Exception:  # decord's own errors (see video_branch.video): try ffmpeg's header
        fps = None
        try:
            import imageio_ffmpeg

            gen = imageio_ffmpeg.read_frames(str(path))
            fps = float(next(gen).get("fps") or 0) or None
            gen.close()
        except Exception:
            return None
    return fps if fps and math.isfinite(fps) and fps > 0 else None


def score_clip(clip: np.ndarray, prompt: str, fps: float | None, videoalign, others=()) -> dict[str, float | None]:
    """Every score of one clip (its own frame rate given to VideoAlign); NaN scores become None. A reward that
    raises propagates: the caller reports the clip as not scored."""
    import torch

    batch = torch.from_numpy(np.ascontiguousarray(clip))[None]
    row: dict[str, float | None] = {}
    for k, v in videoalign(batch, [prompt], video_fps=fps).items():
        row.setdefault(k, _finite(float(v[0])))
    for rm in others:
        for k, v in rm(batch, [prompt]).items():
            row.setdefault(k, _finite(float(v[0])))
    return row


def _error_text(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else repr(err)}"


# --------------------------------------------------------------------------------------------- generator mode
def clip_plan(prompts: list[str], clips: int, seed: int) -> list[dict]:
    """Every clip to evaluate: id, prompt index, clip index, prompt, seed (= seed + prompt_index * clips + clip)."""
    return [{"id": f"p{i:05d}_c{c}", "prompt_index": i, "clip": c, "prompt": p, "seed": seed + i * clips + c}
            for i, p in enumerate(prompts) for c in range(clips)]


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix results of different settings in one folder (resuming needs the same ones); writes nothing."""
    path = out / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg}); remove it to start this folder anew") from None
        changed = [k for k in settings if k in old and old[k] != settings[k]]
        if changed:
            k = changed[0]
            raise UserError(f"--out {out} holds an evaluation with other settings ({k}: {old[k]!r} there, "
                            f"{settings[k]!r} now); use another --out folder or the same settings")


def load_baseline(spec: str | None) -> list[dict] | None:
    if not spec:
        return None
    p = Path(spec)
    if p.is_dir():
        p = p / "results.jsonl"
    rows = read_jsonl(p)
    if not rows:
        raise UserError(f"--baseline {spec}: no results (expected an evaluation folder or its results.jsonl)")
    bad = [r for r in rows if "prompt" not in r or "seed" not in r]
    if bad:
        raise UserError(f"--baseline {p}: rows need 'prompt' and 'seed' to be paired, got {sorted(bad[0])}")
    return rows


def run_generate(args) -> int:
    from tqdm import tqdm

    from video_branch.video import VideoReadError, read_video, write_mp4

    out = Path(args.out)
    prompts = read_prompt_set(args.prompts)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    for name in ("clips_per_prompt", "steps", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    baseline = load_baseline(args.baseline)
    source = None
    if args.model:
        from video_branch.engine.sampling import resolve_source

        source = resolve_source(args.model)
    defaults = run_defaults([source] if source is not None else [])
    num_frames = args.frames or defaults["num_frames"]
    height, width = args.height or defaults["height"], args.width or defaults["width"]
    fps = args.fps or defaults["fps"]
    settings = {"model": str(source.path) + (f"@{source.tag}" if source and source.tag else "") if source else None,
                "prompts": str(Path(args.prompts).resolve()), "num_prompts": len(prompts),
                "clips_per_prompt": args.clips_per_prompt, "seed": args.seed, "steps": args.steps,
                "guidance": args.guidance, "negative_prompt": args.negative_prompt, "shift": args.shift,
                "frames": num_frames, "height": height, "width": width, "fps": fps,
                "videoalign": str(Path(args.videoalign).resolve()), "temporal": not args.no_temporal}
    if source is not None:
        check_settings(out, settings)  # before any work; written once the models load
    out.mkdir(parents=True, exist_ok=True)
    videos = out / "videos"
    videos.mkdir(exist_ok=True)
    results_path = out / "results.jsonl"
    repair_jsonl(results_path)
    done = {r["id"] for r in read_jsonl(results_path) if "id" in r}
    todo = [c for c in clip_plan(prompts, args.clips_per_prompt, args.seed) if c["id"] not in done]
    print(f"{len(done)} clips already scored, {len(todo)} to do", file=sys.stderr)
    skipped: list[dict] = []

    if todo:
        import reward_models

        quiet_libraries()
        videoalign = build_videoalign(args, fps)
        others = [] if args.no_temporal else [reward_models.build("temporal_consistency")]
        if source is not None:
            write_json(out / "settings.json", settings)
        models = None
        with tqdm(total=len(todo), desc="evaluate", unit="clip", disable=args.quiet, file=sys.stderr) as bar:
            for start in range(0, len(todo), args.batch):
                chunk = todo[start:start + args.batch]
                ready, frames, missing = [], [], []
                for c in chunk:
                    path = videos / f"{c['id']}.mp4"
                    try:
                        frames.append(read_video(path))
                        ready.append(c)
                    except VideoReadError as err:
                        if path.exists() or source is None:
                            tqdm.write(f"warning: {err}" + ("; regenerating" if source is not None else
                                                             "; skipped"), file=sys.stderr)
                        if source is None:
                            skipped.append({"id": c["id"], "video": str(path), "reason": str(err)})
                        else:
                            missing.append(c)
                if missing:
                    if models is None:
                        from video_branch.engine.sampling import load_source

                        models = load_source(source, dtype=args.dtype, device=resolve_device(args.device))
                    from video_branch.engine.sampling import generate

                    clips = generate(models, [c["prompt"] for c in missing], [c["seed"] for c in missing],
                                     num_steps=args.steps, guidance_scale=args.guidance, shift=args.shift,
                                     num_frames=num_frames, height=height, width=width,
                                     negative_prompt=args.negative_prompt, frontier_batch=args.batch)
                    for c, clip in zip(missing, clips.numpy()):
                        path = write_mp4(videos / f"{c['id']}.mp4", clip, fps=fps)
                        # Score what was written: fresh and resumed clips are then scored alike.
                        frames.append(read_video(path))
                        ready.append(c)
                rows = []
                for c, clip in zip(ready, frames):
                    path = videos / f"{c['id']}.mp4"
                    try:
                        scores = score_clip(clip, c["prompt"], container_fps(path) or fps, videoalign, others)
                    except Exception as err:  # reported, never turned into a score; a rerun tries again
                        reason = f"not scored: {_error_text(err)}"
                        tqdm.write(f"warning: {path}: {reason}; skipped", file=sys.stderr)
                        skipped.append({"id": c["id"], "video": str(path), "reason": reason})
                        continue
                    rows.append({**c, "video": str(Path("videos") / f"{c['id']}.mp4"), **scores})
                append_jsonl(results_path, rows)
                bar.update(len(chunk))

    rows = read_jsonl(results_path)
    if not rows:
        raise UserError(f"no clip could be scored (see the warnings above); {results_path} is empty")
    summary = summarise(rows, baseline)
    summary["settings"] = settings
    summary["skipped"] = skipped
    if baseline is not None:
        summary["baseline"]["path"] = str(args.baseline)
    write_json(out / "summary.json", summary)
    title = f"Generator evaluation: {source.name if source else out.name}"
    (out / "summary.md").write_text(markdown_table(summary, title))
    print((out / "summary.md").read_text())
    if skipped:
        print(f"{len(skipped)} clip(s) skipped: missing or corrupt videos, or clips the rewards could not score",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- rewardbench mode
def bench_pairs(rows: list[dict[str, str]], csv_path: Path) -> list[dict]:
    """Validate the rows of a VideoGen-RewardBench CSV -> pairs with labels +1 / -1 / 0 per dimension."""
    need = ["path_A", "path_B", "prompt", *VIDEOALIGN_KEYS]
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise UserError(f"--csv {csv_path}: missing column(s) {missing}; a VideoGen-RewardBench CSV has path_A, "
                        "path_B, prompt, VQ, MQ, TA and Overall (fps and num_frames columns are not used)")
    pairs = []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        labels = {}
        for k in VIDEOALIGN_KEYS:
            v = (r[k] or "").strip()
            if v not in LABELS:
                raise UserError(f"--csv {csv_path} line {i}: column {k} must be A, B or same, got {v!r}")
            labels[k] = LABELS[v]
        pairs.append({"line": i, "A": r["path_A"], "B": r["path_B"], "prompt": r["prompt"], "labels": labels})
    return pairs


def bench_accuracy(pairs: list[dict], scores: dict[str, dict]) -> dict:
    """Per dimension: accuracy without and with ties over the pairs whose two videos were both scored."""
    out = {}
    for k in VIDEOALIGN_KEYS:
        h, d = [], []
        for p in pairs:
            a = scores.get((p["A"], p["prompt"]), {}).get(k)
            b = scores.get((p["B"], p["prompt"]), {}).get(k)
            if a is None or b is None:
                continue
            h.append(p["labels"][k])
            d.append(a - b)
        acc_eq, eps = accuracy_with_ties(h, d)
        out[k] = {"accuracy_without_ties": accuracy_without_ties(h, d), "accuracy_with_ties": acc_eq,
                  "tie_threshold": eps, "n_pairs": len(h), "n_pairs_without_ties": int(sum(x != 0 for x in h))}
    return out


def run_rewardbench(args) -> int:
    from tqdm import tqdm

    from video_branch.video import VideoReadError, read_video

    csv_path = Path(args.csv)
    pairs = bench_pairs(read_csv(csv_path, "--csv"), csv_path)
    root = Path(args.videos_root) if args.videos_root else csv_path.parent
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "scores.jsonl"
    repair_jsonl(cache_path)
    # Keyed by (path, prompt): text alignment depends on the prompt a video is judged against. The last row of a
    # key wins; a row with "error" records a video that could not be read or scored.
    cached = {(r["path"], r["prompt"]): r for r in read_jsonl(cache_path) if "path" in r and "prompt" in r}
    scores = {k: r for k, r in cached.items() if "error" not in r}
    failed = {k: r["error"] for k, r in cached.items() if "error" in r}
    videos = list(dict.fromkeys((p[side], p["prompt"]) for p in pairs for side in "AB"))
    unseen = [v for v in videos if v not in scores and v not in failed]
    todo = [v for v in videos if v not in scores] if args.videoalign else []
    print(f"{sum(v in scores for v in videos)} videos already scored, {len(todo)} to do"
          + (f", {sum(v in failed for v in videos)} recorded as unscorable" if not args.videoalign else ""),
          file=sys.stderr)
    if unseen and not args.videoalign:
        raise UserError(f"{len(unseen)} videos have no scores in {cache_path}: give --videoalign PATH to score them")
    if todo:
        quiet_libraries()
        rm = build_videoalign(args, 16.0)
        unreadable: dict[str, str] = {}
        for key in tqdm(todo, desc="score", unit="video", disable=args.quiet, file=sys.stderr):
            path, prompt = key
            file = Path(path) if Path(path).is_absolute() else root / path
            row = {"path": path, "prompt": prompt}
            if path in unreadable:
                row["error"] = unreadable[path]
            else:
                try:
                    frames = read_video(file)
                    fps = container_fps(file)
                    if fps is None:
                        raise VideoReadError(f"video {file} states no frame rate")
                except VideoReadError as err:
                    unreadable[path] = row["error"] = str(err)
                else:
                    try:
                        row["fps"] = fps
                        row.update(score_clip(frames, prompt, fps, rm))
                    except Exception as err:  # reported and recorded, never turned into a score
                        row = {"path": path, "prompt": prompt, "error": f"not scored: {_error_text(err)}"}
            if "error" in row:
                tqdm.write(f"warning: {row['error']}; its pairs are skipped", file=sys.stderr)
                if failed.get(key) == row["error"]:
                    continue  # the same failure is on record already
                failed[key] = row["error"]
            else:
                scores[key] = row
                failed.pop(key, None)
            append_jsonl(cache_path, [{k: v for k, v in row.items() if k in ("path", "prompt", "fps", "error")
                                       or k in VIDEOALIGN_KEYS}])
    results = bench_accuracy(pairs, scores)
    skipped = sum(1 for p in pairs if (p["A"], p["prompt"]) not in scores or (p["B"], p["prompt"]) not in scores)
    if skipped == len(pairs):
        raise UserError(f"no pair of {csv_path} could be scored (see the warnings above and {cache_path})")
    failed_videos = {}
    for (path, prompt), err in failed.items():
        if (path, prompt) in videos:
            failed_videos.setdefault(path, err)
    summary = {"csv": str(csv_path), "n_pairs": len(pairs), "skipped_pairs": skipped, "failed_videos": failed_videos,
               "dimensions": results}
    write_json(out / "rewardbench.json", summary)
    lines = ["### VideoGen-RewardBench", "", f"{len(pairs) - skipped} of {len(pairs)} pairs scored", "",
             "| dimension | accuracy w/o ties | accuracy with ties | tie threshold | pairs (w/o ties) |",
             "|---|---:|---:|---:|---:|"]
    for k, r in results.items():
        lines.append(f"| {k} | {_pct1(r['accuracy_without_ties'])} | {_pct1(r['accuracy_with_ties'])} | "
                     f"{_fmt(r['tie_threshold'], 4)} | {r['n_pairs']} ({r['n_pairs_without_ties']}) |")
    (out / "rewardbench.md").write_text("\n".join(lines) + "\n")
    print((out / "rewardbench.md").read_text())
    if failed_videos:
        print(f"{len(failed_videos)} video(s) could not be scored; their {skipped} pair(s) are skipped",
              file=sys.stderr)
    return 0


def _pct1(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="eval_videoalign.py", formatter_class=fmt,
                                description="Evaluate a generator with VideoAlign (generate) or VideoAlign on "
                                            "VideoGen-RewardBench (rewardbench).")
    sub = p.add_subparsers(dest="mode", required=True)

    def videoalign_options(q, required):
        q.add_argument("--videoalign", required=required, metavar="DIR",
                       help="VideoAlign checkpoint directory (model_config.json + checkpoint-*)")
        q.add_argument("--videoalign-base", metavar="DIR", help="local Qwen2-VL base model (default: the one the "
                                                                 "checkpoint's model_config.json names)")
        q.add_argument("--videoalign-option", action="append", metavar="KEY=VALUE",
                       help="more VideoAlign options, e.g. dtype=bfloat16, batch_size=4, max_pixels=200704")
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.add_argument("--debug", action="store_true", help="show tracebacks")

    g = sub.add_parser("generate", formatter_class=fmt, help="generate clips for a prompt set and score them")
    g.add_argument("--model", "-m", metavar="[NAME=]PATH",
                   help="diffusers Wan directory, run directory or checkpoint (omit to score OUT/videos as they are)")
    g.add_argument("--prompts", required=True, metavar="FILE",
                   help="TXT (one prompt per line) or CSV with a prompt_en or prompt column")
    g.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    g.add_argument("--clips-per-prompt", type=int, default=1, help="clips (seeds) per prompt")
    g.add_argument("--seed", type=int, default=0, help="clip k of prompt i uses seed + i * clips_per_prompt + k")
    g.add_argument("--steps", type=int, default=20, help="ODE denoising steps")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--negative-prompt", default="", help="negative prompt of CFG")
    g.add_argument("--shift", type=float, default=3.0, help="flow shift")
    g.add_argument("--frames", type=int, help="frames per clip, 4k+1 (default: run config, else 9)")
    g.add_argument("--height", type=int, help="clip height (default: run config, else 64)")
    g.add_argument("--width", type=int, help="clip width (default: run config, else 64)")
    g.add_argument("--fps", type=float, help="frame rate written and given to VideoAlign (default: run config, "
                                             "else 8)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    g.add_argument("--batch", type=int, default=8, help="clips generated and scored per step")
    g.add_argument("--no-temporal", action="store_true", help="skip the temporal-consistency reward")
    g.add_argument("--baseline", metavar="PATH", help="an earlier evaluation folder (or its results.jsonl) with the "
                                                     "same prompts and seeds: adds paired differences")
    g.add_argument("--out", "-o", required=True, help="output folder")
    videoalign_options(g, required=True)

    r = sub.add_parser("rewardbench", formatter_class=fmt, help="pairwise accuracy of VideoAlign on a "
                                                               "VideoGen-RewardBench CSV")
    r.add_argument("--csv", required=True, help="VideoGen-RewardBench CSV")
    r.add_argument("--videos-root", help="folder the CSV's relative video paths start from (default: the CSV's)")
    r.add_argument("--out", "-o", required=True, help="output folder (scores.jsonl cache, rewardbench.json / .md)")
    videoalign_options(r, required=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args) if args.mode == "generate" else run_rewardbench(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"eval_videoalign.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
