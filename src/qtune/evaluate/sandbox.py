"""Run untrusted Python programs (model-written code plus its tests), one separate process each.

What passes: the evaluator's own boot code (:data:`qtune.evaluate.sandbox_boot.BOOT`) runs the program body,
then the caller's ``check`` expression (HumanEval: ``check(entry_point)``); only when both returned does the boot
report success, over a pipe that is neither stdout nor stderr, as a line that starts with a random nonce made
for that run, and then it ends the process with ``os._exit(0)`` at once (no atexit handler, finalizer or buffered
output runs after it).
The evaluator counts a run as passed only when that line arrives and the process exits with status 0. So exit
statuses and output count for nothing: ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, an atexit handler,
a signal the program sends itself, ``unittest.main()`` or any ``if __name__ == "__main__": sys.exit(...)`` block,
a printed "passed" marker, or bytes written to inherited descriptors all end the run as not passed. The nonce is
read by the boot only once the program and its check are over, so it is in no variable while they run; a program
written to attack this evaluator from inside its own interpreter (reading its descriptors or memory) is not
what this defends against (the reference HumanEval harness runs candidates in-process as well).

Containment of one program, in the order the child sets it up (see :mod:`qtune.evaluate.sandbox_boot`):

- as root (the full sandbox): new mount, IPC (its SysV and POSIX message queues, semaphores and shared memory
  vanish with it) and (``network="namespace"``) network namespaces, the network holding only a loopback that is
  down (no connection leaves, not even to the host's 127.0.0.1); every mount read-only
  (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``, on kernels before 5.12 a read-only bind remount of each
  mount); one tmpfs of ``disk_mb`` MiB on ``/tmp`` that holds everything the program can write: its working
  directory ``/tmp/qtune-sandbox-*`` (also ``HOME`` and ``TMPDIR``) and the directories bound over ``/var/tmp``
  and ``/dev/shm``. So no file it writes survives the run, and all it writes together is bounded by ``disk_mb``
  (and 16384 files), not only each file by ``RLIMIT_FSIZE``; other world-writable host directories
  (``/run/lock`` ...) are read-only. A fresh ``/proc`` with ``hidepid=invisible`` (kernel 5.8 or later) shows
  only its own processes, so it reads no other process's command line. Then it drops to an unprivileged user id
  of its own (one per worker slot), so it can signal no other process and ``RLIMIT_NPROC`` counts only its own
  processes;
- not root (or root without ``CAP_SYS_ADMIN``, after dropping to its user id), where the kernel allows
  unprivileged user namespaces: the same sandbox inside a user namespace, but without the fresh ``/proc``
  (mounting one needs a PID namespace: other processes' command lines stay readable) and without a user id of
  its own (it runs as the caller, every capability dropped and ``no_new_privs`` set, so it cannot undo the
  mounts, but it can signal the caller's other processes);
- no namespaces at all: the ``socket`` module refuses to create sockets, and files can be written wherever the
  user may (as root: the unprivileged user id, so its temporary working directory and world-writable
  directories);
- rlimits: ``RLIMIT_AS`` (address space, bytes), ``RLIMIT_CPU`` (seconds of CPU), ``RLIMIT_NPROC`` (processes),
  ``RLIMIT_FSIZE`` (largest file written, bytes), ``RLIMIT_CORE`` 0;
- a wall-clock timeout in the evaluator; afterwards every process left by the program is killed (as root: every
  process of its user id, with ``kill(-1, SIGKILL)`` sent from that user id; otherwise its process group).

Status of a run (:class:`RunResult`):

- ``passed``: the boot's report says the body and the check returned, and the exit status is 0;
- ``failed``: an ``AssertionError`` ended the body or the check (the tests ran and one did not hold);
- ``timed out``: the wall clock or the CPU limit;
- ``error``: anything else. ``error`` says what: the exception's last line (``NameError: name 'x' is not
  defined``, ``MemoryError``); ``program ended before check() completed (SystemExit: 0)`` for a
  ``SystemExit``, ``KeyboardInterrupt`` and other non-``Exception`` exceptions; ``program ended before check()
  completed (exit status 0)`` / ``(killed by signal SIGTERM)`` when the process ended without the boot's
  report (``os._exit``, ``os.exec*``, a signal); ``sandbox setup failed: ...``. Without a check
  expression the phrase is ``program ended early``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import IO, Any

from qtune.errors import QtuneError
from qtune.evaluate.sandbox_boot import BOOT
from qtune.evaluate.sandbox_host import SANDBOX_UID_BASE, _kill_uid, _pids_of_uid, _uid_for, sandbox_python
from qtune.units import MIB

__all__ = [
    "SANDBOX_UID_BASE",
    "RunResult",
    "SandboxLimits",
    "run_program",
    "run_programs",
    "sandbox_python",
]


@dataclass
class SandboxLimits:
    """Limits for one program.

    Attributes:
        timeout_s: wall-clock seconds before the program (and everything it started) is killed.
        cpu_s: CPU seconds (``RLIMIT_CPU``); default: the timeout rounded up.
        memory_mb: address space in MiB (``RLIMIT_AS``) of each process.
        nproc: processes (and threads) the program may have at once (``RLIMIT_NPROC``), itself included.
        fsize_mb: largest file it may write, MiB (``RLIMIT_FSIZE``).
        disk_mb: all it may write together, MiB: the size of its tmpfs (``/tmp`` with its working directory,
            ``/var/tmp``, ``/dev/shm``), in the namespace sandbox (see the module docstring).
        network: "namespace" (a fresh network namespace where the kernel allows it, else sockets refused) or
            "refuse" (always refuse socket creation, no network namespace).
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    nproc: int = 16
    fsize_mb: int = 16
    disk_mb: int = 32
    network: str = "namespace"

    def __post_init__(self):
        if min(self.timeout_s, self.memory_mb, self.nproc, self.fsize_mb, self.disk_mb) <= 0:
            raise QtuneError(f"sandbox limits must be positive, got {self}")
        if self.network not in ("namespace", "refuse"):
            raise QtuneError(f"sandbox network must be 'namespace' or 'refuse', got {self.network!r}")


