"""The child side of the sandbox: the boot code one sandboxed process runs (:data:`BOOT`).

It is passed to ``python -I -S -c`` with one argument, a JSON config that :func:`qtune.evaluate.sandbox.run_program`
builds (user id, network mode, limits, working directory name, check expression, the nonce and report descriptors,
whether to remount read-only one mount at a time). In this order it sets up namespaces, mounts, user id and
rlimits (see :mod:`qtune.evaluate.sandbox` for what each protects against), runs ``program.py`` as ``__main__``,
then the check expression, and reports over the private pipe; the parent reads that report.
"""

# The child: set up namespaces, mounts, user id and rlimits; run program.py as __main__, then the check expression;
# report over the pipe (argv[1] is a JSON config). Everything stays in _boot's locals, not in module globals.
BOOT = r"""
def _boot():
    import ctypes, json, os, re, resource, signal, sys, traceback, types
    # Ctrl-C is KeyboardInterrupt in the program even when qtune runs with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
