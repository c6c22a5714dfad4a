"""Run observability: metrics.jsonl, TensorBoard scalars and reward_curve.png (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional


def read_metrics(path: str | Path) -> List[Dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trailing_mean(values: List[float], window: int) -> List[float]:
    """Mean of the last ``window`` values at each position (fewer at the start), for a readable noisy curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def archive_previous_run(run_dir: str | Path) -> Optional[Path]:
    """Move an earlier run's files out of ``run_dir`` before a run starts from iteration 0 there.

    A fresh start (``train.resume: never``, or ``auto`` with no checkpoint) into a directory that already holds files
    would otherwise append to the old metrics and leave its ``final/`` and evaluations beside the new ones. Nothing
    is deleted: the old contents move to a sibling ``<run_dir>.prev-<UTC time>`` (a message says where). Returns that
    directory, or None when ``run_dir`` is missing or empty.
    """
    import shutil
    import time

    run_dir = Path(run_dir)
    keep = {".lock"}  # the run directory's lock (video_branch.engine.rundir) stays with the directory
    if not run_dir.is_dir() or not any(p.name not in keep for p in run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.prev-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{n}")
    dest.mkdir(parents=True)
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in keep:
            shutil.move(str(entry), str(dest / entry.name))
    print(f"video_branch: {run_dir} held an earlier run that this one does not resume; moved it to {dest}",
          flush=True)
    return dest


def heldout_series(rows: List[Dict[str, Any]]) -> Dict[str, tuple]:
    """eval.jsonl rows -> {term: (iterations, means, ci95s)} for every numeric key with a ``<key>_ci95`` beside it.

    A reward's own total (``toyworld``) is left out where its terms (``toyworld/...``) are present; with a single
    reward the ``toyworld/`` prefix is dropped from the names. A resumed run can log an iteration twice: the last row
    wins."""
    by_it: Dict[int, Dict[str, Any]] = {}
    for r in rows:
        if isinstance(r.get("iteration"), int):
            by_it[r["iteration"]] = r
    keys: List[str] = []
    for r in by_it.values():
        for k, v in r.items():
            if (not k.endswith("_ci95") and isinstance(v, (int, float)) and isinstance(r.get(f"{k}_ci95"), (int, float))
                    and not any(x.startswith(f"{k}/") for x in r) and k not in keys):
                keys.append(k)
    prefixes = {k.split("/")[0] for k in keys if "/" in k}
    strip = len(prefixes) == 1 and all("/" in k for k in keys)
    out: Dict[str, tuple] = {}
    for k in keys:
        pts = [(it, float(r[k]), float(r[f"{k}_ci95"])) for it, r in sorted(by_it.items())
               if isinstance(r.get(k), (int, float)) and isinstance(r.get(f"{k}_ci95"), (int, float))]
        out[k.split("/", 1)[1] if strip else k] = tuple(list(x) for x in zip(*pts))
    return out


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, plot_every: int = 1):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.plot_every = plot_every
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop rows of iterations that the restored checkpoint does not contain, in metrics.jsonl and in
        TensorBoard (a writer with ``purge_step`` marks events of later steps in the earlier event files as
        superseded, and TensorBoard hides them)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=iteration + 1)
        if not self.metrics_path.is_file():
            return
        rows = [r for r in read_metrics(self.metrics_path) if r.get("iteration", -1) <= iteration]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        it = int(row["iteration"])
        if self._tb is not None:
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, it)
            self._tb.flush()
        if self.plot_every and (it + 1) % self.plot_every == 0:
            self.plot()

    def log_eval(self, name: str, iteration: int, summary: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"name": name, "iteration": iteration, **summary}) + "\n")
        if self._tb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"eval/{k}", v, iteration)

    def plot(self) -> Optional[Path]:
        if not self.enabled:
            return None
        rows = read_metrics(self.metrics_path)
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heldout = heldout_series(read_metrics(self.run_dir / "eval.jsonl"))
        fig, axes = plt.subplots(1, 2 if heldout else 1, figsize=(11 if heldout else 6, 3.5), squeeze=False)
        ax = axes[0, 0]
        keys = sorted({k for r in rows for k in r if k.startswith("reward/")})
        window = max(1, min(10, len(rows) // 10))  # per-iteration rewards are noisy: draw a trailing mean over them
        def series(k):
            return [r["iteration"] for r in rows if r.get(k) is not None], [r[k] for r in rows if r.get(k) is not None]

        terms = sorted({k.rsplit("/", 1)[-1] for k in keys} | set(heldout))
        colours = {t: f"C{i % 10}" for i, t in enumerate(t for t in terms if t != "overall")}  # one colour per term
        mean = series("reward_mean")
        same = [k for k in keys if series(k) == mean]  # a single weight-1 reward equals reward_mean: named in its label
        for k in [*(k for k in keys if k not in same), "reward_mean"]:  # reward_mean last, on top
            xs, ys = series(k)
            if xs:
                bold = k == "reward_mean"
                label = f"{k} (= {', '.join(same)})" if bold and same else k
                colour = "black" if bold else colours.get(k.rsplit("/", 1)[-1])
                (line,) = ax.plot(xs, ys, lw=0.6, alpha=0.35, color=colour)
                ax.plot(xs, trailing_mean(ys, window), color=line.get_color(), label=label, lw=2.2 if bold else 1.2,
                        zorder=3 if bold else 2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training reward")
        ax.set_title(f"training prompts. faint: per iteration; solid: mean of the last {window}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if heldout:
            hx = axes[0, 1]
            for k, (xs, ys, ci) in heldout.items():
                hx.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, lw=2.2 if k == "overall" else 1.2,
                            color="black" if k == "overall" else colours.get(k), label=k)
            hx.set_xlabel("iteration")
            hx.set_ylabel("held-out reward")
            hx.set_title("held-out prompts, same seeds at every point (bars: 95% CI)", fontsize=8)
            hx.grid(alpha=0.3)
            hx.legend(fontsize=7)
        fig.tight_layout()
        out = self.run_dir / "reward_curve.png"
        tmp = self.run_dir / "reward_curve.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
