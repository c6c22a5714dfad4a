"""Shared pieces of the benchmark tools: preset variants, trainers in one process, medians, the machine's state.

A *variant* is a method preset plus optional config overrides, written ``[label=]preset[+key=value...]``, e.g.
``dancegrpo`` or ``dancegrpo_tf1=dancegrpo+prune.timestep_fraction=1.0+prune.exclude_last_step=false``. Every
variant of one benchmark is loaded from the same base config with the same model, prompts, seed and common
overrides, so the only differences between them are the preset and the variant's own overrides.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Settings that make a trainer quiet and independent of earlier runs; they do not change what is measured.
QUIET = ("logging.tensorboard=false", "logging.progress=false", "logging.plot_every=0", "train.resume=never",
         "train.checkpoint_every=0")


@dataclass(frozen=True)
class Variant:
    label: str
    preset: str
    overrides: tuple[str, ...] = field(default=())


def parse_variant(spec: str) -> Variant:
    """``[label=]preset[+key=value...]`` -> Variant. The label defaults to the preset name when nothing is overridden,
    else to the whole spec."""
    spec = spec.strip()
    if not spec:
        raise ValueError("preset spec is empty (expected '[label=]preset[+key=value...]')")
    label = None
    head, _, _ = spec.partition("+")
    if "=" in head:
        label, _, spec = spec.partition("=")
        label = label.strip()
        if not label:
            raise ValueError(f"preset spec {spec!r}: empty label before '='")
    parts = [p.strip() for p in spec.split("+")]
    preset, overrides = parts[0], tuple(parts[1:])
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ValueError(f"preset spec {spec!r}: override {o!r} is not key=value")
    from video_branch.config.presets import get_preset_name

    get_preset_name(preset)  # raises ConfigError naming the accepted presets
    return Variant(label or (preset if not overrides else spec), preset, overrides)


def parse_variants(text: str) -> list[Variant]:
    """Comma-separated variant specs; labels must be unique."""
    out = [parse_variant(s) for s in text.split(",") if s.strip()]
    if not out:
        raise ValueError("--presets: no preset given")
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--presets: labels must be unique, repeated: {dup}")
    return out


def variants_with_baseline(text: str, baseline: str) -> list[Variant]:
    """``parse_variants`` plus the check that the baseline is one of them (exits with a message otherwise)."""
    variants = parse_variants(text)
    labels = [v.label for v in variants]
    if baseline not in labels:
        raise SystemExit(f"--baseline {baseline!r} is not one of the presets {labels}")
    return variants


def variant_config(base_config: str | None, variant: Variant, common: Sequence[str], run_dir: Path):
    """The resolved Config of a variant: base YAML <- preset <- common overrides <- variant overrides."""
    from video_branch.config import load_config

    overrides = [*common, *variant.overrides, *QUIET, f"train.run_dir={run_dir}"]
    return load_config(base_config, overrides, method=variant.preset)


def make_trainer(cfg):
    """A single-process Trainer (it initialises a world of one itself); the run directory exists afterwards."""
    from video_branch.engine.trainer import Trainer

    Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg)


def release(trainer) -> None:
    """Drop a trainer's models and engine before the next setting loads its own."""
    if trainer is not None:
        trainer.logger.close()
    del trainer
    gc.collect()


def check_model_dir(path: str, flag: str = "--model") -> str:
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"{flag}: {p} is not a diffusers model directory (no model_index.json); build or "
                                f"download one, or pass another directory")
    return str(p)


def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def interleaved(labels: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, label) in the order A B C A B C ...: slow phases of a shared machine hit every variant alike."""
    for r in range(repeats):
        for label in labels:
            yield r, label


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, object]:
    """What a reader needs to judge the numbers: software, cores, threads, the machine's load and the code version."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cores": cores,
            "torch_threads": torch.get_num_threads(), "load_average_1_5_15": load_average(),
            "git_commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            if math.isnan(x):
                return "-"
            return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}".rstrip("0").rstrip(".")
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON so that ``path`` holds either the complete old content or the complete new one: a
    temporary file in the same directory, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


# Two-sided 95% quantiles of Student's t, degrees of freedom 1-10; beyond, the Cornish-Fisher expansion below.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (to 6 digits up to 10, within 2e-4 beyond)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) + \
        (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)


def mean_t_ci(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, the half-width of its 95% Student-t interval, sample sd, min and max of the finite values; the
    half-width and sd are None with fewer than two values, everything is None with none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None, "sd": None, "min": None, "max": None}
    mean = sum(vals) / n
    sd = statistics.stdev(vals) if n > 1 else None
    ci = t975(n - 1) * sd / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "ci95": ci, "sd": sd, "min": min(vals), "max": max(vals)}
