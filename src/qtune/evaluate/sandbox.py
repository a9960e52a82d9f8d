"""Run untrusted Python programs (model-written code plus its tests), one separate process each.

What passes: the evaluator's own boot code (``_BOOT``) runs the program body, then the caller's ``check``
expression (HumanEval: ``check(entry_point)``); only when both returned does the boot report success, over a
pipe that is neither stdout nor stderr, as a line that starts with a random nonce made for that run, and then it
ends the process with ``os._exit(0)`` at once (no atexit handler, finalizer or buffered output runs after it).
The evaluator counts a run as passed only when that line arrives and the process exits with status 0. So exit
statuses and output count for nothing: ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, an atexit handler,
a signal the program sends itself, ``unittest.main()`` or any ``if __name__ == "__main__": sys.exit(...)`` block,
a printed "passed" marker, or bytes written to inherited descriptors all end the run as not passed. The nonce is
read by the boot only once the program and its check are over, so it is in no variable while they run; a program
written to attack this evaluator from inside its own interpreter (reading its descriptors or memory) is not
what this defends against (the reference HumanEval harness runs candidates in-process as well).

Containment of one program, in the order the child sets it up (see ``_BOOT``):

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
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from qtune.errors import QtuneError
from qtune.units import MIB

# The child: set up namespaces, mounts, user id and rlimits; run program.py as __main__, then the check expression;
# report over the pipe (argv[1] is a JSON config). Everything stays in _boot's locals, not in module globals.
_BOOT = r"""
def _boot():
    import ctypes, json, os, re, resource, sys, traceback, types
    cfg = json.loads(sys.argv[1])
    sys.argv = ["program.py"]
    read, write, exit_now = os.read, os.write, os._exit
    Base, Exc, Assertion = BaseException, Exception, AssertionError
    run, evaluate, compile_ = exec, eval, compile  # as they are before the program can replace builtins
    nonce_fd, report_fd, check = cfg["nonce_fd"], cfg["report_fd"], cfg["check"]
    ended = "program ended before check() completed" if check else "program ended early"

    def report(status, error=""):  # then end at once: no atexit handler or finalizer runs after it
        code = 0 if status == "passed" else 1
        try:  # the nonce is read only now: while the program ran it was in no variable
            line = status + " " + " ".join(str(error).split())[:500]
            write(report_fd, read(nonce_fd, 64) + b" " + line.encode("utf-8", "replace") + b"\n")
        except Base:  # the program closed or replaced the descriptors: no report
            code = 1
        exit_now(code)

    def describe(e):
        try:
            return traceback.format_exception_only(type(e), e)[-1].strip()
        except Base:
            return type(e).__name__

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.syscall.restype = ctypes.c_long
    NEWNS, NEWIPC, NEWUSER, NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    PER_MOUNT = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048,
                 "relatime": 1 << 21, "nosymfollow": 256}

    def ok(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        ok(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def read_only():  # every mount of this (private) namespace read-only
        class MountAttr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]
        attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY; 442 = mount_setattr, AT_FDCWD, AT_RECURSIVE
        if not cfg["remount_each"]:
            if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000),
                            ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) == 0:
                return
            if ctypes.get_errno() != 38:  # ENOSYS: a kernel before 5.12
                ok(-1, "mount_setattr /")
        with open("/proc/self/mountinfo") as f:
            rows = [line.split() for line in f]
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), r[4]) for r in rows]
        for i, (row, point) in enumerate(zip(rows, points)):
            if point in points[i + 1:]:
                continue  # covered by a later mount at the same place
            keep = sum(PER_MOUNT.get(o, 0) for o in row[5].split(","))
            mount(None, point, None, BIND | REMOUNT | RDONLY | keep)

    def private_filesystem(owner):  # after unshare(CLONE_NEWNS): read-only, but for one tmpfs on /tmp
        mount(None, "/", None, REC | PRIVATE)
        read_only()
        mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, f"size={cfg['disk_mb']}m,nr_inodes=16k,mode=1777")
        work = "/tmp/" + cfg["workname"]
        os.mkdir(work, 0o700)
        for name, target in (("var-tmp", "/var/tmp"), ("dev-shm", "/dev/shm")):
            target = os.path.realpath(target)
            if os.path.isdir(target) and target != "/tmp":
                os.mkdir("/tmp/." + name)
                os.chmod("/tmp/." + name, 0o1777)
                mount("/tmp/." + name, target, None, BIND)
        if owner is not None:
            os.chown(work, owner, owner)
        os.chdir(work)
        os.environ["HOME"] = os.environ["TMPDIR"] = work

    try:
        with open("program.py", encoding="utf-8", errors="surrogatepass") as f:
            source = f.read()
        uid, net = cfg["uid"], NEWNET if cfg["network"] == "namespace" else 0
        contained = False
        if uid is not None:  # root: namespaces, then an unprivileged user id of its own
            if libc.unshare(NEWNS | NEWIPC | net) == 0:
                private_filesystem(uid)
                if tuple(map(int, re.findall(r"\d+", os.uname().release)[:2])) >= (5, 8):
                    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC | RDONLY, "hidepid=invisible")
                contained = True
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if not contained:  # a user namespace as this user, where the kernel allows it
            me, group = os.getuid(), os.getgid()
            if libc.unshare(NEWUSER | NEWNS | NEWIPC | net) == 0:
                maps = (("setgroups", "deny"), ("uid_map", f"{me} {me} 1"), ("gid_map", f"{group} {group} 1"))
                for name, text in maps:
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                private_filesystem(None)
                ok(libc.prctl(38, 1, 0, 0, 0), "prctl no_new_privs")  # then drop every capability
                header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
                ok(libc.capset(header, data), "capset")
                contained = True
        with open("program.py", "w", encoding="utf-8", errors="surrogatepass") as f:  # for tracebacks
            f.write(source)

        def limit(which, value):
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                resource.setrlimit(which, (min(value, resource.getrlimit(which)[1]),) * 2)
        limit(resource.RLIMIT_CORE, 0)
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))  # SIGXCPU, SIGKILL a second later
        limit(resource.RLIMIT_FSIZE, cfg["fsize"])
        limit(resource.RLIMIT_NPROC, cfg["nproc"])
        limit(resource.RLIMIT_AS, cfg["memory"])
        if not (contained and net):
            import socket, _socket
            class _Refused(_socket.socket):
                def __init__(self, *a, **k):
                    raise PermissionError("network access is disabled in the qtune sandbox")
            socket.socket = socket.SocketType = _socket.socket = _Refused
            socket.socketpair = socket.create_connection = socket.create_server = _Refused
            del socket, _socket
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
    except Base as e:
        report("error", "sandbox setup failed: " + describe(e))
    try:
        run(compile_(source, "program.py", "exec"), main.__dict__)
        if check:
            evaluate(compile_(check, "<check>", "eval"), main.__dict__)
    except Base as e:
        line = describe(e)
        if isinstance(e, Assertion):
            report("failed", line)
        report("error", line if isinstance(e, Exc) else f"{ended} ({line})")
    report("passed")
