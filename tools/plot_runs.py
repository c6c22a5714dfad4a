#!/usr/bin/env python
"""Reward curves of one or several runs, against iteration and against wall-clock time, into one PNG.

    python tools/plot_runs.py runs/branchgrpo runs/dancegrpo --out compare_runs.png
    python tools/plot_runs.py runs/a runs/b --metric reward_mean --metric reward/toyworld --smooth 0.8

Each run directory holds ``metrics.jsonl`` (one object per iteration with ``iteration``, ``iter_s``, ``reward_mean``,
``reward/<name>``, ...). Wall-clock time is the running sum of ``iter_s`` (the training time, without start-up), so
methods of different cost compare at equal compute. A row repeated after a resume keeps its last occurrence; a torn
last line is skipped. Runs are labelled with their directory name and, from config.yaml, their method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render_compare import HelpFormatter


class UserError(Exception):
    """A bad run directory or option: reported in one line, without a traceback."""


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows by iteration (the last row of an iteration wins, as after a resume)."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise UserError(f"run directory {run_dir} has no metrics.jsonl")
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run
        if isinstance(row, dict) and isinstance(row.get("iteration"), (int, float)):
            rows[int(row["iteration"])] = row
    if not rows:
        raise UserError(f"{path} holds no rows with an 'iteration'")
    return [rows[i] for i in sorted(rows)]


def curve(rows: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(iterations, wall-clock seconds at the end of each iteration, values) of the rows where `metric` is finite.

    Seconds are the running sum of ``iter_s`` over all rows (an iteration without ``iter_s`` adds 0).
    """
    seconds = np.cumsum([float(r.get("iter_s") or 0.0) for r in rows])
    keep = [i for i, r in enumerate(rows) if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    its = np.array([rows[i]["iteration"] for i in keep], dtype=np.int64)
    vals = np.array([rows[i][metric] for i in keep], dtype=np.float64)
    return its, seconds[keep], vals


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average (weight 0 returns the values)."""
    if weight <= 0 or values.size == 0:
        return values.astype(np.float64)
    out = np.empty(values.size, np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def run_label(run_dir: Path) -> str:
    """The directory's name, with the method from config.yaml when there is one."""
    cfg = run_dir / "config.yaml"
    method = None
    if cfg.is_file():
        import yaml

        try:
            method = (yaml.safe_load(cfg.read_text()) or {}).get("method")
        except yaml.YAMLError:
            method = None
    return f"{run_dir.name} ({method})" if method and method != run_dir.name else run_dir.name


def time_unit(max_seconds: float) -> tuple[str, float]:
    if max_seconds >= 2 * 3600:
        return "hours", 3600.0
    if max_seconds >= 120:
        return "minutes", 60.0
    return "seconds", 1.0


def plot(runs: list[Path], metrics: list[str], labels: list[str] | None = None, smooth: float = 0.0,
         title: str | None = None):
    """A figure with one row per metric: the metric against iteration (left) and wall-clock time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_rows(r) for r in runs]
    labels = labels or [run_label(r) for r in runs]
    for m in metrics:
        if not any(curve(rows, m)[0].size for rows in data):
            known = sorted({k for rows in data for r in rows for k, v in r.items() if isinstance(v, (int, float))})
            raise UserError(f"--metric {m}: no run has it; numeric keys are {', '.join(known)}")
    max_s = max(float(np.sum([float(r.get("iter_s") or 0.0) for r in rows])) for rows in data)
    unit, div = time_unit(max_s)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, metric in enumerate(metrics):
        ax_it, ax_t = axes[row]
        for k, (rows, label) in enumerate(zip(data, labels)):
            its, secs, vals = curve(rows, metric)
            if not its.size:
                continue
            c = colours[k % len(colours)]
            for ax, x in ((ax_it, its), (ax_t, secs / div)):
                if smooth > 0:
                    ax.plot(x, vals, color=c, alpha=0.25, lw=1)
                    ax.plot(x, ema(vals, smooth), color=c, lw=2, label=label)
                else:
                    ax.plot(x, vals, color=c, lw=1.5, label=label)
        ax_it.set_xlabel("iteration")
        ax_t.set_xlabel(f"wall-clock ({unit}, sum of iter_s)")
        for ax in (ax_it, ax_t):
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        ax_it.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plot_runs.py", formatter_class=HelpFormatter,
                                description="Plot reward curves of runs against iteration and wall-clock time.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--metric", action="append", metavar="KEY",
                   help="metrics.jsonl key to plot, repeatable (default: reward_mean)")
    p.add_argument("--label", action="append", metavar="TEXT", help="legend label per run, in order")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (0: raw curves only)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--dpi", type=int, default=120, help="PNG resolution")
    p.add_argument("--out", "-o", default="runs.png", help="output image (PNG; .svg and .pdf also work)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.smooth < 1:
            raise UserError(f"--smooth must be in [0, 1), got {args.smooth}")
        if args.label and len(args.label) != len(args.runs):
            raise UserError(f"--label: give one label per run ({len(args.runs)}), got {len(args.label)}")
        fig = plot([Path(r) for r in args.runs], args.metric or ["reward_mean"], args.label, args.smooth, args.title)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(out, dpi=args.dpi)
        except ValueError as err:  # an unknown extension
            raise UserError(f"--out {out}: {err}") from err
        print(f"wrote {out}")
        return 0
    except UserError as err:
        if args.debug:
            raise
        print(f"plot_runs.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
