"""eval_videoalign: statistics, generator evaluation (resumable, corrupt videos) and VideoGen-RewardBench accuracy."""

import csv
import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reward_models
from video_branch.models import build_tiny_wan
from video_branch.video import read_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def _load(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


ev = _load("eval_videoalign", ROOT / "tools" / "eval_videoalign.py")
# The tiny VideoAlign checkpoint in the released layout, built by the reward's own tests.
released = _load("videoalign_checkpoint_fixture", ROOT / "tests" / "test_reward_videoalign.py").released

TINY = ["--videoalign-option", "min_pixels=3136", "--steps", "2", "--frames", "5", "--height", "32", "--width", "32",
        "--fps", "8", "--quiet"]


# ------------------------------------------------------------------------------------------------------- stats
def test_mean_ci_and_paired_difference_by_hand():
    s = ev.mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["std"] == pytest.approx(sd) and s["ci95"] == pytest.approx(1.96 * sd / 2, rel=1e-3)
    assert math.isnan(ev.mean_ci([5.0])["ci95"]) and ev.mean_ci([])["n"] == 0
    d = ev.paired_difference([1.0, 2.0, 3.0, 4.0, 9.0], [0.0, 2.0, 4.0, 2.0, float("nan")])
    # diffs 1, 0, -1, 2 (the NaN pair is dropped)
    assert d["n"] == 4 and d["mean_diff"] == 0.5
    assert (d["win_rate"], d["tie_rate"], d["loss_rate"]) == (0.5, 0.25, 0.25)


def _brute_with_ties(h, m):
    """calc_accuracy.py's accuracy with ties, transcribed: stats at epsilon -1 (no model ties), then for each pair
    in stable |m| order remove it under the previous epsilon, set epsilon to its |m|, add it back, score."""
    def classify(hi, mi, eps, strict):
        tied = abs(mi) < eps if strict else abs(mi) <= eps
        if hi == 0:
            return "Thm" if tied else "Th"
        if tied:
            return "Tm"
        return "C" if hi * mi > 0 else "D"

    stat = {"C": 0, "D": 0, "Th": 0, "Tm": 0, "Thm": 0}
    for hi, mi in zip(h, m):
        stat[classify(hi, mi, -1, strict=False)] += 1
    best, eps_best, eps = float("-inf"), 0, -1
    for hi, mi in sorted(zip(h, m), key=lambda x: abs(x[1])):
        stat[classify(hi, mi, eps, strict=True)] -= 1
        eps = abs(mi)
        stat[classify(hi, mi, eps, strict=False)] += 1
        acc = (stat["C"] + stat["Thm"]) / sum(stat.values())
        if acc > best:
            best, eps_best = acc, eps
    return best, eps_best


def test_accuracy_with_ties_is_the_released_definition_on_random_and_tie_heavy_sets():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 30))
        h = rng.integers(-1, 2, n)
        if trial % 2:
            m = rng.integers(-3, 4, n) * 0.25  # tie-heavy: many equal |differences|, zeros included
        else:
            m = rng.normal(size=n)
        acc, eps = ev.accuracy_with_ties(h, m)
        want_acc, want_eps = _brute_with_ties(list(h), list(m))
        assert acc == pytest.approx(want_acc) and eps == pytest.approx(want_eps), (h, m)