_boot()
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
    root = os.geteuid() == 0
    uid = _uid_for(slot) if root else None
    work = tempfile.mkdtemp(prefix="qtune-sandbox-")
    logs = tempfile.mkdtemp(prefix="qtune-sandbox-logs-")
    nonce = secrets.token_hex(16).encode()
    report_r, report_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    parent_ends = [report_r, report_w, nonce_r]  # closed at the end; the child's two as soon as it has them
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(source)
        if uid is not None:  # root: the working directory when no namespace can be made
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, "program.py"), uid, uid)
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
            "nonce_fd": nonce_r,
            "report_fd": report_w,
            "remount_each": _REMOUNT_EACH,
        }
        if not root:  # RLIMIT_NPROC counts every process of this user; allow ``nproc`` more than it has now
            cfg["nproc"] += len(_pids_of_uid(os.getuid()))
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        start = time.monotonic()
        with open(os.path.join(logs, "out"), "wb") as out, open(os.path.join(logs, "err"), "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sandbox_python(root), "-I", "-S", "-c", _BOOT, json.dumps(cfg)],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=(nonce_r, report_w),
                )
            finally:
                for fd in (report_w, nonce_r):
                    os.close(fd)
                    parent_ends.remove(fd)
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
                if uid is not None:
                    _kill_uid(uid)
        seconds = time.monotonic() - start
        report = _boot_report(_read_available(report_r), nonce)
        with open(os.path.join(logs, "err"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 8192))
            stderr = f.read().decode("utf-8", "replace")
        ended = "program ended before check() completed" if check else "program ended early"
        status, error = _classify(None if timed_out else proc.returncode, report, stderr, timed_out, ended)
        return RunResult(status, error, round(seconds, 3), None if timed_out else proc.returncode)
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
