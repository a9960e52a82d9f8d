"""Run untrusted Python programs (model-written code plus its tests), one separate process each.

Containment of one program, in the order the child sets it up (see ``_BOOT``):

- a fresh temporary working directory, removed afterwards; ``HOME`` and ``TMPDIR`` point into it;
- when the evaluator runs as root: a new network namespace (only a loopback that is down, so no connection
  leaves the process, not even to the host's 127.0.0.1) and a new mount namespace with fresh, small tmpfs over
  ``/tmp``, ``/var/tmp`` and ``/dev/shm``; then the process drops to an unprivileged user id of its own (one per
  worker slot), so it can signal no other process, write no root-owned file, and ``RLIMIT_NPROC`` counts only
  its own processes;
- not root: a user + network namespace if the kernel allows it, else the ``socket`` module refuses to create
  sockets;
- rlimits: ``RLIMIT_AS`` (address space, bytes), ``RLIMIT_CPU`` (seconds of CPU), ``RLIMIT_NPROC`` (processes),
  ``RLIMIT_FSIZE`` (largest file written, bytes), ``RLIMIT_CORE`` 0;
- a wall-clock timeout in the evaluator; afterwards every process left by the program is killed (as root: every
  process of its user id, with ``kill(-1, SIGKILL)`` sent from that user id; otherwise its process group).

Status of a run: ``passed`` (exit 0), ``failed`` (an ``AssertionError``: the tests ran and one did not hold),
``timed out`` (wall clock or CPU limit), ``error`` (any other exception or signal; ``error`` holds the last line
of stderr, e.g. ``MemoryError`` or ``NameError: name 'x' is not defined``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from qtune.errors import QtuneError

# The child: set up namespaces, user id and rlimits, then run program.py as __main__ (argv[1] is a JSON config).
_BOOT = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
sys.argv = ["program.py"]
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
isolated = False
if cfg["uid"] is not None:
    if cfg["network"] == "namespace" and libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
        isolated = True
        libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
            if os.path.isdir(d):
                libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m,mode=1777")
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
elif cfg["network"] == "namespace":
    isolated = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
def limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        resource.setrlimit(which, (min(value, resource.getrlimit(which)[1]),) * 2)
limit(resource.RLIMIT_CORE, 0)
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))  # SIGXCPU, then SIGKILL a second later
limit(resource.RLIMIT_FSIZE, cfg["fsize"])
limit(resource.RLIMIT_NPROC, cfg["nproc"])
limit(resource.RLIMIT_AS, cfg["memory"])
if not isolated:
    import socket, _socket
    class _Refused(_socket.socket):
        def __init__(self, *a, **k):
            raise PermissionError("network access is disabled in the qtune sandbox")
    socket.socket = socket.SocketType = _socket.socket = _Refused
    socket.socketpair = socket.create_connection = socket.create_server = _Refused
    del socket, _socket
with open("program.py", encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxLimits:
    """Limits for one program.

    Attributes:
        timeout_s: wall-clock seconds before the program (and everything it started) is killed.
        cpu_s: CPU seconds (``RLIMIT_CPU``); default: the timeout rounded up.
        memory_mb: address space in MiB (``RLIMIT_AS``) of each process.
        nproc: processes (and threads) the program may have at once (``RLIMIT_NPROC``), itself included.
        fsize_mb: largest file it may write, MiB (``RLIMIT_FSIZE``).
        network: "namespace" (a fresh network namespace where the kernel allows it, else sockets refused) or
            "refuse" (always refuse socket creation, no namespace).
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    nproc: int = 16
    fsize_mb: int = 16
    network: str = "namespace"

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.nproc <= 0 or self.fsize_mb <= 0:
            raise QtuneError(f"sandbox limits must be positive, got {self}")
        if self.network not in ("namespace", "refuse"):
            raise QtuneError(f"sandbox network must be 'namespace' or 'refuse', got {self.network!r}")


