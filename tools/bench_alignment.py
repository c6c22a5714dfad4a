"""Method comparison: held-out reward against training wall-clock, per preset and seed, with confidence intervals.

    python tools/bench_alignment.py --out runs/bench/alignment.json           # 10 presets x 3 seeds x 3 min (~2 h)
    python tools/bench_alignment.py --quick --out runs/bench/alignment_quick.json   # 1 seed x 20 s (smoke run)
    python tools/bench_alignment.py --report-only --out runs/bench/alignment.json   # report the finished runs only

**What every run gets.** Each preset trains the same model from the same weights, with the same prompts, reward,
held-out set and ``train.seed`` for the same budget of training time (``--minutes``; the trainer's per-iteration
time summed, evaluation and model loading not counted), at the preset's own settings: the base config
(``--config``) <- the preset <- ``--set`` <- the preset spec's own ``+key=value`` overrides. Held-out reward
(``Trainer.evaluate``: ODE samples from fixed seeds, every reward term with its 95% CI over the clips) is measured
at the start, whenever another ``--eval-every-s`` of training time has passed, and at the end of the budget.
``--clock cpu`` budgets and plots the process's CPU seconds per iteration instead of wall-clock (steadier on a
shared machine; wall-clock is recorded either way).

**One run per (preset, seed), resumable.** Run ``<label>/seed<seed>/`` of the work directory (default: ``--out``'s
name with ``_runs``) is the trainer's run directory (``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``) plus
``bench_spec.json`` (what the run is), ``bench_curve.jsonl`` (its evaluations as they happen) and, last,
``bench_result.json``, written atomically (temporary file, fsync, rename). A run is finished exactly when its
``bench_result.json`` exists; a later invocation skips it, so an interrupted bench (Ctrl-C, a kill, a crash)
continues with the first unfinished run. A run directory without a result is a run that was interrupted: it is
deleted and the run starts again from its first iteration (a run is a few minutes; stitching a resumed clock to an
interrupted one would make its times incomparable). A finished run whose spec (preset, overrides, seed, budget,
evaluation interval, clock, resolved config) differs from the current invocation's stops the bench with a message
naming the difference, so results of different settings are never mixed. ``--max-runs N`` stops after N runs
(spread a bench over several sittings); one lock file keeps two benches off one work directory. Runs go seed by
seed, each seed's preset order rotated by one, so a slow phase of a shared machine does not always hit the same
preset.

**The report** is built from the finished runs' ``bench_result.json`` files alone (``--report-only`` rebuilds it
without training):

- curves: every held-out term against training time, interpolated linearly onto the evaluation grid (0,
  ``--eval-every-s``, ..., budget); per grid point the mean over seeds and its 95% Student-t interval over seeds
  (with one seed: the run's own 95% CI over the held-out clips, labelled as such);
- final held-out reward per term: mean over seeds, 95% t interval, sd, min and max (the across-seed spread);
- time to target: per seed, the target is the baseline's (``--baseline``, DanceGRPO) final held-out mean of
  ``--metric`` in that seed; a preset's time is the first crossing, interpolated linearly between the evaluations
  around it, and its ratio is that time over the baseline's own time to its final value in the same seed. Over
  seeds: the geometric mean of the ratios and its 95% interval (Student t on the log ratios, exponentiated).
  A preset that never reaches the target within its budget in a seed has no ratio there, only a lower bound
  (its budget / the baseline's time); when that happens in any seed the summary gives no ratio and no interval,
  only ``ratio_lower_bound`` (the geometric mean with each missing ratio replaced by its bound, which bounds the
  geometric mean from below) and the count of seeds reached. A seed whose baseline did not end above its own start
  gives no ratio at all (the target is met at time 0) and is counted as ``baseline_flat``;
- late mean: per seed, the mean of ``--metric`` over the evaluations in the last third of the budget; over seeds
  its mean and t interval, and the same for its difference to the baseline's late mean in the same seed (a second
  reading of where a run ends that one noisy evaluation moves less than the final point or the first crossing);
- efficiency: held-out gain of ``--metric`` (final - start) per 1,000 training leaves and per forward pass
  (policy forward passes of the rollouts, CFG counted), mean and t interval over seeds;
- a PNG of the curves (one panel per term, bands labelled with what their interval is over) and a JSON of all of
  it, including every run's rows and evaluations.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bc

PRESETS = ("dancegrpo,flowgrpo,mixgrpo,branchgrpo,branchgrpo_deppru,branchgrpo_widpru,branchgrpo_mix,vgrpo,nft,"
           "pro_grpo")
GOAL = ("branchgrpo_deppru", 0.6, "time to DanceGRPO's final held-out reward / DanceGRPO's time, in every seed", 3)
QUICK = {"seeds": 1, "minutes": 1 / 3, "eval_every_s": 10.0}
FULL = {"seeds": "0,1,2", "minutes": 3.0, "eval_every_s": 30.0}
SPEC, CURVE, RESULT, LOCK = "bench_spec.json", "bench_curve.jsonl", "bench_result.json", ".bench.lock"
CLOCKS = {"wall": "train_s", "cpu": "cpu_s"}
ROW_KEYS = ("iteration", "iter_s", "rollout_s", "reward_s", "train_s", "reward_mean", "forward_passes",
            "trained_edges")


# ------------------------------------------------------------------------------------------------ analysis (pure)
def time_to_target(curve: Sequence[dict], target: float, key: str = "train_s") -> dict[str, float | None]:
    """First crossing of ``target`` on a curve of {key, "mean"} points in time order.

    Returns {"at_eval_s": time of the first evaluation with mean >= target, "interpolated_s": the linear
    interpolation between it and the evaluation before (that evaluation's time when it is the first point)}; both
    None when the curve never reaches the target.
    """
    for i, p in enumerate(curve):
        if p["mean"] >= target:
            if i == 0:
                return {"at_eval_s": p[key], "interpolated_s": p[key]}
            q = curve[i - 1]
            frac = (target - q["mean"]) / (p["mean"] - q["mean"])  # q["mean"] < target <= p["mean"]
            return {"at_eval_s": p[key], "interpolated_s": q[key] + frac * (p[key] - q[key])}
    return {"at_eval_s": None, "interpolated_s": None}


def seed_ratio(curve: Sequence[dict], base_curve: Sequence[dict], key: str = "train_s") -> dict:
    """One seed's time-to-target comparison of ``curve`` against the baseline's ``base_curve`` (both {key, "mean"}
    points, the last one at the end of the budget). The target is the baseline's final mean.

    status "reached" (ratio = time / baseline's time), "not_reached" (ratio None; ``ratio_lower_bound`` = this
    curve's last time / the baseline's time) or "baseline_flat" (the baseline did not end above its start, so its
    time to its own final value is 0 and no ratio exists).
    """
    target = base_curve[-1]["mean"]
    base_t = time_to_target(base_curve, target, key)["interpolated_s"]
    t = time_to_target(curve, target, key)
    out = {"target": target, "baseline_time_s": base_t, "time_to_target": t, "ratio": None,
           "ratio_lower_bound": None}
    if not target > base_curve[0]["mean"] or not base_t:
        return {**out, "status": "baseline_flat"}
    if t["interpolated_s"] is None:
        return {**out, "status": "not_reached", "ratio_lower_bound": curve[-1][key] / base_t}
    return {**out, "status": "reached", "ratio": t["interpolated_s"] / base_t}


def ratio_over_seeds(per_seed: Sequence[dict]) -> dict:
    """Summary of ``seed_ratio`` results over seeds (see the module docstring): geometric mean of the ratios and
    its 95% interval (t on the log ratios) when every comparable seed reached the target; otherwise only a lower
    bound of the geometric mean."""
    counts = {s: sum(r["status"] == s for r in per_seed) for s in ("reached", "not_reached", "baseline_flat")}
    out = {"seeds": len(per_seed), **counts, "geo_mean": None, "ci95_low": None, "ci95_high": None,
           "ratio_lower_bound": None, "ratios": [r["ratio"] for r in per_seed]}
    logs = [math.log(r["ratio"]) for r in per_seed if r["status"] == "reached" and r["ratio"] > 0]
    zero = any(r["status"] == "reached" and r["ratio"] == 0 for r in per_seed)
    if counts["not_reached"]:
        bounds = logs + [math.log(r["ratio_lower_bound"]) for r in per_seed if r["status"] == "not_reached"]
        out["ratio_lower_bound"] = math.exp(sum(bounds) / len(bounds))
        return out
    if zero:  # reached at time 0 (started at or above the target): the geometric mean is 0, no log interval
        out["geo_mean"] = 0.0
        return out
    if logs:
        s = bc.mean_t_ci(logs)
        out["geo_mean"] = math.exp(s["mean"])
        if s["ci95"] is not None:
            out["ci95_low"], out["ci95_high"] = math.exp(s["mean"] - s["ci95"]), math.exp(s["mean"] + s["ci95"])
    return out


def late_mean(curve: Sequence[dict], budget_s: float, key: str = "train_s", fraction: float = 1 / 3) -> float:
    """Mean of a curve's evaluations in the last ``fraction`` of the budget (time >= (1 - fraction) * budget; the
    final evaluation is always among them). Steadier than the final point alone when a run's curve oscillates."""
    start = (1.0 - fraction) * budget_s - 1e-9
    pts = [p["mean"] for p in curve if p[key] >= start] or [curve[-1]["mean"]]
    return sum(pts) / len(pts)


def terms_of(summary: dict) -> list[str]:
    """The held-out terms of an evaluation summary: every score that has a ``_ci95`` beside it."""
    return [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and f"{k}_ci95" in summary]


def eval_grid(budget_s: float, every_s: float) -> list[float]:
    n = int(math.floor(budget_s / every_s + 1e-9))
    grid = [i * every_s for i in range(n + 1)]
    return grid if grid[-1] >= budget_s - 1e-9 else grid + [budget_s]


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation on increasing ``xs``; the end values outside."""
    if x <= xs[0]:
        return float(ys[0])
    for i in range(1, len(xs)):
        if x <= xs[i]:
            if xs[i] == xs[i - 1]:
                return float(ys[i])
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return float(ys[i - 1] + f * (ys[i] - ys[i - 1]))
    return float(ys[-1])


def grid_curves(runs: Sequence[dict], grid: Sequence[float], key: str = "train_s") -> dict[str, dict]:
    """Per term: the runs' (seeds') held-out means interpolated onto ``grid``, their mean per grid point and its
    95% interval over runs; with a single run the interval is that run's own 95% CI over the held-out clips."""
    terms = [t for t in terms_of(runs[0]["curve"][0]["scores"])
             if all(t in p["scores"] for r in runs for p in r["curve"])]
    out = {}
    for term in terms:
        per_run = []
        for r in runs:
            xs = [p[key] for p in r["curve"]]
            per_run.append([interp(xs, [p["scores"][term] for p in r["curve"]], g) for g in grid])
        mean, ci = [], []
        for j in range(len(grid)):
            s = bc.mean_t_ci(v[j] for v in per_run)
            mean.append(s["mean"])
            ci.append(s["ci95"])
        band = "seeds"
        if len(runs) == 1:
            r = runs[0]
            xs = [p[key] for p in r["curve"]]
            ci = [interp(xs, [_num(p["scores"].get(f"{term}_ci95")) for p in r["curve"]], g) for g in grid]
            band = "held-out clips"
        out[term] = {"t": list(grid), "mean": mean, "ci95": ci, "band": band, "runs": per_run}
    return out


