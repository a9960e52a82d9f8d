"""The sandbox contains hostile programs, reports each, and the evaluator carries on.

Small limits throughout (256 MiB, 8 processes, a few seconds) so a failure of containment stays harmless.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qtune.errors import QtuneError
from qtune.evaluate import sandbox
from qtune.evaluate.sandbox import SandboxLimits, _pids_of_uid, _uid_for, run_program, run_programs

SMALL = SandboxLimits(timeout_s=3, memory_mb=256, nproc=8, fsize_mb=1)
ROOT = os.geteuid() == 0


def _namespaces_work() -> bool:
    """The namespace sandbox is in place: the program's /tmp is its own empty tmpfs."""
    marker = tempfile.NamedTemporaryFile(prefix="qtune-sandbox-probe-", dir="/tmp")
    with marker:
        r = run_program(f"import os\nassert not os.path.exists({marker.name!r})", SMALL)
    return r.status == "passed"


CONTAINED = _namespaces_work()


WRONG = "def check(candidate):\n    assert candidate() == 1\n\ndef answer():\n    return 2\n"
RIGHT = WRONG.replace("return 2", "return 1")
ENDED = "program ended before check() completed"


@pytest.mark.parametrize("body", [WRONG, RIGHT], ids=["wrong", "right"])
@pytest.mark.parametrize(
    "tail, how",
    [
        ("import sys\nsys.exit(0)\n", "SystemExit: 0"),
        ("raise SystemExit\n", "SystemExit"),
        ("import sys\ndef main():\n    pass\nif __name__ == '__main__':\n    sys.exit(main())\n", "SystemExit"),
        # what pytest.main() ends with (no pytest in the sandbox's isolated interpreter)
        ("if __name__ == '__main__':\n    import sys\n    sys.exit(0)\n", "SystemExit: 0"),
        (
            "import unittest\nclass T(unittest.TestCase):\n    def test_nothing(self):\n"
            "        pass\nunittest.main()\n",
            "SystemExit: False",
        ),
        ("import os\nos._exit(0)\n", "exit status 0"),
        ("import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(3)\n", "SystemExit: 3"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by signal SIGKILL"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", "killed by signal SIGTERM"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n", "KeyboardInterrupt"),
        ("import os\nos.abort()\n", "killed by signal SIGABRT"),
        ("import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])\n", "exit status 0"),
        (
            "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\ntime.sleep(5)\n",
            "exit status 0",
        ),
        ("import sys\ndef answer():\n    sys.exit(0)\n", "SystemExit: 0"),  # exits when check calls it
        (
            "import os, sys\n"
            "for m in ('passed', 'PASSED', 'OK', '1 passed', 'All tests passed', '0' * 32 + ' passed'):\n"
            "    print(m)\n    print(m, file=sys.stderr)\nsys.stdout.flush()\nos._exit(0)\n",
            "exit status 0",
        ),
        (
            "import os\nfor fd in range(3, 21):\n"
            "    for m in (b'passed\\n', b'0' * 32 + b' passed \\n', b'\\n' * 100):\n"
            "        try:\n            os.write(fd, m)\n        except OSError:\n            pass\nos._exit(0)\n",
            "exit status 0",
        ),
        ("import os\nos.closerange(3, 64)\n", "exit status 1"),  # no channel left to report on
    ],
    ids=[
        "sys.exit",
        "raise SystemExit",
        "sys.exit(main())",
        "pytest.main-like",
        "unittest.main",
        "os._exit",
        "atexit",
        "SIGKILL",
        "SIGTERM",
        "SIGINT",
        "abort",
        "execv",
        "thread os._exit",
        "exit inside check",
        "printed markers",
        "fds 3-20",
        "closed fds",
    ],
)
def test_a_program_that_ends_before_its_check_is_not_passed(body, tail, how):
    r = run_program(body + tail, SMALL, check="check(answer)")
    assert (r.status, r.error) == ("error", f"{ENDED} ({how})"), r


@pytest.mark.parametrize(
    "tail",
    [
        "import atexit, os\natexit.register(os._exit, 0)\nassert answer() == 1\n",  # no atexit handler runs
        "import os\nfor fd in range(3, 21):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n"
        "        pass\n",  # bytes on the report pipe before the report
        # boot keeps its own
        "import builtins\nbuiltins.eval = builtins.exec = builtins.compile = lambda *a, **k: None\n",
    ],
    ids=["atexit os._exit", "junk on fds", "patched builtins"],
)
def test_only_the_check_decides(tail):
    r = run_program(WRONG + tail, SMALL, check="check(answer)")
    assert (r.status, r.error) == ("failed", "AssertionError")
    r = run_program(RIGHT + tail, SMALL, check="check(answer)")
    assert (r.status, r.error, r.returncode) == ("passed", "", 0)


def test_plain_outcomes():
    assert run_program("print('hi')", SMALL).status == "passed"
    r = run_program("assert 1 + 1 == 3, 'arithmetic'", SMALL)
    assert (r.status, r.error, r.returncode) == ("failed", "AssertionError: arithmetic", 1)
    r = run_program("import math\nmath.sqrt(-1)", SMALL)
    assert (r.status, r.error) == ("error", "ValueError: math domain error")
    r = run_program("import sys\nsys.exit(0)", SMALL)
    assert (r.status, r.error, r.returncode) == ("error", "program ended early (SystemExit: 0)", 1)
    r = run_program("x = (\n", SMALL)
    assert (r.status, r.error) == ("error", "SyntaxError: '(' was never closed")


@pytest.mark.slow
def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass", SMALL)
    assert (r.status, r.error, r.returncode) == ("timed out", "wall-clock timeout", None)
    assert 2.9 < time.monotonic() - start < 6


def test_cpu_limit_ends_a_busy_program_before_the_wall_clock():
    r = run_program("while True:\n    pass", SandboxLimits(timeout_s=8, cpu_s=1, memory_mb=256, nproc=8))
    assert (r.status, r.error) == ("timed out", "CPU time limit")
    assert r.seconds < 5


def test_ten_gigabytes_are_refused():
    r = run_program("x = bytearray(10 * 1024 ** 3)", SMALL)
    assert (r.status, r.error) == ("error", "MemoryError")
    r = run_program("x = [bytearray(1 << 20) for _ in range(10 * 1024)]", SMALL)  # touched page by page
    assert (r.status, r.error) == ("error", "MemoryError")


def test_no_network_even_to_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    try:
        assert socket.create_connection(("127.0.0.1", port), timeout=2)  # reachable from here
        r = run_program(program, SMALL)
        assert r.status == "error"
        assert r.error.startswith(("OSError: [Errno 101] Network is unreachable", "PermissionError"))
        r = run_program(program, SandboxLimits(timeout_s=3, memory_mb=256, nproc=8, network="refuse"))
        assert (r.status, r.error) == ("error", "PermissionError: network access is disabled in the qtune sandbox")
    finally:
        server.close()


def _outside_directory() -> Path:
    """A fresh world-writable directory the sandbox can see but must not write to: never under /tmp, /var/tmp or
    /dev/shm (private in the sandbox), wherever the checkout lives."""
    private = [os.path.realpath(d) for d in ("/tmp", "/var/tmp", "/dev/shm")]
    for base in (Path.home(), Path("/var/lib"), Path("/")):
        real = os.path.realpath(base)
        searchable = all(os.stat(p).st_mode & stat.S_IXOTH for p in [real, *map(str, Path(real).parents)])
        if searchable and os.access(real, os.W_OK) and not any(_under(real, p) for p in private):
            d = Path(tempfile.mkdtemp(prefix="qtune-sandbox-test-", dir=real))
            d.chmod(0o1777)
            return d
    pytest.skip("no writable directory outside /tmp, /var/tmp and /dev/shm")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@pytest.mark.skipif(not CONTAINED, reason="without namespaces the program writes wherever its user may")
def test_writes_stay_inside_the_working_directory(tmp_path):
    outside = _outside_directory()  # world-writable, so only the sandbox's read-only view refuses it
    try:
        in_tmp = tmp_path / "escaped.txt"  # the evaluator's /tmp (or wherever pytest puts tmp_path)
        program = (
            "import errno, os\n"
            "open('inside.txt', 'w').write('ok')\n"
            "open('/tmp/also-inside.txt', 'w').write('ok')\n"
            "errors = []\n"
            f"for path in ({str(in_tmp)!r}, {str(outside / 'escaped.txt')!r}, '../escaped.txt'):\n"
            "    try:\n"
            "        open(path, 'w').write('x')\n"
            "        errors.append('written')\n"
            "    except OSError as e:\n"
            "        errors.append(errno.errorcode[e.errno])\n"
            "raise ValueError(','.join(errors))\n"
        )
        r = run_program(program, SMALL)
        if CONTAINED:
            in_tmp_error = "ENOENT" if _under(os.path.realpath(tmp_path), "/tmp") else "EROFS"
            assert (r.status, r.error) == ("error", f"ValueError: {in_tmp_error},EROFS,written"), r
        assert not in_tmp.exists() and list(outside.iterdir()) == []
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), "escaped.txt"))
    finally:
        shutil.rmtree(outside)