def test_accuracy_with_ties_splits_runs_and_always_predicts_a_tie():
    # The released sweep starts at one predicted tie and scores after each pair, inside a run of equal |diff|.
    h = [1, 0, 1, 1]
    m = [0.5, 0.5, 1.0, 2.0]
    # k = 1 (first 0.5 tied): 0 + 2 = 2; k = 2: 1 + 2 = 3 (best); "no ties" would score 3 too but is never tried.
    assert ev.accuracy_with_ties(h, m) == (0.75, 0.5)
    # Equal |diff| keep their order: with the human tie first, tying it alone gets both pairs right.
    assert ev.accuracy_with_ties([0, 1], [0.5, 0.5]) == (1.0, 0.5)
    assert ev.accuracy_with_ties([1, 0], [0.5, 0.5]) == (0.5, 0.5)
    # The example of calc_accuracy.py's __main__.
    h = [1, -1, 0, 1, -1, 0, 1, -1, 0]
    a = [0.9, -0.7, 0.1, 0.8, -0.6, 0.2, 0.7, -0.5, 0.3]
    b = [0.1, -0.8, 0.5, 0.5, -0.3, 0.3, 0.4, -0.4, 0.4]
    m = [x - y for x, y in zip(a, b)]
    assert ev.accuracy_with_ties(h, m)[0] == pytest.approx(_brute_with_ties(h, m)[0])
    assert all(math.isnan(x) for x in ev.accuracy_with_ties([], []))


def test_accuracy_without_ties_by_hand():
    assert ev.accuracy_without_ties([1, -1, 0, 1, -1], [0.5, -0.2, 3.0, -0.1, 0.0]) == 0.5
    assert math.isnan(ev.accuracy_without_ties([0, 0], [1.0, 2.0]))


# ------------------------------------------------------------------------------------------------- rewardbench
VQ = {"v1": 1.0, "v2": 0.5, "v3": 1.05, "v4": 1.25, "v5": 0.5, "v6": 0.4}
BENCH = [  # path_A, path_B, labels VQ, MQ, TA, Overall
    ("v1", "v2", "A", "A", "A", "B"),
    ("v3", "v4", "B", "same", "A", "B"),
    ("v5", "v6", "same", "same", "A", "B"),
    ("v1", "v3", "A", "B", "A", "B"),
    ("v2", "v5", "B", "same", "A", "B"),
    ("v4", "v6", "same", "same", "A", "B"),
]


def _write_bench(folder, rows, prompts=None):
    """A VideoGen-RewardBench CSV; pair i's prompt is prompts[i] (default 'prompt i')."""
    path = folder / "bench.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_A", "path_B", "prompt", "fps_A", "fps_B", "num_frames_A", "num_frames_B", "VQ", "MQ", "TA",
                    "Overall"])
        for i, (a, b, *labels) in enumerate(rows):
            w.writerow([a, b, (prompts or {}).get(i, f"prompt {i}"), 8, 8, 9, 9, *labels])
    return path


def test_rewardbench_accuracy_matches_hand_computed_values(tmp_path, capsys):
    csv_path = _write_bench(tmp_path, BENCH)
    out = tmp_path / "out"
    out.mkdir()
    # Prefilled scores: MQ all equal, TA = VQ, Overall = -VQ.
    with (out / "scores.jsonl").open("w") as f:
        for v, s in VQ.items():
            for i in range(len(BENCH)):
                f.write(json.dumps({"path": v, "prompt": f"prompt {i}", "VQ": s, "MQ": 0.0, "TA": s, "Overall": -s})
                        + "\n")
    assert ev.main(["rewardbench", "--csv", str(csv_path), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "rewardbench.json").read_text())["dimensions"]
    # VQ diffs 0.5, -0.2, 0.1, -0.05, 0, 0.85: preferences right in pairs 1 and 2 of 4; best tie threshold 0.1
    # makes pair 3 (same) right too: 3 of 6.
    assert res["VQ"]["accuracy_without_ties"] == 0.5
    assert res["VQ"]["accuracy_with_ties"] == 0.5 and res["VQ"]["tie_threshold"] == pytest.approx(0.1)
    # MQ diffs all 0: both preferences wrong; every pair predicted a tie: the 4 'same' pairs right.
    assert res["MQ"]["accuracy_without_ties"] == 0.0
    assert res["MQ"]["accuracy_with_ties"] == pytest.approx(4 / 6) and res["MQ"]["tie_threshold"] == 0.0
    # TA: all A, right where VQ diff > 0 (pairs 1, 3, 6); no human ties: the released sweep's best is its first
    # step, one predicted tie at the smallest |diff| (0, pair 5, which was wrong anyway).
    assert res["TA"]["accuracy_without_ties"] == 0.5
    assert res["TA"]["accuracy_with_ties"] == 0.5 and res["TA"]["tie_threshold"] == 0.0
    assert res["Overall"]["accuracy_without_ties"] == 0.5
    assert res["Overall"]["n_pairs"] == 6 and res["VQ"]["n_pairs_without_ties"] == 4
    table = (out / "rewardbench.md").read_text()
    assert "| VQ | 50.0% | 50.0% | 0.1000 | 6 (4) |" in table and "| TA | 50.0% | 50.0% | 0.0000 |" in table


