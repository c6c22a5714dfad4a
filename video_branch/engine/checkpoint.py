"""Atomic, resumable DeepSpeed checkpoints.

Layout under ``<run_dir>/checkpoints/``: ``iter_NNNNNN/`` (DeepSpeed's files, the client state and each rank's RNG
state, and ``copies.pt`` with the full policy copies an objective keeps, such as DiffusionNFT's EMA) and ``latest``
(the tag of the newest complete checkpoint). A checkpoint is written under a ``.partial`` name and renamed only after
every rank has finished, and ``latest`` is replaced atomically after that, so a crash during a save leaves the
previous checkpoint as the one that resumes.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..config import ConfigError

LATEST = "latest"
COPIES = "copies.pt"  # the kept policy copies (see save)


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The newest complete checkpoint's tag, or None."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def save(engine, ckpt_dir: Path, iteration: int, client_state: Dict[str, Any], rank: int, keep: int = 2,
         copies: Optional[Dict[str, torch.nn.Module]] = None) -> Path:
    """Save a checkpoint after ``iteration`` (collective: every rank calls it).

    ``copies``: full copies of the policy that training keeps beside the engine (e.g. DiffusionNFT's EMA), identical
    on every rank; rank 0 writes their weights to ``copies.pt``.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(iteration)
    partial = tag + ".partial"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / partial / f"rng_rank{rank}.pt")
    if rank == 0 and copies:
        torch.save({name: m.state_dict() for name, m in copies.items()}, ckpt_dir / partial / COPIES)
    _barrier()
    if rank == 0:
        final = ckpt_dir / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / partial, final)
        tmp = ckpt_dir / (LATEST + ".tmp")
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_dir / LATEST)
        _prune_old(ckpt_dir, keep)
    _barrier()
    return ckpt_dir / tag


def _prune_old(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("iter_") and "." not in p.name)
    for p in tags[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob("*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, rank: int,
         copies: Optional[Dict[str, torch.nn.Module]] = None) -> Dict[str, Any]:
    """Restore engine, optimizer, RNG and the kept ``copies``; returns the client state saved with the checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} could not be loaded (incomplete or corrupt)")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    if copies:
        saved = ckpt_dir / tag / COPIES
        if not saved.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no {COPIES}: it holds no weights for the kept "
                                    f"copies {sorted(copies)} this objective needs (written by an older version?)")
        states = torch.load(saved, map_location="cpu", weights_only=True)
        missing = sorted(set(copies) - set(states))
        if missing:
            raise KeyError(f"{saved} has copies {sorted(states)}, not {missing}")
        for name, m in copies.items():
            m.load_state_dict(states[name])
    return client_state or {}


class ResumeError(ConfigError):
    """A checkpoint that this run cannot continue from (another run's, or another world size's)."""


# What makes a checkpoint another run's: the method, the model (weights, LoRA, text conditioning) and the trees.
# Execution choices that leave the maths unchanged may differ.
RUN_IDENTITY = ("method", "model.", "tree.", "objective.name")
NOT_IDENTITY = ("model.attention_backend", "model.gradient_checkpointing")


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "components":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every run-identity key (RUN_IDENTITY) whose value differs; keys only one of
    the two configs knows (another version's schema) are not compared."""
    a, b = _flat(saved), _flat(current)
    diffs = []
    for k in sorted(set(a) & set(b)):
        if k.startswith(RUN_IDENTITY) and not k.startswith(NOT_IDENTITY) and a[k] != b[k]:
            diffs.append(f"{k}: {a[k]!r} -> {b[k]!r}")
    return diffs


def saved_world_size(ckpt_path: Path) -> Optional[int]:
    """Ranks that wrote a checkpoint (one RNG state file each), or None if it holds none."""
    n = len(list(Path(ckpt_path).glob("rng_rank*.pt")))
    return n or None


def check_resumable(cfg, point: tuple[Path, str], world_size: int) -> None:
    """Raise ResumeError, changing nothing, unless the checkpoint ``point`` can continue this run: it exists, was
    written by ``world_size`` ranks (ZeRO-3 partitions cannot be re-split), and its run's ``config.yaml`` agrees
    with ``cfg`` on every run-identity key."""
    ckpt_dir, tag = point
    path = Path(ckpt_dir) / tag
    if not path.is_dir():
        raise ResumeError(f"train.resume: checkpoint directory not found: {path}")
    saved_world = saved_world_size(path)
    if saved_world is not None and saved_world != world_size:
        raise ResumeError(f"train.resume: checkpoint {path} was written by {saved_world} ranks and this run has "
                          f"{world_size}; a ZeRO-3 checkpoint resumes only at the world size that wrote it: relaunch "
                          f"with {saved_world} ranks, or start a new run (a new train.run_dir, or train.resume: "
                          "never) from its final/ weights (model.path)")
    saved_cfg = Path(ckpt_dir).parent / "config.yaml"
    if not saved_cfg.is_file():
        return
    try:
        saved = yaml.safe_load(saved_cfg.read_text()) or {}
    except yaml.YAMLError as e:
        raise ResumeError(f"train.resume: {saved_cfg} (the config of the run being resumed) is not valid YAML: "
                          f"{e}") from None
    diffs = identity_differences(saved, cfg.to_dict())
    if diffs:
        raise ResumeError(f"train.resume: {path} belongs to a different run: its config {saved_cfg} differs in "
                          + "; ".join(diffs) + ". Resuming would mix two runs in one directory; nothing was changed. "
                          "Use a new train.run_dir, or set train.resume: never to move the earlier run aside to a "
                          "sibling directory and start fresh")


def resume_point(cfg, run_dir: Path) -> Optional[tuple[Path, str]]:
    """(checkpoint directory, tag) that this run continues from, or None for a fresh start (decided from the config
    and the run directory alone): ``never``; ``auto`` without a complete checkpoint; else the given path."""
    resume = cfg.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(Path(run_dir) / "checkpoints")
        return None if tag is None else (Path(run_dir) / "checkpoints", tag)
    p = Path(resume)
    return p.parent, p.name
