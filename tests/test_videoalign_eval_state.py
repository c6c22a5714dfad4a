"""eval_videoalign's state across runs: torn results files, mistyped options, unscorable videos, and the clip ids."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reward_models
from video_branch.video import read_video, write_mp4

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_eval_videoalign as base  # noqa: E402

ev, released, wan_models = base.ev, base.released, base.wan_models  # the tool and the fixtures it is tested with
pytestmark = pytest.mark.filterwarnings("ignore")


def _videos_made_elsewhere(out, ids, frames=5, seed=0):
    rng = np.random.default_rng(seed)
    for i in ids:
        write_mp4(out / "videos" / f"{i}.mp4", rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8), fps=8)


def _lines_are_json(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -------------------------------------------------------------------------------------------- torn results
def test_a_torn_last_results_line_is_dropped_and_the_clip_scored_again(released, wan_models, tmp_path, capsys):
    out = tmp_path / "eval"
    _videos_made_elsewhere(out, ["p00000_c0", "p00001_c0"])
    args = base._gen_args(released, wan_models, out, model=None, extra=("--clips-per-prompt", "1", "--no-temporal"))
    assert ev.main(args) == 0
    first = _lines_are_json(out / "results.jsonl")
    assert [r["id"] for r in first] == ["p00000_c0", "p00001_c0"]
    # A kill in the middle of writing the second row.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:25])
    capsys.readouterr()
    assert ev.main(args) == 0
    err = capsys.readouterr().err
    assert "dropped a torn last line" in err and "1 clips already scored, 1 to do" in err
    again = _lines_are_json(out / "results.jsonl")
    assert [r["id"] for r in again] == ["p00000_c0", "p00001_c0"]
    assert again[1]["VQ"] == pytest.approx(first[1]["VQ"], rel=1e-5, abs=1e-6)


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert ev.read_jsonl(path) == [{"id": "a"}, {"id": "b"}]
    ev.append_jsonl(path, [{"id": "c"}])
    assert _lines_are_json(path) == [{"id": "a"}, {"id": "b"}, {"id": "c"}]


def test_a_broken_line_inside_a_results_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(ev.UserError, match=r"results.jsonl line 2: not valid JSON"):
        ev.read_jsonl(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(ev.UserError, match="line 2: expected a JSON object"):
        ev.read_jsonl(path)


# ----------------------------------------------------------------------------------------------- settings
def test_a_mistyped_videoalign_path_leaves_no_settings_behind(released, wan_models, tmp_path, capsys):
    out = tmp_path / "eval"
    extra = ("--num-prompts", "1", "--clips-per-prompt", "1", "--no-temporal")
    args = base._gen_args(released, wan_models, out, extra=extra)
    typo = [a if a != released["lora"] else released["lora"] + "x" for a in args]
    assert ev.main(typo) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "--videoalign" in errors[0] and released["lora"] + "x" in errors[0]
    assert not (out / "settings.json").exists()
    assert ev.main(args) == 0
    assert json.loads((out / "settings.json").read_text())["videoalign"] == str(Path(released["lora"]).resolve())
    assert len(ev.read_jsonl(out / "results.jsonl")) == 1


# ------------------------------------------------------------------------------------ unscorable videos
def test_a_clip_the_reward_cannot_score_is_reported_not_scored(released, wan_models, tmp_path, capsys):
    out = tmp_path / "eval"
    _videos_made_elsewhere(out, ["p00000_c0"])
    _videos_made_elsewhere(out, ["p00001_c0"], frames=1)  # VideoAlign needs 2 frames at least
    args = base._gen_args(released, wan_models, out, model=None, extra=("--clips-per-prompt", "1"))
    assert ev.main(args) == 0
    err = capsys.readouterr().err
    assert "p00001_c0.mp4: not scored: ValueError: videoalign: a clip of 1 frame(s)" in err
    assert [r["id"] for r in ev.read_jsonl(out / "results.jsonl")] == ["p00000_c0"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["id"] for s in summary["skipped"]] == ["p00001_c0"] and summary["metrics"]["VQ"]["n"] == 1


def _bench(folder, rows):
    return base._write_bench(folder, rows, prompts={i: "a red circle" for i in range(len(rows))})


def test_rewardbench_reruns_from_the_cache_with_unscorable_videos(released, tmp_path, capsys):
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        write_mp4(tmp_path / f"{name}.mp4", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), fps=8)
    write_mp4(tmp_path / "still.mp4", rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), fps=8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 400)
    csv_path = _bench(tmp_path, [("a.mp4", "b.mp4", "A", "B", "same", "A"),
                                 ("a.mp4", "broken.mp4", "A", "A", "A", "A"),
                                 ("still.mp4", "b.mp4", "B", "B", "B", "B")])
    out = tmp_path / "out"
    args = ["rewardbench", "--csv", str(csv_path), "--out", str(out), "--quiet"]
    score = ["--videoalign", released["lora"], "--videoalign-base", released["base"],
             "--videoalign-option", "min_pixels=3136"]
    assert ev.main(args + score) == 0
    first = json.loads((out / "rewardbench.json").read_text())
    assert first["skipped_pairs"] == 2 and sorted(first["failed_videos"]) == ["broken.mp4", "still.mp4"]
    assert "at least 2" in first["failed_videos"]["still.mp4"]
    cache = (out / "scores.jsonl").read_text()
    capsys.readouterr()
    # From the cache alone: the same report, the unscorable videos reported again, nothing rescored.
    assert ev.main(args) == 0
    assert "2 recorded as unscorable" in capsys.readouterr().err
    assert json.loads((out / "rewardbench.json").read_text()) == first
    # With the model again, the failures are retried but not recorded twice.
    assert ev.main(args + score) == 0
    assert (out / "scores.jsonl").read_text() == cache


def test_rewardbench_samples_by_the_container_frame_rate_not_the_csv(released, tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):  # 40 frames at 4 fps: 20 frames sampled at 2 fps (the CSV's 8 fps would give 10)
        write_mp4(tmp_path / f"{name}.mp4", rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), fps=4)
    csv_path = _bench(tmp_path, [("a.mp4", "b.mp4", "A", "B", "same", "A")])
    out = tmp_path / "out"
    assert ev.main(["rewardbench", "--csv", str(csv_path), "--out", str(out), "--quiet", "--videoalign",
                    released["lora"], "--videoalign-base", released["base"], "--videoalign-option",
                    "min_pixels=3136"]) == 0
    cached = {r["path"]: r for r in ev.read_jsonl(out / "scores.jsonl")}
    rm = reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136)
    clip = torch.from_numpy(read_video(tmp_path / "a.mp4"))[None]
    at4, at8 = rm(clip, ["a red circle"], video_fps=4.0), rm(clip, ["a red circle"], video_fps=8.0)
    assert cached["a.mp4"]["fps"] == pytest.approx(4.0)
    assert cached["a.mp4"]["VQ"] == pytest.approx(float(at4["VQ"][0]), rel=1e-5, abs=1e-6)
    assert cached["a.mp4"]["VQ"] != pytest.approx(float(at8["VQ"][0]), rel=1e-5, abs=1e-6)


def test_labels_other_than_a_b_same_are_refused_naming_the_line(tmp_path, capsys):
    # The released evaluation maps them to NaN, which then counts as a wrong prediction; here they stop the run.
    bad = base._write_bench(tmp_path, [("v1", "v2", "A", "B", "", "A")])
    assert ev.main(["rewardbench", "--csv", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: column TA must be A, B or same, got ''" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ clip ids
def test_the_documented_clip_ids_are_the_real_ones():
    doc = ev.__doc__
    line = next(ln for ln in doc.splitlines() if "OUT/videos/<id>.mp4" in ln)
    examples = re.findall(r"p\d+_c\d+", line)
    plan = ev.clip_plan(["x", "y"], 2, 0)
    assert examples and all(e in [c["id"] for c in plan] for e in examples)
    assert plan[2]["id"] == "p00001_c0" and "p<prompt index, 5 digits>_c<clip index>" in line