def _num(x) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else 0.0


def summarise(results: dict[str, dict[int, dict]], labels: Sequence[str], baseline: str, key: str = "train_s",
              grid: Sequence[float] | None = None) -> dict:
    """Everything the report shows, from finished runs ``results[label][seed]`` (``bench_result.json`` contents).

    Returns {"presets": {label: per-preset summary}, "per_seed": {label: {seed: seed_ratio(...)}}, "curves":
    {label: grid_curves(...)}}; labels without finished runs are left out; time-to-target uses only seeds where
    the baseline has finished too.
    """
    from video_branch.core.stats import paired_change

    presets, per_seed, curves = {}, {}, {}
    late_of = {label: {s: late_mean(r["curve"], r["budget_s"], key) for s, r in runs.items()}
               for label, runs in results.items()}
    for label in labels:
        runs = results.get(label, {})
        if not runs:
            continue
        seeds = sorted(runs)
        first = runs[seeds[0]]
        metric = first["metric"]
        finals = {t: bc.mean_t_ci(runs[s]["curve"][-1]["scores"].get(t) for s in seeds)
                  for t in terms_of(first["curve"][-1]["scores"])}
        gains = [runs[s]["final"]["mean"] - runs[s]["before"]["mean"] for s in seeds]
        ratios = {}
        for s in seeds:
            base = results.get(baseline, {}).get(s)
            if base is not None:
                ratios[s] = seed_ratio(runs[s]["curve"], base["curve"], key)
        per_seed[label] = ratios
        tt = [r["time_to_target"]["interpolated_s"] for r in ratios.values() if r["status"] == "reached"]
        late, base_late = late_of[label], late_of.get(baseline, {})
        presets[label] = {
            "preset": first["preset"], "overrides": first["overrides"], "metric": metric, "seeds": seeds,
            "iterations": bc.mean_t_ci(runs[s]["iterations"] for s in seeds),
            "median_iter_s": bc.median(runs[s]["median_iter_s"] for s in seeds),
            "before": bc.mean_t_ci(runs[s]["before"]["mean"] for s in seeds),
            "final": finals[metric] if metric in finals else bc.mean_t_ci(runs[s]["final"]["mean"] for s in seeds),
            "final_per_term": finals,
            "final_per_seed": {s: runs[s]["final"]["mean"] for s in seeds},
            "final_clip_ci95_per_seed": {s: runs[s]["final"]["ci95"] for s in seeds},
            "gain": bc.mean_t_ci(gains),
            # Per seed, per term: final - start over the same held-out clips (same prompts and noise), 95% CI.
            "paired_change_per_seed": {s: paired_change(runs[s]["curve"][0]["scores"], runs[s]["curve"][-1]["scores"])
                                       for s in seeds},
            "leaves": bc.mean_t_ci(runs[s]["leaves"] for s in seeds),
            "forward_passes": bc.mean_t_ci(runs[s]["forward_passes"] for s in seeds),
            "gain_per_1k_leaves": bc.mean_t_ci(g / runs[s]["leaves"] * 1000 for g, s in zip(gains, seeds)
                                               if runs[s]["leaves"]),
            "gain_per_forward_pass": bc.mean_t_ci(g / runs[s]["forward_passes"] for g, s in zip(gains, seeds)
                                                  if runs[s]["forward_passes"]),
            "time_to_target_s": bc.mean_t_ci(tt),
            "time_to_target_ratio": ratio_over_seeds(list(ratios.values())) if ratios else None,
            # The last third of the budget's evaluations, averaged per seed (late_mean), and minus the baseline's in
            # the same seed: where a run ends, measured less by one evaluation's noise than "final".
            "late": bc.mean_t_ci(late.values()),
            "late_per_seed": late,
            "late_minus_baseline": bc.mean_t_ci(late[s] - base_late[s] for s in seeds if s in base_late),
            "final_mean": finals[metric]["mean"] if metric in finals else None,  # the earlier report's key
        }
        g = grid if grid is not None else eval_grid(first["budget_s"], first["spec"]["eval_every_s"])
        curves[label] = grid_curves([runs[s] for s in seeds], g, key)
    return {"presets": presets, "per_seed": per_seed, "curves": curves}


