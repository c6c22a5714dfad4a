"""Bad input stops the run before any weights are read and before the run directory changes, as one line naming
the config key or the file (items: late validation, over-long prompts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from video_branch import train

ROOT = Path(__file__).resolve().parents[1]


class ReachedLoading(Exception):
    """Raised where a run would start its process group and load the models: a check came too late."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_setup):
    d = tmp_path_factory.mktemp("inputs")
    cfg = tiny_setup(d, "branchgrpo", ["a red square moving down"])
    return d, cfg


@pytest.fixture
def no_loading(monkeypatch):
    def stop(*a, **k):
        raise ReachedLoading("the run got past its checks to model loading")

    monkeypatch.setattr("video_branch.engine.trainer.init_distributed", stop)
    monkeypatch.setattr("video_branch.engine.trainer.build_models", stop)
    monkeypatch.setattr("video_branch.engine.setup.load_wan", stop)


def _corrupt_model(d: Path, out: Path) -> Path:
    shutil.copytree(d / "model", out)
    f = next((out / "transformer").glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a truncated download
    return out


def _long_prompts(d: Path, out: Path) -> Path:
    out.write_text("a red circle moving left\n# a comment\nein roter Kreis bewegt sich nach links\n")
    return out


CASES = {
    "unknown reward": (["reward.components={tmporal_consistency: {weight: 1.0}}"],
                       ["reward.components.tmporal_consistency", "Did you mean 'temporal_consistency'"]),
    "bad reward option": (["reward.components={temporal_consistency: {weight: 1.0, presett: fast}}"],
                          ["reward.components.temporal_consistency", "unknown option 'presett'"]),
    "missing weight": (["reward.components={temporal_consistency: {}}"],
                       ["reward.components.temporal_consistency.weight", "missing"]),
    "missing ds_config": (["parallel.ds_config=/nonexistent/zero3.json"],
                          ["parallel.ds_config", "/nonexistent/zero3.json"]),
    "nan lr": (["optim.lr=.nan"], ["optim.lr", "finite"]),
    "inf eta": (["tree.eta=.inf"], ["tree.eta", "finite"]),
    "inf weight decay": (["optim.weight_decay=.inf"], ["optim.weight_decay", "finite"]),
    "lora targets": (["model.lora.rank=4", "model.lora.target_modules=[to_qq]"],
                     ["model.lora.target_modules", "to_qq"]),
    "videoalign path": (["reward.components={videoalign: {weight: 1.0, path: /nonexistent/VideoReward}}"],
                        ["reward.components.videoalign", "/nonexistent/VideoReward"]),
    "videoalign layout": (["reward.components={videoalign: {weight: 1.0, path: <d>}}"],
                          ["reward.components.videoalign", "model_config.json"]),
    "corrupt safetensors": (["model.path=<corrupt>"], ["transformer", "corrupt or truncated"]),
    "long prompt": (["train.prompt_file=<long>"],
                    ["model.max_sequence_length", "long.txt:3", "ein roter Kreis", "tokens"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_before_any_weights_are_read(setup, tmp_path, capsys, no_loading, case):
    d, cfg = setup
    sets, needles = CASES[case]
    fill = {"d": d, "corrupt": None, "long": None}
    if case == "corrupt safetensors":
        fill["corrupt"] = _corrupt_model(d, tmp_path / "model")
    if case == "long prompt":
        fill["long"] = _long_prompts(d, tmp_path / "long.txt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n')  # an earlier run, which must stay where it is
    argv = ["--config", str(cfg), "--set", f"train.run_dir={run}"]
    for s in sets:
        for k, v in fill.items():
            s = s.replace(f"<{k}>", str(v))
        argv += ["--set", s]
    t0 = time.perf_counter()
    rc = train.main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and "error:" in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert not list(tmp_path.glob("run.prev-*"))
    print(f"{case}: stopped after {seconds:.2f} s: {err[0]}")


def test_sp_size_that_does_not_divide_the_heads_stops_before_loading(setup, tmp_path, capsys, no_loading,
                                                                    monkeypatch):
    d, cfg = setup
    monkeypatch.setenv("WORLD_SIZE", "4")  # as the launcher sets it for 4 ranks; the tiny model has 2 heads
    rc = train.main(["--config", str(cfg), "--set", f"train.run_dir={tmp_path / 'run'}", "--set",
                     "parallel.sp_size=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1
    assert "parallel.sp_size" in err[0] and "2 attention heads" in err[0] and "[1, 2]" in err[0], err[0]


def test_a_valid_config_passes_the_checks_and_reaches_loading(setup, tmp_path, no_loading):
    """The checks do not reject good input (the run goes on to start its process group)."""
    d, cfg = setup
    with pytest.raises(ReachedLoading):
        train.main(["--config", str(cfg), "--set", f"train.run_dir={tmp_path / 'run'}"])


@pytest.mark.slow
def test_cli_reports_bad_input_as_one_line_before_loading(setup, tmp_path):
    """As a user sees it: ``python -m video_branch.train`` prints one ``error:`` line and never starts loading."""
    d, cfg = setup
    for sets in (["optim.lr=.nan"], [f"model.path={_corrupt_model(d, tmp_path / 'model')}"]):
        cmd = [sys.executable, "-m", "video_branch.train", "--config", str(cfg),
               "--set", f"train.run_dir={tmp_path / 'run'}", *[a for s in sets for a in ("--set", s)]]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode != 0 and len(lines) == 1 and "error:" in lines[0], r.stderr
        assert "loading the models" not in r.stdout and "Traceback" not in r.stderr
        print(f"{sets[0]}: process exited after {seconds:.2f} s: {lines[0]}")