def test_a_file_above_the_size_limit_is_refused():
    r = run_program("open('big', 'wb').write(b'x' * (4 << 20))", SMALL)  # RLIMIT_FSIZE 1 MiB
    assert (r.status, r.error) == ("error", "OSError: [Errno 27] File too large")


def _world_writable_directories() -> list[str]:
    """Every world-writable directory on this host (not under /proc or /sys; symbolic links not followed)."""
    found = []
    for top, dirs, _ in os.walk("/", onerror=lambda e: None):
        if top == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
        kept = []
        for d in dirs:
            path = os.path.join(top, d)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                kept.append(d)
                if st.st_mode & stat.S_IWOTH:
                    found.append(path)
        dirs[:] = kept
    return found


@pytest.mark.skipif(not CONTAINED, reason="a read-only view of the filesystem needs namespaces")
def test_nothing_written_to_any_world_writable_directory_survives():
    directories = _world_writable_directories()
    private = {os.path.realpath(d) for d in ("/tmp", "/var/tmp", "/dev/shm")}
    assert "/tmp" in directories
    name = f"qtune-escape-{os.getpid()}-{time.monotonic_ns()}"
    expected = {}
    for d in directories:
        real = os.path.realpath(d)
        # the private /tmp, /var/tmp, /dev/shm are empty tmpfs: writable, but what is below them is gone
        expected[d] = "written" if real in private else "ENOENT" if any(_under(real, p) for p in private) else "EROFS"
    program = (
        "import errno, json\n"
        f"expected = json.loads({json.dumps(json.dumps(expected))})\n"
        "wrong = []\n"
        "for d, want in expected.items():\n"
        "    try:\n"
        f"        open(d + '/{name}', 'w').write('x')\n"
        "        got = 'written'\n"
        "    except OSError as e:\n"
        "        got = errno.errorcode[e.errno]\n"
        "    if got != want:\n"
        "        wrong.append((d, got))\n"
        "assert not wrong, wrong\n"
    )
    try:
        r = run_program(program, SMALL)
        survivors = [d for d in directories if os.path.lexists(os.path.join(d, name))]
        assert survivors == [] and (r.status, r.error) == ("passed", ""), (r, survivors)
    finally:
        for d in directories:
            if os.path.lexists(os.path.join(d, name)):
                os.unlink(os.path.join(d, name))


