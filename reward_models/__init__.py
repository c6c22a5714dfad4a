"""Reward models for video_branch: one file per reward family behind one protocol and a registry."""

from .compose import ComposedReward, build_from_config, weighted_sum
from .registry import available, build, register

__all__ = ["ComposedReward", "available", "build", "build_from_config", "register", "weighted_sum"]
