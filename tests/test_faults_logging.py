"""After a resume, TensorBoard shows every iteration once: the replayed iterations supersede the earlier events."""

from __future__ import annotations

from video_branch.engine.logging import RunLogger, read_metrics


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_replaces_replayed_iterations_in_tensorboard(tmp_path):
    first = RunLogger(tmp_path, enabled=True, plot_every=0)
    for it in range(8):  # a run killed after iteration 7, whose last checkpoint holds iterations 0-5
        first.log({"iteration": it, "reward_mean": float(it)})
    first.close()
    second = RunLogger(tmp_path, enabled=True, plot_every=0)
    second.truncate_after(5)
    for it in range(6, 10):
        second.log({"iteration": it, "reward_mean": 100.0 + it})
    second.close()
    expected = [(i, float(i)) for i in range(6)] + [(i, 100.0 + i) for i in range(6, 10)]
    assert [(r["iteration"], r["reward_mean"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == expected
    assert _scalars(tmp_path, "reward_mean") == expected  # float32 events hold these values exactly