@pytest.mark.skipif(not CONTAINED, reason="a tmpfs of its own needs namespaces")
def test_all_files_together_are_bounded_not_only_each_file():
    limits = SandboxLimits(timeout_s=5, memory_mb=256, nproc=8, fsize_mb=1, disk_mb=4)
    program = (
        "for i, d in enumerate(['.', '/tmp', '/var/tmp', '/dev/shm'] * 2):\n"
        "    open(f'{d}/part{i}', 'wb').write(b'x' * (900 << 10))\n"
    )  # 7.2 MiB in 900 KiB files
    r = run_program(program, limits)
    assert (r.status, r.error) == ("error", "OSError: [Errno 28] No space left on device")
    r = run_program(program.replace("* 2", "* 1"), limits)  # 3.6 MiB fits
    assert (r.status, r.error) == ("passed", "")


@pytest.mark.skipif(not CONTAINED, reason="mounts made read-only one by one need namespaces")
def test_mounts_made_read_only_one_by_one_on_old_kernels(monkeypatch):
    monkeypatch.setattr(sandbox, "_REMOUNT_EACH", True)  # the path taken where mount_setattr is missing
    program = (
        "import errno\nfor d in ['/run/lock', '/var/lib', '/dev/pts', '/sys/fs/cgroup', '/']:\n"
        "    try:\n        open(d + '/qtune-escape', 'w')\n    except OSError as e:\n"
        "        assert e.errno in (errno.EROFS,), (d, e)\n    else:\n        raise AssertionError(d)\n"
        "open('inside.txt', 'w').write('ok')\n"
    )
    r = run_program(program, SMALL)
    assert (r.status, r.error) == ("passed", "")