def goal_check(presets: dict, baseline: str, per_seed: dict) -> dict | None:
    preset, bound, quantity, min_seeds = GOAL
    if baseline != "dancegrpo" or preset not in presets or presets[preset]["time_to_target_ratio"] is None:
        return None
    r = presets[preset]["time_to_target_ratio"]
    values = [x["ratio"] for x in per_seed[preset].values()]
    enough = len(values) >= min_seeds
    met = bool(enough and all(v is not None and v <= bound for v in values))
    return {"preset": preset, "quantity": quantity, "bound": bound, "ratios": values, "geo_mean": r["geo_mean"],
            "seeds": len(values), "assessable": enough, "met": met}


# ------------------------------------------------------------------------------------------------ runs and files
def run_dir_of(work: Path, label: str, seed: int) -> Path:
    return work / label.replace(os.sep, "_") / f"seed{seed}"


def plan(variants: Sequence[bc.Variant], seeds: Sequence[int]) -> list[tuple[int, bc.Variant]]:
    """Seed by seed; seed i's preset order rotated by i."""
    out = []
    for i, seed in enumerate(seeds):
        k = i % len(variants)
        out += [(seed, v) for v in [*variants[k:], *variants[:k]]]
    return out


def run_spec(args, variant: bc.Variant, seed: int, cfg, metric: str) -> dict:
    return {"label": variant.label, "preset": variant.preset, "overrides": list(variant.overrides), "seed": seed,
            "config": args.config, "model": args.model, "common_overrides": list(args.set), "metric": metric,
            "budget_s": args.minutes * 60.0, "eval_every_s": args.eval_every_s, "clock": args.clock,
            "config_sha256": hashlib.sha256(cfg.to_yaml().encode()).hexdigest()}


