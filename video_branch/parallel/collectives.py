"""Small collectives of the run: NaN-aware metric means, an any-rank flag, and sharing a result inside an SP group."""

from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

import torch
import torch.distributed as dist

from .groups import Dist

T = TypeVar("T")


def union_keys(d: Dist, keys) -> List[str]:
    """The sorted union of every rank's ``keys`` (a rank whose reward never scored knows fewer of them)."""
    if d.world_size == 1:
        return sorted(keys)
    gathered: List = [None] * d.world_size
    dist.all_gather_object(gathered, sorted(keys))
    return sorted(set().union(*gathered))


def all_mean(d: Dist, values: Dict[str, float]) -> Dict[str, float]:
    """Average over ranks (NaN-aware: a rank with no valid value does not count). The keys may differ between
    ranks: the result has every rank's keys, and a key a rank lacks counts as NaN there."""
    if d.world_size == 1:
        return values
    keys = union_keys(d, values)
    v = torch.tensor([values.get(k, float("nan")) for k in keys], dtype=torch.float64)
    ok = torch.isfinite(v).double()
    s = torch.stack([torch.nan_to_num(v) * ok, ok])
    dist.all_reduce(s)
    return {k: float(s[0, i] / s[1, i]) if s[1, i] > 0 else float("nan") for i, k in enumerate(keys)}


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sp_shared(d: Dist, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the first rank of the sequence-parallel group and share its result with the group (the ranks of
    a group hold identical samples, so rewards are computed once)."""
    if d.sp_size == 1:
        return fn()
    box = [fn() if d.sp_rank == 0 else None]
    dist.broadcast_object_list(box, src=d.rank - d.sp_rank, group=d.sp_group)
    return box[0]


def all_std(d: Dist, values) -> float:
    """Standard deviation (ddof 0) of the finite ``values`` of every rank together (one all-reduce of count, sum
    and sum of squares, in float64). The ranks of a sequence-parallel group hold the same values; counting them
    once per rank leaves the std unchanged."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    s = torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), (v * v).sum()])
    if d.world_size > 1:
        dist.all_reduce(s)
    n, total, sq = (float(x) for x in s)
    if n == 0:
        return float("nan")
    mean = total / n
    return max(sq / n - mean * mean, 0.0) ** 0.5
