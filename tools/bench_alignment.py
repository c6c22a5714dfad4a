"""Held-out reward against training wall-clock: which preset reaches DanceGRPO's final reward first.

    python tools/bench_alignment.py --out runs/bench/alignment.json      # 3 presets x 5 min of training + evaluation

Every preset trains the same model from the same weights, prompts and seed for the same budget of training
wall-clock (``--minutes``, the sum of the trainer's per-iteration times; evaluation is not counted). The presets'
iterations are interleaved, always advancing the one with the least training time so far, so that a slow phase of a
shared machine falls on all of them alike. Held-out reward (``Trainer.evaluate``: ODE samples from fixed seeds) is
measured at the start, every ``--eval-every-s`` seconds of training time and at the end of the budget.

Reported per preset: the held-out curve (mean and 95% CI per evaluation), the final held-out reward with its CI, and
the training time to reach the target, which is the baseline's (DanceGRPO's) final held-out mean, found by linear
interpolation between the two evaluations around the first crossing (the time of that evaluation itself is reported
as well). The baseline's own time to target is when it first reaches its final value, at most its budget. With
several ``--seeds`` the comparison is repeated per seed and the summary gives medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bc

GOAL = ("branchgrpo_deppru", 0.45, "time to DanceGRPO's final held-out reward / DanceGRPO's time")


def time_to_target(curve: Sequence[dict], target: float) -> dict[str, float | None]:
    """First crossing of ``target`` on a curve of {"train_s", "mean"} points in time order.

    Returns {"at_eval_s": time of the first evaluation with mean >= target, "interpolated_s": the linear
    interpolation between it and the evaluation before (that evaluation's time when it is the first point)}; both
    None when the curve never reaches the target.
    """
    for i, p in enumerate(curve):
        if p["mean"] >= target:
            if i == 0:
                return {"at_eval_s": p["train_s"], "interpolated_s": p["train_s"]}
            q = curve[i - 1]
            frac = (target - q["mean"]) / (p["mean"] - q["mean"])  # q["mean"] < target <= p["mean"]
            return {"at_eval_s": p["train_s"], "interpolated_s": q["train_s"] + frac * (p["train_s"] - q["train_s"])}
    return {"at_eval_s": None, "interpolated_s": None}


def default_metric(cfg) -> str:
    names = list(cfg.reward.components)
    if len(names) != 1:
        raise SystemExit(f"--metric is required: the config has several reward components {names}; pass one of them "
                         f"or a sub-score such as '{names[0]}/<key>'")
    return names[0]


def _point(summary: dict, metric: str, train_s: float, iteration: int) -> dict:
    if metric not in summary:
        names = sorted(k for k in summary if not k.endswith("_ci95") and k not in ("n", "valid", "per_clip"))
        raise SystemExit(f"--metric {metric!r} is not among the held-out scores {names}")
    return {"train_s": train_s, "iteration": iteration, "mean": summary[metric], "ci95": summary.get(metric + "_ci95"),
            "n": summary.get("n"), "scores": summary}


def run_seed(seed: int, variants: list[bc.Variant], args, work: Path) -> dict[str, dict]:
    common = [f"train.seed={seed}", *args.set] + ([f"model.path={args.model}"] if args.model else [])
    configs = {v.label: bc.variant_config(args.config, v, common, work / f"seed{seed}" / v.label) for v in variants}
    metric = args.metric or default_metric(next(iter(configs.values())))
    budget = args.minutes * 60.0
    trainers, state = {}, {}
    for label, cfg in configs.items():
        bc.check_model_dir(cfg.model.path, "model.path")
        print(f"[seed {seed}] building {label}", flush=True)
        trainers[label] = bc.make_trainer(cfg)
    for label, tr in trainers.items():
        summary = tr.evaluate(0, "before")
        state[label] = {"clock": 0.0, "iteration": 0, "next_eval": args.eval_every_s, "rows": [],
                        "curve": [_point(summary, metric, 0.0, 0)]}
        print(f"[seed {seed}] {label} before: {metric}={summary[metric]:.4f}", flush=True)
    labels = [v.label for v in variants]
    while True:
        running = [k for k in labels if state[k]["clock"] < budget]
        if not running:
            break
        label = min(running, key=lambda k: state[k]["clock"])  # ties resolve in preset order
        s, tr = state[label], trainers[label]
        row = tr.train_iteration(s["iteration"])
        s["iteration"] += 1
        s["clock"] += row["iter_s"]
        s["rows"].append({k: row.get(k) for k in ("iteration", "iter_s", "rollout_s", "reward_s", "train_s",
                                                   "reward_mean", "forward_passes", "trained_edges")})
        if s["clock"] >= s["next_eval"] or s["clock"] >= budget:
            summary = tr.evaluate(s["iteration"], "during" if s["clock"] < budget else "after")
            s["curve"].append(_point(summary, metric, s["clock"], s["iteration"]))
            while s["next_eval"] <= s["clock"]:
                s["next_eval"] += args.eval_every_s
            print(f"[seed {seed}] {label} t={s['clock']:.0f}s it={s['iteration']}: {metric}={summary[metric]:.4f}",
                  flush=True)
    for tr in trainers.values():
        bc.release(tr)
    trainers.clear()

    target = state[args.baseline]["curve"][-1]["mean"]
    base_t = time_to_target(state[args.baseline]["curve"], target)
    out = {}
    for label in labels:
        s = state[label]
        t = time_to_target(s["curve"], target)
        final, before = s["curve"][-1], s["curve"][0]
        # A baseline that ends no higher than it started gives no time to compare against (its time would be 0).
        ratio = None
        if t["interpolated_s"] is not None and base_t["interpolated_s"]:
            ratio = t["interpolated_s"] / base_t["interpolated_s"]
        variant = next(v for v in variants if v.label == label)
        out[label] = {"preset": variant.preset, "overrides": list(variant.overrides),
                      "metric": metric, "iterations": s["iteration"], "train_s": s["clock"], "budget_s": budget,
                      "before": {"mean": before["mean"], "ci95": before["ci95"]},
                      "final": {"mean": final["mean"], "ci95": final["ci95"], "n": final["n"]},
                      "target": target, "target_above_start": bool(target > state[args.baseline]["curve"][0]["mean"]),
                      "time_to_target": t, "time_to_target_ratio": ratio,
                      "median_iter_s": bc.median(r["iter_s"] for r in s["rows"]),
                      "curve": s["curve"], "rows": s["rows"]}
    return out


def summarise(per_seed: dict[int, dict[str, dict]], labels: list[str]) -> dict[str, dict]:
    out = {}
    for label in labels:
        runs = [per_seed[s][label] for s in per_seed]
        ratios = [r["time_to_target_ratio"] for r in runs if r["time_to_target_ratio"] is not None]
        reached = [r for r in runs if r["time_to_target"]["interpolated_s"] is not None]
        out[label] = {"final_mean": bc.median(r["final"]["mean"] for r in runs),
                      "final_ci95": bc.median(r["final"]["ci95"] for r in runs),
                      "before_mean": bc.median(r["before"]["mean"] for r in runs),
                      "time_to_target_s": bc.median(r["time_to_target"]["interpolated_s"] for r in runs),
                      "time_to_target_ratio": bc.median(ratios) if len(ratios) == len(runs) else None,
                      "reached_target": f"{len(reached)}/{len(runs)}",
                      "baseline_improved": f"{sum(r['target_above_start'] for r in runs)}/{len(runs)}",
                      "iterations": bc.median(r["iterations"] for r in runs),
                      "median_iter_s": bc.median(r["median_iter_s"] for r in runs)}
    return out


def plot(per_seed: dict[int, dict[str, dict]], labels: list[str], baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for si, (seed, runs) in enumerate(per_seed.items()):
        for li, label in enumerate(labels):
            c = runs[label]["curve"]
            x = [p["train_s"] / 60 for p in c]
            y = [p["mean"] for p in c]
            ci = [p["ci95"] if p["ci95"] is not None and p["ci95"] == p["ci95"] else 0.0 for p in c]
            col = colours[li % len(colours)]
            ax.plot(x, y, styles[si % len(styles)], color=col, marker="o", ms=3,
                    label=label if si == 0 else None)
            ax.fill_between(x, [a - b for a, b in zip(y, ci)], [a + b for a, b in zip(y, ci)], color=col, alpha=0.12)
        ax.axhline(runs[baseline]["target"], color="grey", lw=0.8, ls="--")
    metric = next(iter(next(iter(per_seed.values())).values()))["metric"]
    ax.set_xlabel("training wall-clock (min, evaluation excluded)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"dashed line: {baseline}'s final held-out reward", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict[str, dict], baseline: str, goal: dict | None) -> str:
    rows = [[k, s["iterations"], s["median_iter_s"], s["before_mean"], s["final_mean"], s["final_ci95"],
             s["time_to_target_s"], s["time_to_target_ratio"], s["reached_target"]] for k, s in summary.items()]
    text = bc.markdown_table(["preset", "iterations", "median iter s", "held-out before", "held-out final",
                              "final 95% CI +-", "time to target (s)", f"/ {baseline}", "reached"], rows)
    first = next(iter(summary.values()))
    if first["baseline_improved"].startswith("0/"):
        text += (f"\n\n{baseline} did not end above its starting held-out reward, so the target was met at time 0 and "
                 f"times to target are not comparable")
    if goal:
        text += (f"\n\ngoal: {goal['quantity']} of {goal['preset']} <= {goal['bound']}: measured "
                 f"{goal['value']}, {'met' if goal['met'] else 'not met'}")
    return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny/dancegrpo.yaml", help="base config every preset is loaded from")
    ap.add_argument("--model", default=None, help="model directory (default: the config's model.path)")
    ap.add_argument("--presets", default="dancegrpo,branchgrpo,branchgrpo_deppru",
                    help="comma-separated [label=]preset[+key=value...] (any registered preset)")
    ap.add_argument("--baseline", default="dancegrpo", help="label whose final held-out reward is the target")
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per preset")
    ap.add_argument("--eval-every-s", type=float, default=60.0, help="seconds of training time between evaluations")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values; one comparison per seed")
    ap.add_argument("--metric", default=None, help="held-out score to compare (default: the only reward component)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a temp dir, removed at the end)")
    ap.add_argument("--out", default="runs/bench/alignment.json", help="JSON report")
    ap.add_argument("--plot", default=None, help="PNG of the curves (default: --out with .png)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.eval_every_s <= 0:
        ap.error("--minutes and --eval-every-s must be positive")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        ap.error("--seeds: no seed given")
    return args


def main(argv=None) -> dict[str, object]:
    args = parse_args(argv)
    variants = bc.variants_with_baseline(args.presets, args.baseline)
    labels = [v.label for v in variants]
    if args.model:
        args.model = bc.check_model_dir(args.model)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_alignment_"))
    env = bc.environment()
    try:
        per_seed = {seed: run_seed(seed, variants, args, work) for seed in args.seeds}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(per_seed, labels)
    goal = None
    if args.baseline == "dancegrpo" and GOAL[0] in summary:
        v = summary[GOAL[0]]["time_to_target_ratio"]
        goal = {"preset": GOAL[0], "quantity": GOAL[2], "bound": GOAL[1], "value": v,
                "met": bool(v is not None and v <= GOAL[1])}
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(per_seed, labels, args.baseline, png)
    result = {"environment": env, "load_average_after": bc.load_average(), "config": args.config,
              "model": args.model, "baseline": args.baseline, "minutes": args.minutes,
              "eval_every_s": args.eval_every_s, "seeds": args.seeds, "overrides": args.set, "summary": summary,
              "goal": goal, "plot": str(png), "runs": {str(k): v for k, v in per_seed.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(report(summary, args.baseline, goal))
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
