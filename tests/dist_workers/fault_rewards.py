"""Rewards that fail on purpose, for the fault tests: a reward model that is down on some ranks.

Importing this module registers ``down_on_ranks``. As a script it is the training entry point with these rewards
registered: ``deepspeed --num_gpus 2 tests/dist_workers/fault_rewards.py --config ... [--set ...]``.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence

import torch

from reward_models.registry import register


@register("down_on_ranks")
class DownOnRanks:
    """Brightness and contrast of the clip and their mean (``overall``); every call raises on the ranks in
    ``down`` (a reward service that is unreachable from those ranks)."""

    def __init__(self, down: Sequence[int] = (1,)):
        self.down = {int(r) for r in down}

    def __call__(self, frames: torch.Tensor, prompts: List[str]) -> Dict[str, torch.Tensor]:
        rank = int(os.environ.get("RANK", "0"))
        if rank in self.down:
            raise ConnectionError(f"reward service unreachable from rank {rank}")
        x = frames.float() / 255.0
        bright = x.mean(dim=(1, 2, 3, 4))
        contrast = x.flatten(1).std(dim=1)
        return {"brightness": bright, "contrast": contrast, "overall": (bright + contrast) / 2}


if __name__ == "__main__":
    from video_branch.train import main

    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
