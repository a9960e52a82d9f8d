"""One writer per run directory (:class:`RunLock`)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from qtune.errors import QtuneError
from qtune.rundir.run import RunDir


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on its :attr:`RunDir.lock` file.

    Held from :meth:`acquire` until :meth:`release` or the end of the process; the OS drops it when the
    process dies in any way (kill -9 included), so a lock is never stale. The file holds the holder's pid and
    start time, for the message that refuses a second writer.
    """

    def __init__(self, root: str | Path):
        self.path = RunDir(Path(root)).lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (again: no-op), creating the lock file; the run directory must exist.

        Raises:
            QtuneError: another process holds it (the message names its pid and start time), or the file
                system cannot lock the file.
        """
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise QtuneError(f"{self.path}: cannot create the run directory's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise QtuneError(f"{self.path.parent}: in use by {holder}; wait for it to finish or stop it") from None
        except OSError as e:
            os.close(fd)
            raise QtuneError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file); the file itself stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"qtune process {int(info['pid'])} (started {info['started']})"
        except (ValueError, KeyError, TypeError):  # the holder has not written its pid yet
            return "another qtune process"
