"""The host side of the sandbox: the unprivileged user ids it runs programs as (when the evaluator is root), the
processes of such a user id and how they are all killed, and the interpreter that runs programs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from qtune.errors import QtuneError

SANDBOX_UID_BASE = 200_000
"""First user id the sandbox uses when it runs as root; each evaluator takes 64 ids from its process id."""


def _uid_for(slot: int) -> int:
    return SANDBOX_UID_BASE + (os.getpid() % 100_000) * 64 + slot


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                            break  # a zombie holds nothing but its exit status
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                pids.append(int(entry))
                            break
            except (OSError, ValueError):
                continue
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1)`` sent by a helper running as that uid (the kernel takes the
    process list lock, so nothing forks past it); repeated until /proc shows none."""
    code = (
        f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
        "try: os.kill(-1, 9)\nexcept ProcessLookupError: pass"
    )
    for _ in range(50):
        if not _pids_of_uid(uid):
            return
        subprocess.run([sandbox_python(True), "-I", "-S", "-c", code], check=False, timeout=30)
        time.sleep(0.02)


def _world_readable(path: str) -> bool:
    """Every directory from / down to ``path`` is searchable by others, and ``path`` readable by others."""
    import stat

    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


_PYTHON: dict[bool, str] = {}


def sandbox_python(unprivileged: bool) -> str:
    """The interpreter that runs programs: ``$QTUNE_SANDBOX_PYTHON``, else this one, else ``python3`` on the
    system path. When programs run as an unprivileged user it must be able to read the interpreter and its
    standard library (a pyenv Python under a private /root is not).

    Raises:
        QtuneError: no such interpreter.
    """
    if unprivileged in _PYTHON:
        return _PYTHON[unprivileged]
    candidates = [
        os.environ.get("QTUNE_SANDBOX_PYTHON") or sys.executable,
        "/usr/bin/python3",
        "/usr/local/bin/python3",
    ]
    for exe in candidates:
        if not os.path.isfile(exe):
            continue
        if not unprivileged:
            _PYTHON[unprivileged] = exe
            return exe
        try:
            lib = subprocess.run(
                [exe, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if _world_readable(exe) and _world_readable(lib) and _world_readable(os.path.join(lib, "os.py")):
            _PYTHON[unprivileged] = exe
            return exe
    raise QtuneError(
        "no Python interpreter an unprivileged user can read (tried "
        + ", ".join(candidates)
        + "); set QTUNE_SANDBOX_PYTHON to one"
    )
