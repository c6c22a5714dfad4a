"""Run several training jobs one after the other inside one distributed launch (2 ranks share the process group).

Usage: deepspeed --num_gpus 2 tests/dist_workers/train_presets.py OUT_DIR JOB [JOB ...] -- [--set k=v ...]
A JOB is ``CONFIG`` (run name: the file's stem) or ``NAME=CONFIG``, optionally followed by job-only overrides
separated by ``@``: ``NAME=CONFIG@method=pro_grpo@tree.roots=4``. The ``--set`` overrides after ``--`` apply to every
job first. Each job trains into OUT_DIR/<name>; a JSON summary per run is written by rank 0.
"""

import json
import sys
from pathlib import Path

from video_branch.config import load_config
from video_branch.engine.trainer import Trainer


def main(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    argv = [a for a in argv if not a.startswith("--local_rank")]
    out, jobs = Path(argv[0]), argv[1:]
    overrides = [extra[i + 1] for i in range(0, len(extra), 2) if extra[i] == "--set"]
    for job in jobs:
        spec, *own = job.split("@")
        name = Path(spec).stem if "=" not in spec else spec.split("=", 1)[0]
        path = spec.split("=", 1)[-1]
        cfg = load_config(path, [*overrides, *own, f"train.run_dir={out / name}"])
        trainer = Trainer(cfg)
        results = trainer.fit()
        if trainer.dist.is_main:
            (out / name / "summary.json").write_text(json.dumps(results))
        trainer.dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