def read_result(run_dir: Path) -> dict | None:
    """The run's ``bench_result.json``, or None when the run has not finished."""
    p = run_dir / RESULT
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):  # cannot come from write_json_atomic; treat as unfinished
        return None


def check_spec(result: dict, spec: dict, run_dir: Path) -> None:
    old = result.get("spec", {})
    diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if diff:
        shown = ", ".join(f"{k}: finished {old.get(k)!r} vs now {spec.get(k)!r}" for k in diff)
        raise SystemExit(f"{run_dir} holds a finished run with other settings ({shown}); use another --work-dir, or "
                         f"delete that run directory to redo it")


def lock_work_dir(work: Path):
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{work} is in use by another bench_alignment process (lock {work / LOCK})") from None
    return fd


def _point(summary: dict, metric: str, clocks: dict, iteration: int) -> dict:
    if metric not in summary:
        raise SystemExit(f"--metric {metric!r} is not among the held-out scores {sorted(terms_of(summary))}")
    return {**clocks, "iteration": iteration, "mean": summary[metric], "ci95": summary.get(metric + "_ci95"),
            "n": summary.get("n"), "scores": summary}


def default_metric(cfg) -> str:
    names = list(cfg.reward.components)
    if len(names) != 1:
        raise SystemExit(f"--metric is required: the config has several reward components {names}; pass one of them "
                         f"or a sub-score such as '{names[0]}/<key>'")
    return names[0]