@pytest.mark.skipif(not ROOT, reason="a fresh /proc showing only its own processes needs root")
def test_other_processes_command_lines_are_hidden():
    secret = f"qtune-secret-{os.getpid()}-{time.monotonic_ns()}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    program = (
        "import os\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "assert pids == [str(os.getpid())], pids\n"
        f"assert not os.path.exists('/proc/{other.pid}'), 'the other process is visible'\n"
        "assert open('/proc/self/cmdline', 'rb').read().startswith(b'/')  # its own stays readable\n"
        "cmdlines = [open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]\n"
        f"assert not [c for c in cmdlines if {secret.encode()!r} in c]\n"
    )
    try:
        for _ in range(100):  # until it has exec'd; then its command line is readable from here
            if secret.encode() in Path(f"/proc/{other.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        assert secret.encode() in Path(f"/proc/{other.pid}/cmdline").read_bytes()
        r = run_program(program, SMALL)
        assert (r.status, r.error) == ("passed", ""), r
    finally:
        other.kill()
        other.wait()


def test_working_directory_is_removed():
    r = run_program("import os\nraise RuntimeError(os.getcwd())", SMALL)
    assert r.status == "error" and r.error.startswith("RuntimeError: /")
    workdir = r.error.removeprefix("RuntimeError: ")
    assert "qtune-sandbox-" in workdir and not os.path.exists(workdir)


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="a fork bomb is contained by a user id of its own only when run as root")
def test_fork_bomb_is_contained_and_reaped():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    results = run_programs([bomb, "print('next')"], SMALL, workers=1)
    assert results[0].status in ("timed out", "error")
    assert results[1].status == "passed"
    assert _pids_of_uid(_uid_for(0)) == []  # nothing of the bomb survives


@pytest.mark.skipif(not ROOT, reason="as root the program runs under an unprivileged user id")
def test_killing_the_parent_is_refused():
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", SMALL)
    assert (r.status, r.error) == ("error", "PermissionError: [Errno 1] Operation not permitted")
    r = run_program("import os, signal\nos.kill(1, signal.SIGKILL)", SMALL)
    assert r.status == "error"
    assert os.getpid() > 0  # still here


@pytest.mark.slow
def test_parallel_workers_keep_order_and_overlap():
    programs = [f"import time\ntime.sleep(1)\nassert {i} % 2 == 0" for i in range(4)]
    start = time.monotonic()
    results = run_programs(programs, SMALL, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"]
    assert time.monotonic() - start < 3.8  # 4 one-second programs, two at a time


def test_bad_limits_are_one_line_errors():
    with pytest.raises(QtuneError, match="must be positive"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(QtuneError, match="network must be"):
        SandboxLimits(network="open")


UNPRIVILEGED_RUN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from qtune.evaluate.sandbox import SandboxLimits, run_program
limits = SandboxLimits(timeout_s=5, memory_mb=256, nproc=8, fsize_mb=1, disk_mb=4)
programs = [
    (f"open({sys.argv[2]!r} + '/escaped.txt', 'w')", None),
    ("import os\nos.chdir('/tmp')\nopen('inside.txt', 'w').write('ok')\nopen('/dev/shm/x', 'w').write('ok')", None),
    ("for i in range(8):\n    open(f'part{i}', 'wb').write(b'x' * (900 << 10))", None),
    ("import ctypes\nassert ctypes.CDLL(None).umount2(b'/tmp', 2) == 0, 'umount refused'", None),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)", None),
    ("def check(f):\n    assert f() == 1\ndef g():\n    return 2\nimport sys\nsys.exit(0)", "check(g)"),
]
print(json.dumps([[r.status, r.error] for r in (run_program(p, limits, check=c) for p, c in programs)]))
"""


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv"), reason="runs the evaluator as another user (root only)")
def test_an_unprivileged_evaluator_gets_the_user_namespace_sandbox():
    python = sandbox.sandbox_python(True)
    src = str(Path(sandbox.__file__).resolve().parents[2])
    probe = _as_nobody(
        python,
        "-c",
        f"import sys; sys.path.insert(0, {src!r}); import qtune.evaluate.sandbox; "
        "import ctypes; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)",
    )
    if probe.returncode != 0:
        pytest.skip(f"this checkout or user namespaces are out of an unprivileged user's reach: {probe.stderr[-200:]}")
    outside = _outside_directory()
    try:
        done = _as_nobody(python, "-c", UNPRIVILEGED_RUN, src, str(outside))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [
            ["error", f"OSError: [Errno 30] Read-only file system: '{outside}/escaped.txt'"],
            ["passed", ""],
            ["error", "OSError: [Errno 28] No space left on device"],
            ["failed", "AssertionError: umount refused"],
            ["error", "OSError: [Errno 101] Network is unreachable"],
            ["error", "program ended before check() completed (SystemExit: 0)"],
        ]
        assert list(outside.iterdir()) == []
    finally:
        shutil.rmtree(outside)


def test_a_programs_sigint_is_keyboard_interrupt_even_when_qtune_runs_with_sigint_ignored():
    import signal

    body = "def check(candidate):\n    assert candidate() == 1\n\ndef answer():\n    return 2\n"
    tail = "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: children inherit the ignore
    try:
        r = run_program(body + tail, SMALL, check="check(answer)")
    finally:
        signal.signal(signal.SIGINT, old)
    assert (r.status, r.error) == ("error", f"{ENDED} (KeyboardInterrupt)"), r
