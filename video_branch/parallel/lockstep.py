"""The lockstep check: every rank must run the same number of forward and backward calls per iteration.

ZeRO-3 gathers parameters in forward hooks, so ranks that run different call sequences deadlock; the counts come from
the config alone, and this check all-reduces them after every iteration so a mistake stops the run instead.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist


class LockstepError(RuntimeError):
    """Ranks disagree on the number of forward/backward calls of an iteration (ZeRO-3 would deadlock)."""


def check_lockstep(iteration: int, counts: Dict[str, int]) -> None:
    """All-reduce per-iteration call counts; raise LockstepError on every rank if any two ranks differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        diff = ", ".join(f"{k}: {int(a)}..{int(b)}" for k, a, b in zip(counts, lo.tolist(), hi.tolist()) if a != b)
        raise LockstepError(f"iteration {iteration}: ranks ran different numbers of calls ({diff}); under ZeRO-3 "
                            "this deadlocks. Tree shapes, pruning counts and micro-batches must come from the config "
                            "alone")
