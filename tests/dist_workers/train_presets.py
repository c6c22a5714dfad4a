"""Run several configs one after the other inside one distributed launch (2 ranks share the process group).

Usage: deepspeed --num_gpus 2 tests/dist_workers/train_presets.py OUT_DIR CONFIG [CONFIG ...] -- [--set k=v ...]
Each config trains for two iterations into OUT_DIR/<config stem>; a JSON summary per run is written by rank 0.
"""

import json
import sys
from pathlib import Path

from video_branch.config import load_config
from video_branch.trainer import Trainer


def main(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    argv = [a for a in argv if not a.startswith("--local_rank")]
    out, configs = Path(argv[0]), argv[1:]
    overrides = [extra[i + 1] for i in range(0, len(extra), 2) if extra[i] == "--set"]
    for path in configs:
        name = Path(path).stem if "=" not in path else path.split("=", 1)[0]
        path = path.split("=", 1)[-1]
        cfg = load_config(path, [*overrides, f"train.run_dir={out / name}"])
        trainer = Trainer(cfg)
        results = trainer.fit()
        if trainer.dist.is_main:
            (out / name / "summary.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
