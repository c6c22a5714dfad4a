"""``python -m video_branch.accounting``: the per-prompt cost of a run's trees (see ``docs/TREES.md``).

Leaves, forward passes (counting CFG), edges, SDE edges and trained edges of a config (``--config``) or of a method
preset at its published defaults (``--method``, no CFG).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from .config import ConfigError, add_config_args, load_config
from .config.presets import preset_names
from .config.specs import config_accounting

_COLUMNS = (
    ("method", "method", "{}"), ("leaves", "leaves", "{}"), ("forward_passes", "fwd passes", "{}"),
    ("fwd_per_leaf", "fwd/leaf", "{:.2f}"), ("edges", "edges", "{}"), ("sde_edges", "sde edges", "{}"),
    ("trained_edges", "trained", "{}"), ("trained_per_leaf", "trained/leaf", "{:.3f}"),
    ("trained_samples", "trained samples", "{}"), ("sde_steps", "sde steps", "{}"),
)


def _ranges(steps: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 6, 9]`` -> ``"0-3,6,9"``."""
    runs: List[List[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) or "-"


def format_table(records: Sequence[Dict[str, Any]]) -> str:
    rows = []
    for r in records:
        r = dict(r, fwd_per_leaf=r["forward_passes"] / r["leaves"], trained_per_leaf=r["trained_edges"] / r["leaves"],
                 sde_steps=_ranges(r["sde_steps"]))
        rows.append([fmt.format(r[key]) for key, _, fmt in _COLUMNS])
    heads = [h for _, h, _ in _COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m video_branch.accounting",
        description="Per-prompt cost of a run's trees: leaves, forward passes (counting CFG), edges, SDE edges and "
                    "trained edges.",
    )
    add_config_args(parser)
    parser.add_argument("--method", help="a method preset at its published defaults (or 'all')")
    parser.add_argument("--iteration", type=int, default=0, help="training iteration (step kinds and pruning slide)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.config is None and args.method is None:
        parser.error("give --config CONFIG or --method PRESET")
    if args.iteration < 0:
        parser.error(f"--iteration: expected an integer >= 0, got {args.iteration}")
    methods = preset_names() if args.method == "all" else [args.method]
    try:
        records = [config_accounting(load_config(args.config, args.overrides, method=m), args.iteration)
                   for m in methods]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        payload: Any = {r["method"]: r for r in records} if args.method == "all" else records[0]
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