@dataclass
class RunResult:
    """Outcome of one program: ``status`` is passed / failed / timed out / error; ``error`` the last stderr line
    (empty when passed); ``seconds`` the wall time; ``returncode`` the exit status (negative: killed by that
    signal; None when it timed out)."""

    status: str
    error: str
    seconds: float
    returncode: int | None

    def as_dict(self) -> dict:
        return asdict(self)


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
    code = f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\ntry: os.kill(-1, 9)\nexcept ProcessLookupError: pass"
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
    candidates = [os.environ.get("QTUNE_SANDBOX_PYTHON") or sys.executable, "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    for exe in candidates:
        if not os.path.isfile(exe):
            continue
        if not unprivileged:
            _PYTHON[unprivileged] = exe
            return exe
        try:
            lib = subprocess.run([exe, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if _world_readable(exe) and _world_readable(lib) and _world_readable(os.path.join(lib, "os.py")):
            _PYTHON[unprivileged] = exe
            return exe
    raise QtuneError("no Python interpreter an unprivileged user can read (tried " + ", ".join(candidates)
                     + "); set QTUNE_SANDBOX_PYTHON to one")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _classify(returncode: int | None, stderr: str, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "timed out", "wall-clock timeout"
    if returncode == 0:
        return "passed", ""
    last = _last_line(stderr)
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and "CPU" in last):
            return "timed out", "CPU time limit"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "error", last or f"killed by signal {name}"
    if last.startswith("AssertionError"):
        return "failed", last
    return "error", last or f"exit status {returncode}"


def run_program(source: str, limits: SandboxLimits | None = None, slot: int = 0) -> RunResult:
    """Run ``source`` as ``program.py`` in a fresh sandboxed process and report how it ended.

    Args:
        source: a complete Python program; it passes by exiting with status 0.
        limits: see :class:`SandboxLimits`.
        slot: worker slot (0..63); as root, it selects the unprivileged user id, so concurrent runs need
            distinct slots.
    """
    lim = limits or SandboxLimits()
    root = os.geteuid() == 0
    uid = _uid_for(slot) if root else None
    work = tempfile.mkdtemp(prefix="qtune-sandbox-")
    logs = tempfile.mkdtemp(prefix="qtune-sandbox-logs-")
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if root:
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, "program.py"), uid, uid)
        cfg = {
            "uid": uid, "network": lim.network, "cpu_s": int(lim.cpu_s or -(-lim.timeout_s // 1)),
            "memory": lim.memory_mb << 20, "nproc": lim.nproc, "fsize": lim.fsize_mb << 20,
        }
        if not root:  # RLIMIT_NPROC counts every process of this user; allow ``nproc`` more than it has now
            cfg["nproc"] += len(_pids_of_uid(os.getuid()))
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        with open(os.path.join(logs, "out"), "wb") as out, open(os.path.join(logs, "err"), "wb") as err:
            proc = subprocess.Popen(
                [sandbox_python(root), "-I", "-S", "-c", _BOOT, json.dumps(cfg)], cwd=work, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                if root:
                    _kill_uid(uid)
        seconds = time.monotonic() - start
        with open(os.path.join(logs, "err"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 8192))
            stderr = f.read().decode("utf-8", "replace")
        status, error = _classify(None if timed_out else proc.returncode, stderr, timed_out)
        return RunResult(status, error, round(seconds, 3), None if timed_out else proc.returncode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2,
                 on_result=None) -> list[RunResult]:
    """Run each program with :func:`run_program`, ``workers`` at a time; results in the order of ``sources``.

    ``on_result(index, result)`` is called as each one finishes (from worker threads, one at a time).
    """
    if not 1 <= workers <= 64:
        raise QtuneError(f"--workers {workers}: expected 1 to 64")
    slots = list(range(workers))
    lock = threading.Lock()
    results: list[RunResult | None] = [None] * len(sources)

    def one(i: int) -> None:
        with lock:
            slot = slots.pop()
        try:
            results[i] = run_program(sources[i], limits, slot)
        finally:
            with lock:
                slots.append(slot)
                if on_result is not None:
                    on_result(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(one, i) for i in range(len(sources))]:
            f.result()
    return results  # type: ignore[return-value]
