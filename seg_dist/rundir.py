"""A run directory belongs to one live run: rank 0 holds a lock on `run.dir/.lock` while it trains.

The lock is an `flock` on an open file, so the kernel drops it when the holding process ends in any way
(`kill -9`, an OOM kill, a SLURM requeue, a torchrun restart): a stale lock never blocks the next run,
and no timeout has to guess whether the holder is still alive. The file's text names the holder for
the refusal message; it is left in place, as removing it would race with the next run taking it. The one
exception is a run that fails before it writes anything into a folder it created (`abandon`): the folder
goes too, so a mistyped data.root leaves no empty run directory behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from .errors import UserError

LOCK = ".lock"


class RunDirLock:
    """Held from `claim` until `release` or the end of the process."""

    def __init__(self, run_dir: Path, handle: IO[str], created: bool = False) -> None:
        self.run_dir, self._handle, self.created = run_dir, handle, created

    @classmethod
    def claim(cls, run_dir: str | Path) -> RunDirLock:
        """Create `run_dir` if needed and lock it; a UserError naming run.dir if it cannot be used or another
        live run holds it."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run.dir={run_dir} is a file, not a folder: choose another run.dir")
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / LOCK, "a+")  # noqa: SIM115 (held for the run's length)
        except OSError as e:
            why = e.strerror or str(e)
            raise UserError(f"run.dir={run_dir} cannot be written ({why}): choose another run.dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run.dir={run_dir} is in use by a live run ({holder}): wait for it to end, or choose "
                            "another run.dir") from None
        handle.seek(0)
        handle.truncate()
        job = os.environ.get("SLURM_JOB_ID")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        return cls(run_dir, handle, created)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()

    def abandon(self) -> None:
        """Release; and if this claim created run.dir and it still holds nothing but the lock, remove it."""
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):  # a run that raced in keeps what it made
                (self.run_dir / LOCK).unlink()
                self.run_dir.rmdir()
        self.release()

    def __del__(self) -> None:
        if not self._handle.closed:
            self.release()
