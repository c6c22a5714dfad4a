"""Entry point: ``deepspeed --num_gpus N --module video_branch.train --config CONFIG [--set key=value ...]``.

Also runs under ``torchrun`` and as a plain single process (``python -m video_branch.train ...``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError, add_config_args, config_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="video_branch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, require_config=False)
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable), e.g. a module whose @reward_models.register adds "
                             "your reward; it must be importable (on PYTHONPATH) on every node")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            print(f"video_branch.train: error: --import {module}: {_one_line(e)}", file=sys.stderr)
            return 2
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"video_branch.train: config error: {_one_line(e)}", file=sys.stderr)
        return 2

    from .data import PromptFileError
    from .engine.trainer import NoValidRewards, Trainer

    try:
        trainer = Trainer(cfg)
        results = trainer.fit()
    except (PromptFileError, FileNotFoundError, ConfigError, NoValidRewards) as e:
        print(f"video_branch.train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        _print_summary(results)
    return 0


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _print_summary(results) -> None:
    before, after, change = results["before"], results["after"], results.get("change", {})
    keys = [k for k in before if not k.endswith("_ci95") and k not in ("n", "valid", "per_clip")]
    nan = float("nan")
    n = before.get("n")
    print(f"\nheld-out reward ({n} clips, same prompts and seeds before and after), mean ± 95% CI:")
    for k in keys:
        b, a = before[k], after.get(k, nan)
        nb, na = before.get("valid", {}).get(k, n), after.get("valid", {}).get(k, n)
        scored = "" if nb == na == n else f"   (scored clips: {nb} before, {na} after)"
        print(f"  {k:>22}: before {b:.4f} ± {before.get(k + '_ci95', nan):.4f}   "
              f"after {a:.4f} ± {after.get(k + '_ci95', nan):.4f}   "
              f"paired change {change.get(k, a - b):+.4f} ± {change.get(k + '_ci95', nan):.4f}{scored}")


if __name__ == "__main__":
    sys.exit(main())
