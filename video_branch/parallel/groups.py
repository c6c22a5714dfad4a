"""Data-parallel x sequence-parallel process groups.

Ranks ``[g * sp, (g + 1) * sp)`` form sequence-parallel group g (contiguous), which is one data-parallel member:
its ranks see the same prompts and the same noise. With sp_size 1 every rank is its own data-parallel member.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    sp_size: int
    device: torch.device
    sp_group: Optional[object] = None
    dp_group: Optional[object] = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use train.device: cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cpu_threads_per_rank() -> int:
    """Cores of this node shared by its ranks: oversubscribed OpenMP threads spin and slow every rank down."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


def init_distributed(sp_size: int = 1, backend: str = "auto", device: str = "auto", cpu_shm_allreduce: bool = False,
                     cpu_threads: int = 0) -> Dist:
    """Initialise torch.distributed (through DeepSpeed) for launcher, torchrun or a plain single process."""
    import deepspeed
    import deepspeed.ops

    if "RANK" not in os.environ:  # a plain `python -m video_branch.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    if dev.type == "cpu" and not cpu_shm_allreduce:
        # DeepSpeed's CPU shared-memory all-reduce is compiled on first use (minutes on a small machine); plain gloo
        # is fast enough for the CPU world sizes this runs at.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=choose_backend(backend, dev), verbose=False)
    if world % sp_size:
        raise ValueError(
            f"config key 'parallel.sp_size': {sp_size} does not divide the world size {world}; "
            f"accepted: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads or cpu_threads_per_rank())
    d = Dist(rank=rank, world_size=world, local_rank=local_rank, sp_size=sp_size, device=dev)
    # Every rank must create every group, in the same order.
    for g in range(world // sp_size):
        ranks = list(range(g * sp_size, (g + 1) * sp_size))
        grp = dist.new_group(ranks) if sp_size > 1 else None
        if rank in ranks:
            d.sp_group = grp
    for r in range(sp_size):
        ranks = list(range(r, world, sp_size))
        grp = dist.new_group(ranks) if world > 1 else None
        if rank in ranks:
            d.dp_group = grp
    return d