def test_rewardbench_reports_bad_csvs(tmp_path, capsys):
    bad = _write_bench(tmp_path, [("v1", "v2", "A", "left", "A", "A")])
    assert ev.main(["rewardbench", "--csv", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: column MQ must be A, B or same, got 'left'" in capsys.readouterr().err
    (tmp_path / "cols.csv").write_text("path_A,path_B\nx,y\n")
    assert ev.main(["rewardbench", "--csv", str(tmp_path / "cols.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing column(s) ['prompt', 'VQ', 'MQ', 'TA', 'Overall']" in capsys.readouterr().err
    ok = _write_bench(tmp_path, BENCH[:1])
    assert ev.main(["rewardbench", "--csv", str(ok), "--out", str(tmp_path / "o2")]) == 2
    assert "give --videoalign" in capsys.readouterr().err


def test_rewardbench_scores_videos_with_videoalign_and_skips_corrupt_ones(released, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        write_mp4(tmp_path / f"{name}.mp4", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), fps=8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 400)
    csv_path = _write_bench(tmp_path, [("a.mp4", "b.mp4", "A", "B", "same", "A"),
                                       ("b.mp4", "c.mp4", "B", "A", "A", "same"),
                                       ("c.mp4", "broken.mp4", "A", "A", "A", "A")],
                            prompts={0: "a red circle", 1: "a red circle", 2: "a blue box"})
    out = tmp_path / "out"
    args = ["rewardbench", "--csv", str(csv_path), "--out", str(out), "--videoalign", released["lora"],
            "--videoalign-base", released["base"], "--videoalign-option", "min_pixels=3136", "--quiet"]
    assert ev.main(args) == 0
    summary = json.loads((out / "rewardbench.json").read_text())
    assert summary["skipped_pairs"] == 1 and list(summary["failed_videos"]) == ["broken.mp4"]
    # c.mp4 is judged against two prompts: scored once for each; broken.mp4 is reported once.
    rows = ev.read_jsonl(out / "scores.jsonl")
    assert [r["path"] for r in rows if "error" in r] == ["broken.mp4"] and "VQ" not in rows[-1]
    cached = {(r["path"], r["prompt"]): r for r in rows if "error" not in r}
    assert all(r["fps"] == pytest.approx(8.0) for r in cached.values())  # the files' own frame rate
    assert sorted(cached) == [("a.mp4", "a red circle"), ("b.mp4", "a red circle"), ("c.mp4", "a blue box"),
                              ("c.mp4", "a red circle")]
    rm = reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136,
                             video_fps=8.0)
    frames = torch.from_numpy(np.stack([read_video(tmp_path / f"{n}.mp4") for n in "abc"]))
    direct = rm(frames, ["a red circle"] * 3)
    for i, n in enumerate("abc"):
        for k in ev.VIDEOALIGN_KEYS:
            assert cached[(f"{n}.mp4", "a red circle")][k] == pytest.approx(float(direct[k][i]), rel=1e-4, abs=1e-5)
    cached = {p: r for (p, prompt), r in cached.items() if prompt == "a red circle"}
    # Accuracy from those scores, by the definitions (two scored pairs).
    for k, labels in zip(ev.VIDEOALIGN_KEYS, [(1, -1), (-1, 1), (0, 1), (1, 0)]):
        d = [cached["a.mp4"][k] - cached["b.mp4"][k], cached["b.mp4"][k] - cached["c.mp4"][k]]
        want = [x * h > 0 for h, x in zip(labels, d) if h != 0]
        assert summary["dimensions"][k]["accuracy_without_ties"] == pytest.approx(sum(want) / len(want))
        assert summary["dimensions"][k]["accuracy_with_ties"] == pytest.approx(_brute_with_ties(labels, d)[0])
    # A rerun scores nothing again (the cache holds every readable video).
    before = (out / "scores.jsonl").read_text()
    assert ev.main(args) == 0
    assert (out / "scores.jsonl").read_text() == before


# ------------------------------------------------------------------------------------------- generator evaluation
@pytest.fixture(scope="module")
def wan_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    build_tiny_wan(root / "base", seed=0)
    build_tiny_wan(root / "other", seed=3)
    (root / "prompts.txt").write_text("a red circle moving left\n# a comment\na blue square moving up\n")
    return root


def _gen_args(released, wan_models, out, model="base", extra=()):
    args = ["generate", "--prompts", str(wan_models / "prompts.txt"), "--clips-per-prompt", "2", "--batch", "3",
            "--videoalign", released["lora"], "--videoalign-base", released["base"], "--out", str(out), *TINY,
            *extra]
    return args + (["--model", str(wan_models / model)] if model else [])


def test_generator_evaluation_writes_results_summary_and_table_and_resumes(released, wan_models, tmp_path, capsys):
    out = tmp_path / "eval"
    assert ev.main(_gen_args(released, wan_models, out)) == 0
    rows = ev.read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in rows] == ["p00000_c0", "p00000_c1", "p00001_c0", "p00001_c1"]
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["prompt"] == "a blue square moving up"
    for k in ("VQ", "MQ", "TA", "Overall", "temporal_consistency"):
        assert all(isinstance(r[k], float) for r in rows), k
    # Scores are those of the written mp4s.
    rm = reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136,
                             video_fps=8.0)
    clip = torch.from_numpy(read_video(out / rows[3]["video"]))[None]
    assert rows[3]["Overall"] == pytest.approx(float(rm(clip, [rows[3]["prompt"]])["Overall"][0]), rel=1e-4)
    tc = reward_models.build("temporal_consistency")(clip, [rows[3]["prompt"]])
    assert rows[3]["temporal_consistency"] == pytest.approx(float(tc["temporal_consistency"][0]), rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    for k in ("VQ", "Overall", "temporal_consistency"):
        vals = np.array([r[k] for r in rows])
        assert summary["metrics"][k]["mean"] == pytest.approx(vals.mean())
        assert summary["metrics"][k]["ci95"] == pytest.approx(1.96 * vals.std(ddof=1) / 2, rel=1e-3)
    table = (out / "summary.md").read_text()
    assert "| metric | mean | 95% CI | n |" in table
    assert f"| VQ | {summary['metrics']['VQ']['mean']:.3f} | ± {summary['metrics']['VQ']['ci95']:.3f} | 4 |" in table

    # A second run skips everything.
    capsys.readouterr()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert ev.main(_gen_args(released, wan_models, out)) == 0
    assert "4 clips already scored, 0 to do" in capsys.readouterr().err
    assert ev.read_jsonl(out / "results.jsonl") == rows
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == mtimes

    # Forget two scores, corrupt one of their videos: it is reported and regenerated identically; the other is
    # scored from its file.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (out / "videos" / "p00001_c0.mp4").write_bytes(b"this is not an mp4" * 30)
    assert ev.main(_gen_args(released, wan_models, out)) == 0
    err = capsys.readouterr().err
    assert "p00001_c0.mp4 cannot be decoded" in err and err.rstrip().endswith("; regenerating")
    again = {r["id"]: r for r in ev.read_jsonl(out / "results.jsonl")}
    assert len(again) == 4
    for r in rows[2:]:
        for k in ("VQ", "MQ", "TA", "Overall", "temporal_consistency"):
            assert again[r["id"]][k] == pytest.approx(r[k], rel=1e-4, abs=1e-6)
    assert (out / "videos" / "p00001_c1.mp4").stat().st_mtime_ns == mtimes["p00001_c1.mp4"]

    # Other settings in the same folder are refused.
    assert ev.main(_gen_args(released, wan_models, out, extra=("--seed", "5"))) == 2
    assert "seed: 0 there, 5 now" in capsys.readouterr().err


def test_scoring_existing_videos_skips_missing_and_corrupt_ones(released, wan_models, tmp_path, capsys):
    out = tmp_path / "made_elsewhere"
    videos = out / "videos"
    rng = np.random.default_rng(0)
    write_mp4(videos / "p00000_c0.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=8)
    write_mp4(videos / "p00001_c1.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=8)
    (videos / "p00001_c0.mp4").write_bytes(b"")
    assert ev.main(_gen_args(released, wan_models, out, model=None)) == 0
    err = capsys.readouterr().err
    assert "p00001_c0.mp4 is empty (0 bytes); skipped" in err and "p00000_c1.mp4 does not exist; skipped" in err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["id"] for s in summary["skipped"]) == ["p00000_c1", "p00001_c0"]
    assert summary["n_clips"] == 2 and summary["metrics"]["VQ"]["n"] == 2


def test_baseline_adds_paired_differences_and_win_rates(released, wan_models, tmp_path):
    base, ours = tmp_path / "base", tmp_path / "ours"
    assert ev.main(_gen_args(released, wan_models, base, extra=("--no-temporal",))) == 0
    assert ev.main(_gen_args(released, wan_models, ours, model="other",
                             extra=("--no-temporal", "--baseline", str(base)))) == 0
    a = {(r["prompt"], r["seed"]): r for r in ev.read_jsonl(ours / "results.jsonl")}
    b = {(r["prompt"], r["seed"]): r for r in ev.read_jsonl(base / "results.jsonl")}
    summary = json.loads((ours / "summary.json").read_text())
    assert summary["baseline"]["n_pairs"] == 4 and "temporal_consistency" not in summary["metrics"]
    for k in ("VQ", "MQ", "TA", "Overall"):
        d = np.array([a[key][k] - b[key][k] for key in a])
        got = summary["baseline"]["metrics"][k]
        assert got["mean_diff"] == pytest.approx(d.mean())
        assert got["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / 2, rel=1e-3)
        assert got["win_rate"] == pytest.approx((d > 0).mean()) and got["loss_rate"] == pytest.approx((d < 0).mean())
    assert "Δ vs baseline" in (ours / "summary.md").read_text()


def test_csv_prompt_sets_and_errors(tmp_path, capsys):
    (tmp_path / "en.csv").write_text("id,prompt,prompt_en\n1,un chat,a cat\n2,un chien,a dog\n3,un chat,a cat\n")
    assert ev.read_prompt_set(str(tmp_path / "en.csv")) == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("prompt,x\nfirst,1\n,2\nsecond,3\n")
    assert ev.read_prompt_set(str(tmp_path / "p.csv")) == ["first", "second"]
    (tmp_path / "bad.csv").write_text("caption\nsomething\n")
    with pytest.raises(ev.UserError, match="needs a 'prompt_en' or 'prompt' column"):
        ev.read_prompt_set(str(tmp_path / "bad.csv"))
    with pytest.raises(ev.UserError, match="not found"):
        ev.read_prompt_set(str(tmp_path / "none.txt"))
    assert list(itertools.islice(ev.clip_plan(["x", "y"], 3, 10), 4))[-1] == {
        "id": "p00001_c0", "prompt_index": 1, "clip": 0, "prompt": "y", "seed": 13}
