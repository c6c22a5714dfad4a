"""A fresh run never appends to, or mixes its files with, an earlier run in the same directory."""

from __future__ import annotations

from types import SimpleNamespace

from video_branch.engine import checkpoint as ckpt
from video_branch.engine.checkpoint import resume_point
from video_branch.engine.logging import archive_previous_run


def _old_run(d):
    (d / "final").mkdir(parents=True)
    (d / "final" / "model_index.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    (d / "eval_after.json").write_text("{}")


def test_archive_moves_every_file_of_an_earlier_run_to_a_sibling(tmp_path):
    run = tmp_path / "demo"
    _old_run(run)
    dest = archive_previous_run(run)
    assert dest is not None and dest.parent == tmp_path and dest.name.startswith("demo.prev-")
    assert run.is_dir() and not any(run.iterdir())  # the run directory is empty and ready
    assert (dest / "metrics.jsonl").read_text() == '{"iteration": 0}\n{"iteration": 1}\n'
    assert (dest / "final" / "model_index.json").is_file() and (dest / "eval_after.json").is_file()
    # A second earlier run in the same second gets its own directory; nothing is overwritten.
    _old_run(run)
    dest2 = archive_previous_run(run)
    assert dest2 != dest and (dest2 / "metrics.jsonl").is_file() and (dest / "metrics.jsonl").is_file()


def test_archive_leaves_missing_or_empty_directories_alone(tmp_path):
    assert archive_previous_run(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert archive_previous_run(tmp_path / "empty") is None
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_only_runs_that_continue_from_a_checkpoint_keep_the_directory(tmp_path):
    def resumes(resume):
        return resume_point(SimpleNamespace(train=SimpleNamespace(resume=resume)), tmp_path) is not None

    assert not resumes("never") and not resumes("auto")  # no checkpoint yet: auto starts fresh
    (tmp_path / "checkpoints" / ckpt.tag_for(3)).mkdir(parents=True)
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text(ckpt.tag_for(3) + "\n")
    assert resumes("auto") and not resumes("never")
    assert resumes(str(tmp_path / "checkpoints" / ckpt.tag_for(3)))
    assert resume_point(SimpleNamespace(train=SimpleNamespace(resume="auto")), tmp_path) == (
        tmp_path / "checkpoints", ckpt.tag_for(3))