def train_run(cfg, spec: dict, run_dir: Path) -> dict:
    """Train one (preset, seed) run for its budget in ``run_dir`` (emptied first) and write its files; returns the
    result that ``bench_result.json`` now holds."""
    from video_branch.config.specs import config_accounting

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run's leftovers: it starts again
    leaves_per_it = int(config_accounting(cfg)["leaves"]) * cfg.train.prompts_per_rank
    load_start, t_start = bc.load_average(), time.time()
    key, budget, metric = CLOCKS[spec["clock"]], spec["budget_s"], spec["metric"]
    tr = bc.make_trainer(cfg)  # creates the (empty) run directory; the trainer moves aside anything found there
    try:
        bc.write_json_atomic(run_dir / SPEC, spec)
        cfg.save(run_dir / "config.yaml")
        clocks = {"train_s": 0.0, "cpu_s": 0.0}
        totals = {"leaves": 0, "forward_passes": 0}
        rows, curve = [], []

        def record(name: str, it: int) -> None:
            p = _point(tr.evaluate(it, name), metric, clocks, it)
            p.update(totals)
            curve.append(p)
            with open(run_dir / CURVE, "a") as f:
                f.write(json.dumps(p) + "\n")
            print(f"  {spec['label']} seed {spec['seed']} {key}={clocks[key]:.0f} it={it}: {metric}={p['mean']:.4f}",
                  flush=True)

        record("before", 0)
        it, next_eval = 0, spec["eval_every_s"]
        while clocks[key] < budget:
            c0 = time.process_time()
            row = tr.train_iteration(it)
            cpu = time.process_time() - c0
            tr.logger.log(row)
            it += 1
            clocks["train_s"] += row["iter_s"]
            clocks["cpu_s"] += cpu
            totals["leaves"] += leaves_per_it
            totals["forward_passes"] += int(row["forward_passes"])
            rows.append({**{k: row.get(k) for k in ROW_KEYS}, "cpu_s": cpu})
            if clocks[key] >= next_eval or clocks[key] >= budget:
                record("during" if clocks[key] < budget else "after", it)
                while next_eval <= clocks[key]:
                    next_eval += spec["eval_every_s"]
    finally:
        lock = getattr(tr, "lock", None)
        if lock is not None:
            lock.release()
        bc.release(tr)
        tr = None
    result = {"spec": spec, "label": spec["label"], "preset": spec["preset"], "overrides": spec["overrides"],
              "seed": spec["seed"], "metric": metric, "clock": spec["clock"], "budget_s": budget,
              "iterations": it, "train_s": clocks["train_s"], "cpu_s": clocks["cpu_s"],
              "leaves_per_iteration": leaves_per_it, **totals,
              "median_iter_s": bc.median(r["iter_s"] for r in rows),
              "before": {"mean": curve[0]["mean"], "ci95": curve[0]["ci95"]},
              "final": {"mean": curve[-1]["mean"], "ci95": curve[-1]["ci95"], "n": curve[-1]["n"]},
              "wall_s_with_evaluation": time.time() - t_start, "load_average_start": load_start,
              "load_average_end": bc.load_average(), "curve": curve, "rows": rows}
    bc.write_json_atomic(run_dir / RESULT, result)
    return result


