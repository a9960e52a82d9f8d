"""The sandbox contains hostile programs, reports each, and the evaluator carries on.

Small limits throughout (256 MiB, 8 processes, a few seconds) so a failure of containment stays harmless.
"""

import os
import socket
import time
from pathlib import Path

import pytest

from qtune.errors import QtuneError
from qtune.evaluate.sandbox import SandboxLimits, _pids_of_uid, _uid_for, run_program, run_programs

SMALL = SandboxLimits(timeout_s=3, memory_mb=256, nproc=8, fsize_mb=1)
ROOT = os.geteuid() == 0


def test_plain_outcomes():
    assert run_program("print('hi')", SMALL).status == "passed"
    r = run_program("assert 1 + 1 == 3, 'arithmetic'", SMALL)
    assert (r.status, r.error, r.returncode) == ("failed", "AssertionError: arithmetic", 1)
    r = run_program("import math\nmath.sqrt(-1)", SMALL)
    assert (r.status, r.error) == ("error", "ValueError: math domain error")


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


def test_writes_stay_inside_the_working_directory(tmp_path):
    outside_tmp = f"/tmp/qtune-sandbox-escape-{os.getpid()}"  # /tmp is a private tmpfs in the sandbox
    in_tmp = tmp_path / "escaped.txt"  # under /tmp too: hidden from the sandbox
    beside_tests = Path(__file__).with_name(f"escaped-{os.getpid()}.txt")  # root-owned, outside /tmp
    program = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        f"open({outside_tmp!r}, 'w').write('x')\n"
        "open('../escaped.txt', 'w').write('x')\n"
        "errors = []\n"
        f"for path in ({str(in_tmp)!r}, {str(beside_tests)!r}):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError as e:\n"
        "        errors.append(type(e).__name__)\n"
        "raise SystemExit(','.join(errors))\n"
    )
    try:
        r = run_program(program, SMALL)
        expected = "FileNotFoundError,PermissionError" if ROOT else None
        if expected:
            assert (r.status, r.error) == ("error", expected), r
        assert not in_tmp.exists() and not beside_tests.exists() and not os.path.exists(outside_tmp)
    finally:
        beside_tests.unlink(missing_ok=True)
    r = run_program("open('big', 'wb').write(b'x' * (4 << 20))", SMALL)  # RLIMIT_FSIZE 1 MiB
    assert (r.status, r.error) == ("error", "OSError: [Errno 27] File too large")


def test_working_directory_is_removed():
    r = run_program("import os\nraise RuntimeError(os.getcwd())", SMALL)
    assert r.status == "error" and r.error.startswith("RuntimeError: /")
    workdir = r.error.removeprefix("RuntimeError: ")
    assert "qtune-sandbox-" in workdir and not os.path.exists(workdir)


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


def test_parallel_workers_keep_order_and_overlap():
    programs = ["import time\ntime.sleep(1)\nassert %d %% 2 == 0" % i for i in range(4)]
    start = time.monotonic()
    results = run_programs(programs, SMALL, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"]
    assert time.monotonic() - start < 3.8  # 4 one-second programs, two at a time


def test_bad_limits_are_one_line_errors():
    with pytest.raises(QtuneError, match="must be positive"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(QtuneError, match="network must be"):
        SandboxLimits(network="open")
