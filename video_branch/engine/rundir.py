"""One run per run directory: an exclusive lock on ``<run_dir>/.lock``, held by the main rank for the whole run.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holding process exits, however it
exits (a SIGKILL included): a stale lock file never blocks a rerun, and a run whose launcher was killed while its
ranks live on keeps its directory until those ranks end. The file holds the holder's pid, host and start time,
for the message a second run prints. On a shared filesystem the lock is only as good as the filesystem's flock
(local disks and NFSv4 honour it).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..parallel.collectives import any_rank
from ..parallel.groups import Dist

LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """Another live run holds the run directory."""


class RunDirLock:
    """An exclusive, non-blocking flock on ``<run_dir>/.lock``; :meth:`acquire` returns the holder's description
    when another process holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_run_dir(run_dir: str | Path, d: Dist) -> RunDirLock:
    """Take the run directory's lock on the main rank (collective: every rank learns whether it was taken).
    Raises RunDirInUse on every rank when another run holds it."""
    lock = RunDirLock(run_dir)
    holder = lock.acquire() if d.is_main else None
    if any_rank(d, holder is not None):
        raise RunDirInUse(f"train.run_dir {Path(run_dir)} is in use by another run ({holder or 'see rank 0'}); "
                          f"wait for it to end or stop it, or use another train.run_dir")
    return lock
