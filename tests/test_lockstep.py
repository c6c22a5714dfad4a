"""The lockstep check: ranks that ran different call counts stop with a clear error on every rank."""

import os

import pytest
import torch.multiprocessing as mp
from conftest import free_port

# The two cases: the same counts on both ranks, then a backward count that differs on rank 1.
CASES = {False: [{"forward passes": 203, "backward calls": 4, "trained edges": 218}] * 2,
         True: [{"forward passes": 203, "backward calls": 4, "trained edges": 218},
                {"forward passes": 203, "backward calls": 5, "trained edges": 218}]}


def _worker(rank, port, cases, results):
    import torch.distributed as dist

    from video_branch.parallel.lockstep import LockstepError, check_lockstep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for differ, counts in cases:  # one process group, the checks one after the other on both ranks
            try:
                check_lockstep(7, counts[rank])
                results[(differ, rank)] = "ok"
            except LockstepError as e:
                results[(differ, rank)] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes():
    """Every case's result per rank, from one pair of spawned ranks (the agreeing case first)."""
    with mp.Manager() as m:
        results = m.dict()
        mp.spawn(_worker, args=(free_port(), sorted(CASES.items()), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("differ", [False, True])
def test_lockstep_check(outcomes, differ):
    out = {r: outcomes[(differ, r)] for r in (0, 1)}
    if differ:
        for r in (0, 1):  # every rank stops, not just one (the other would hang)
            assert "iteration 7" in out[r] and "backward calls: 4..5" in out[r] and "forward passes" not in out[r]
    else:
        assert out == {0: "ok", 1: "ok"}
