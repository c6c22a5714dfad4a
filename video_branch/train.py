"""Entry point: ``deepspeed --num_gpus N --module video_branch.train --config CONFIG [--set key=value ...]``.

Also runs under ``torchrun`` and as a plain single process (``python -m video_branch.train ...``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, add_config_args, config_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="video_branch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, require_config=False)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"video_branch.train: config error: {e}", file=sys.stderr)
        return 2

    from .data import PromptFileError
    from .engine.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        results = trainer.fit()
    except (PromptFileError, FileNotFoundError, ConfigError) as e:
        print(f"video_branch.train: error: {e}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        _print_summary(results)
    return 0


def _print_summary(results) -> None:
    before, after, change = results["before"], results["after"], results.get("change", {})
    keys = [k for k in before if not k.endswith("_ci95") and k not in ("n", "per_clip")]
    nan = float("nan")
    print(f"\nheld-out reward ({before.get('n')} clips, same prompts and seeds before and after), mean ± 95% CI:")
    for k in keys:
        b, a = before[k], after.get(k, nan)
        print(f"  {k:>22}: before {b:.4f} ± {before.get(k + '_ci95', nan):.4f}   "
              f"after {a:.4f} ± {after.get(k + '_ci95', nan):.4f}   "
              f"paired change {change.get(k, a - b):+.4f} ± {change.get(k + '_ci95', nan):.4f}")


if __name__ == "__main__":
    sys.exit(main())