@dataclass
class RunResult:
    """Outcome of one program: ``status`` is passed / failed / timed out / error (see the module docstring);
    ``error`` says why it did not pass (empty when passed); ``seconds`` the wall time; ``returncode`` the exit
    status (negative: killed by that signal; None when it timed out)."""

    status: str
    error: str
    seconds: float
    returncode: int | None

    def as_dict(self) -> dict:
        return asdict(self)


_REMOUNT_EACH = False
"""Make the mounts read-only one by one (the path for kernels before 5.12) even where mount_setattr exists."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _boot_report(data: bytes, nonce: bytes) -> tuple[str, str] | None:
    """(status, error) from the boot's report line (``NONCE STATUS ERROR``), the last one if several; None when
    none carries the nonce (whatever else the program wrote to the pipe is ignored)."""
    for line in reversed(data.split(b"\n")):
        if line.startswith(nonce + b" "):
            status, _, error = line[len(nonce) + 1 :].decode("utf-8", "replace").partition(" ")
            if status in ("passed", "failed", "error"):
                return status, error
    return None


def _classify(
    returncode: int | None, report: tuple[str, str] | None, stderr: str, timed_out: bool, ended: str
) -> tuple[str, str]:
    if timed_out:
        return "timed out", "wall-clock timeout"
    last = _last_line(stderr)
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and "CPU" in last):
            return "timed out", "CPU time limit"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        how = f"killed by signal {name}"
    else:
        how = f"exit status {returncode}"
    if report is not None and (report[0] != "passed" or returncode == 0):
        return report
    if report is not None:
        return "error", f"the check completed, then the program ended with {how}"
    return "error", f"{ended} ({how})"


def _read_available(fd: int, most: int = 1 << 16) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while sum(map(len, chunks)) < most:
            chunk = os.read(fd, most)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:  # a writer the kill missed still holds the pipe open
        pass
    return b"".join(chunks)


def _write_program(work: str, source: str, uid: int | None) -> None:
    """``source`` as ``program.py`` in the working directory ``work``; as root, both owned by ``uid``."""
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    if uid is not None:  # root: the working directory when no namespace can be made
        os.chown(work, uid, uid)
        os.chown(os.path.join(work, "program.py"), uid, uid)


def _boot_config(
    lim: SandboxLimits, uid: int | None, work: str, check: str | None, nonce_fd: int, report_fd: int
) -> dict[str, Any]:
    """The JSON config the child's boot code (:data:`qtune.evaluate.sandbox_boot.BOOT`) reads from ``argv[1]``:
    limits in bytes and seconds, the user id (None: not root), the descriptors of the nonce and report pipes."""
    cfg: dict[str, Any] = {
        "uid": uid,
        "network": lim.network,
        "cpu_s": int(lim.cpu_s or -(-lim.timeout_s // 1)),
        "memory": lim.memory_mb * MIB,
        "nproc": lim.nproc,
        "fsize": lim.fsize_mb * MIB,
        "disk_mb": lim.disk_mb,
        "workname": os.path.basename(work),
        "check": check,
        "nonce_fd": nonce_fd,
        "report_fd": report_fd,
        "remount_each": _REMOUNT_EACH,
    }
    if uid is None:  # not root: RLIMIT_NPROC counts every process of this user; allow ``nproc`` more than it has now
        cfg["nproc"] += len(_pids_of_uid(os.getuid()))
    return cfg


def _start(cfg: dict[str, Any], work: str, out: IO[bytes], err: IO[bytes], parent_ends: list[int]) -> subprocess.Popen:
    """Start the child (its own session) on the boot code, with a minimal environment; the child's ends of the
    two pipes (``cfg``'s descriptors) are closed here, and taken out of ``parent_ends``, as soon as it has them."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    child_fds = (cfg["nonce_fd"], cfg["report_fd"])
    try:
        return subprocess.Popen(
            [sandbox_python(cfg["uid"] is not None), "-I", "-S", "-c", BOOT, json.dumps(cfg)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            pass_fds=child_fds,
        )
    finally:
        for fd in (cfg["report_fd"], cfg["nonce_fd"]):
            os.close(fd)
            parent_ends.remove(fd)


def _wait_then_kill(proc: subprocess.Popen, timeout_s: float, uid: int | None) -> bool:
    """Wait up to ``timeout_s`` seconds for the child, then kill its process group and (as root) every process of
    ``uid``; whether the wall clock ran out."""
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if uid is not None:
            _kill_uid(uid)
    return timed_out


def _tail(path: str, most: int = 8192) -> str:
    """The last ``most`` bytes of the file at ``path``, decoded (UTF-8, bad bytes replaced)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(f.name) - most))
        return f.read().decode("utf-8", "replace")


def run_program(source: str, limits: SandboxLimits | None = None, slot: int = 0, check: str | None = None) -> RunResult:
    """Run ``source`` as ``program.py`` (``__name__ == "__main__"``) in a fresh sandboxed process, then evaluate
    the expression ``check`` (e.g. ``"check(add)"``) in the program's namespace, and report how it ended.

    Args:
        source: a complete Python program.
        limits: see :class:`SandboxLimits`.
        slot: worker slot (0..63); as root, it selects the unprivileged user id, so concurrent runs need
            distinct slots.
        check: an expression run after the program; None: the program alone.

    Returns:
        status ``passed`` only when the program ran to its end and then ``check`` returned, as the sandbox's boot
        code reports it over a private pipe; see the module docstring for every status.
    """
    lim = limits or SandboxLimits()
    uid = _uid_for(slot) if os.geteuid() == 0 else None
    work = tempfile.mkdtemp(prefix="qtune-sandbox-")
    logs = tempfile.mkdtemp(prefix="qtune-sandbox-logs-")
    nonce = secrets.token_hex(16).encode()
    report_r, report_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    parent_ends = [report_r, report_w, nonce_r]  # closed at the end; the child's two as soon as it has them
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        _write_program(work, source, uid)
        cfg = _boot_config(lim, uid, work, check, nonce_r, report_w)
        start = time.monotonic()
        with open(os.path.join(logs, "out"), "wb") as out, open(os.path.join(logs, "err"), "wb") as err:
            proc = _start(cfg, work, out, err, parent_ends)
            timed_out = _wait_then_kill(proc, lim.timeout_s, uid)
        seconds = time.monotonic() - start
        report = _boot_report(_read_available(report_r), nonce)
        stderr = _tail(os.path.join(logs, "err"))
        ended = "program ended before check() completed" if check else "program ended early"
        returncode = None if timed_out else proc.returncode
        status, error = _classify(returncode, report, stderr, timed_out, ended)
        return RunResult(status, error, round(seconds, 3), returncode)
    finally:
        for fd in parent_ends:
            os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def run_programs(
    sources: list[str],
    limits: SandboxLimits | None = None,
    workers: int = 2,
    on_result=None,
    checks: Sequence[str | None] | None = None,
) -> list[RunResult]:
    """Run each program with :func:`run_program` (``checks[i]`` its check expression, none by default),
    ``workers`` at a time; results in the order of ``sources``.

    ``on_result(index, result)`` is called as each one finishes (from worker threads, one at a time).

    Raises:
        QtuneError: ``workers`` not in 1..64, or ``checks`` not one per source.
    """
    if not 1 <= workers <= 64:
        raise QtuneError(f"--workers {workers}: expected 1 to 64")
    if checks is not None and len(checks) != len(sources):
        raise QtuneError(f"{len(checks)} check expressions for {len(sources)} programs")
    slots = list(range(workers))
    lock = threading.Lock()
    results: list[RunResult | None] = [None] * len(sources)

    def one(i: int) -> None:
        with lock:
            slot = slots.pop()
        try:
            results[i] = run_program(sources[i], limits, slot, checks[i] if checks else None)
        finally:
            with lock:
                slots.append(slot)
                if on_result is not None:
                    on_result(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(one, i) for i in range(len(sources))]:
            f.result()
    return results  # type: ignore[return-value]