def collect(work: Path, plan_: Sequence[tuple[int, bc.Variant]], specs: dict | None = None):
    """{label: {seed: result}} of the finished runs of ``plan_`` and the list of unfinished (seed, label); with
    ``specs`` ({(seed, label): spec}) a finished run of other settings stops the bench."""
    results, pending = {}, []
    for seed, v in plan_:
        d = run_dir_of(work, v.label, seed)
        r = read_result(d)
        if r is not None and specs is not None:
            check_spec(r, specs[(seed, v.label)], d)
        if r is None:
            pending.append((seed, v.label))
        else:
            results.setdefault(v.label, {})[seed] = r
    return results, pending


# ------------------------------------------------------------------------------------------------ output
def plot(summary: dict, labels: Sequence[str], baseline: str, key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    shown = [k for k in labels if k in curves]
    first = curves[shown[0]]
    metric = summary["presets"][shown[0]]["metric"]
    # A term whose curves are the metric's in every preset (the reward's own "overall") would repeat its panel.
    same = {t for t in first if t != metric and all(
        curves[k].get(t, {}).get("mean") == curves[k].get(metric, {}).get("mean") for k in shown)}
    terms = [metric] + [t for t in first if t != metric and t not in same]
    change = f"{metric} minus its start"  # the last panel: each seed's curve less its own start, paired over clips
    terms.append(change)
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, term in zip(axes.flat, terms):
        bands = set()
        for li, label in enumerate(labels):
            c = curves.get(label, {}).get(metric if term == change else term)
            if c is None:
                continue
            x = [t / 60 for t in c["t"]]
            y, ci, band = c["mean"], [_num(v) for v in c["ci95"]], c["band"]
            if term == change:
                stats = [bc.mean_t_ci(r[j] - r[0] for r in c["runs"]) for j in range(len(c["t"]))]
                y, ci = [st["mean"] for st in stats], [_num(st["ci95"]) for st in stats]
                band = "seeds" if len(c["runs"]) > 1 else None
            col = colours[li % len(colours)]
            n = len(summary["presets"][label]["seeds"])
            ax.plot(x, y, "-", color=col, marker="o", ms=2.5, lw=1.2, label=f"{label} ({n} seed{'s' * (n > 1)})")
            ax.fill_between(x, [a - b for a, b in zip(y, ci)], [a + b for a, b in zip(y, ci)], color=col,
                            alpha=0.12 if len(labels) <= 4 else 0.05)
            if band:
                bands.add(band)
        if term == metric and baseline in summary["presets"]:
            ax.axhline(summary["presets"][baseline]["final"]["mean"], color="grey", lw=0.8, ls="--",
                       label=f"{baseline} final, mean over seeds (target)")
        if term == change:
            ax.axhline(0.0, color="black", lw=0.6)
        what = f"bands: 95% CI over {' / '.join(sorted(bands))}" if bands else "no band with one seed"
        ax.set_title(f"held-out {term}\n{what}", fontsize=8)
        ax.set_xlabel(f"training {'CPU time' if key == 'cpu_s' else 'wall-clock'} (min, evaluation excluded)",
                      fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + len(names) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "-"
    m = f"{s['mean']:.{digits}g}" if abs(s["mean"]) < 1e-2 and s["mean"] != 0 else f"{s['mean']:.{digits}f}"
    if s.get("ci95") is None:
        return m
    c = f"{s['ci95']:.{digits}g}" if abs(s["ci95"]) < 1e-2 else f"{s['ci95']:.{digits}f}"
    return f"{m} +- {c}"


def ratio_text(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["geo_mean"] is not None:
        text = f"{r['geo_mean']:.2f}"
        if r["ci95_low"] is not None:
            text += f" [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
        return text
    if r["ratio_lower_bound"] is not None:
        return f"> {r['ratio_lower_bound']:.2f} (not reached in {r['not_reached']}/{r['seeds']})"
    return "- (baseline flat)" if r["baseline_flat"] else "-"


def report(summary: dict, baseline: str, goal: dict | None, pending: Sequence) -> str:
    rows = []
    for k, s in summary["presets"].items():
        r = s["time_to_target_ratio"]
        comparable = r["seeds"] - r["baseline_flat"] if r else 0
        rows.append([k, len(s["seeds"]), _pm(s["iterations"], 1), s["median_iter_s"], _pm(s["before"]),
                     _pm(s["final"]), s["final"]["sd"], _pm(s["time_to_target_s"]), ratio_text(r),
                     f"{r['reached']}/{comparable}" if comparable else "-", _pm(s["late"]),
                     _pm(s["late_minus_baseline"]), _pm(s["gain_per_1k_leaves"]), _pm(s["gain_per_forward_pass"])])
    metric = next(iter(summary["presets"].values()))["metric"] if summary["presets"] else "?"
    text = bc.markdown_table(["preset", "seeds", "iterations", "median iter s", f"held-out {metric} before",
                              "final (+- 95% CI over seeds)", "sd over seeds", "time to target s",
                              f"time / {baseline}'s (geo mean [95% CI])", "reached", "late mean (last third)",
                              f"late - {baseline}'s", "gain per 1k leaves",
                              "gain per forward pass"], rows)
    flat = [k for k, s in summary["presets"].items() if s["time_to_target_ratio"]
            and s["time_to_target_ratio"]["baseline_flat"]]
    if flat:
        text += (f"\n\n{baseline} did not end above its own start in "
                 f"{summary['presets'][flat[0]]['time_to_target_ratio']['baseline_flat']} seed(s): no time ratio "
                 f"there (the target is met at time 0)")
    if goal:
        state = ("met" if goal["met"] else "not met") if goal["assessable"] else \
            f"not assessable with {goal['seeds']} seed(s) (needs {GOAL[3]})"
        text += (f"\n\ngoal: {goal['preset']}: {goal['quantity']} <= {goal['bound']}; per seed {goal['ratios']}: "
                 f"{state}")
    if pending:
        text += f"\n\nunfinished runs (not in this report): {', '.join(f'{lb}/seed{s}' for s, lb in pending)}"
    return text


# ------------------------------------------------------------------------------------------------ entry point
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny/bench.yaml", help="base config every preset is loaded from")
    ap.add_argument("--model", default=None, help="model directory (default: the config's model.path)")
    ap.add_argument("--presets", default=PRESETS,
                    help="comma-separated [label=]preset[+key=value...] (any registered preset; default: the ten)")
    ap.add_argument("--baseline", default="dancegrpo", help="label whose final held-out reward is the target")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"training budget per preset and seed (default {FULL['minutes']}, --quick "
                         f"{QUICK['minutes']:.3g})")
    ap.add_argument("--eval-every-s", type=float, default=None,
                    help=f"seconds of training between evaluations (default {FULL['eval_every_s']:g}, --quick "
                         f"{QUICK['eval_every_s']:g})")
    ap.add_argument("--seeds", default=None, help=f"comma-separated train.seed values (default {FULL['seeds']}, "
                                                  "--quick the first)")
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, 20 s of training per preset")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="what the budget and the curves count: wall-clock or the process's CPU seconds")
    ap.add_argument("--metric", default=None, help="held-out score for time to target and gains (default: the only "
                                                   "reward component); curves show every term")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    ap.add_argument("--work-dir", default=None, help="run directories (default: --out's name with _runs; kept, so "
                                                     "that a rerun continues)")
    ap.add_argument("--max-runs", type=int, default=None, help="train at most this many unfinished runs, then report")
    ap.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    ap.add_argument("--out", default="runs/bench/alignment.json", help="JSON report")
    ap.add_argument("--plot", default=None, help="PNG of the curves (default: --out with .png)")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.minutes = mode["minutes"] if args.minutes is None else args.minutes
    args.eval_every_s = mode["eval_every_s"] if args.eval_every_s is None else args.eval_every_s
    if args.minutes <= 0 or args.eval_every_s <= 0:
        ap.error("--minutes and --eval-every-s must be positive")
    if args.max_runs is not None and args.max_runs < 0:
        ap.error("--max-runs must be >= 0")
    seeds = args.seeds if args.seeds is not None else ("0" if args.quick else FULL["seeds"])
    try:
        args.seeds = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {seeds!r}")
    if not args.seeds:
        ap.error("--seeds: no seed given")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds: repeated seed in {seeds!r}")
    if args.quick:
        args.seeds = args.seeds[:QUICK["seeds"]]
    return args


def main(argv=None) -> dict[str, object]:
    args = parse_args(argv)
    variants = bc.variants_with_baseline(args.presets, args.baseline)
    labels = [v.label for v in variants]
    if args.model:
        args.model = bc.check_model_dir(args.model)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "_runs")
    order = plan(variants, args.seeds)
    env = bc.environment()
    t0 = time.time()
    lock = lock_work_dir(work)
    try:
        configs, specs = {}, {}
        for seed, v in order:
            common = [f"train.seed={seed}", *args.set] + ([f"model.path={args.model}"] if args.model else [])
            cfg = bc.variant_config(args.config, v, common, run_dir_of(work, v.label, seed))
            metric = args.metric or default_metric(cfg)
            configs[(seed, v.label)], specs[(seed, v.label)] = cfg, run_spec(args, v, seed, cfg, metric)
        results, pending = collect(work, order, specs)
        trained = 0
        if not args.report_only:
            todo = [p for p in order if (p[0], p[1].label) in set(pending)]
            if results:
                print(f"{sum(len(r) for r in results.values())} finished runs kept in {work}; {len(todo)} to run",
                      flush=True)
            for seed, v in todo:
                if args.max_runs is not None and trained >= args.max_runs:
                    break
                cfg = configs[(seed, v.label)]
                bc.check_model_dir(cfg.model.path, "model.path")
                print(f"[{trained + 1}/{len(todo)}] {v.label} seed {seed}: training {args.minutes * 60:g} s",
                      flush=True)
                train_run(cfg, specs[(seed, v.label)], run_dir_of(work, v.label, seed))
                trained += 1
            results, pending = collect(work, order, specs)
    finally:
        os.close(lock)
    if not results:
        raise SystemExit(f"no finished run in {work} to report")
    key = CLOCKS[args.clock]
    summary = summarise(results, labels, args.baseline, key, eval_grid(args.minutes * 60.0, args.eval_every_s))
    goal = goal_check(summary["presets"], args.baseline, summary["per_seed"])
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(summary, labels, args.baseline, key, png)
    runs = {}
    for label, by_seed in results.items():
        for seed, r in by_seed.items():
            cmp = summary["per_seed"].get(label, {}).get(seed, {})
            runs.setdefault(str(seed), {})[label] = {**r, "target": cmp.get("target"),
                                                     "time_to_target": cmp.get("time_to_target"),
                                                     "time_to_target_ratio": cmp.get("ratio"),
                                                     "time_to_target_status": cmp.get("status")}
    result = {"environment": env, "load_average_after": bc.load_average(), "config": args.config,
              "model": args.model, "baseline": args.baseline, "presets": labels, "minutes": args.minutes,
              "eval_every_s": args.eval_every_s, "seeds": args.seeds, "clock": args.clock, "quick": args.quick,
              "overrides": args.set, "work_dir": str(work), "runs_trained_now": trained if not args.report_only else 0,
              "wall_s": time.time() - t0, "pending": [{"seed": s, "label": lb} for s, lb in pending],
              "summary": summary["presets"], "curves": summary["curves"],
              "time_to_target_per_seed": {k: {str(s): v for s, v in d.items()} for k, d in summary["per_seed"].items()},
              "goal": goal, "plot": str(png), "runs": runs}
    bc.write_json_atomic(out, result)
    print(report(summary, args.baseline, goal, pending))
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
