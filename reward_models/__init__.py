"""Reward models for video_branch: one file per reward family behind one protocol and a registry."""

from .registry import available, build, register

__all__ = ["available", "build", "register"]
