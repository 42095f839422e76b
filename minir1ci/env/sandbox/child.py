"""The processes below the sandbox's fork server (server.py), and the code run inside each execution.

    server ─fork─> zygote (one per image, server.py): forked before the server reads any request; forks
                   its image's slot inits
                   └─fork─> slot init: root, pid 1 of the slot's PID, network (no interface up) and mount
                            namespaces (its own /proc); reads no request or output; as a request arrives,
                            mounts new capped tmpfs on /tmp and /dev/shm (detached after the report)
                            └─fork─> user (one per request): reads its request, gets an IPC namespace,
                                     rlimits, the slot's uid, fds 0-2 only, and runs the code (`run_code`)
                   then the init kills (kill(-1) from pid 1) and reaps all else in its namespace, restarts
                   its pid counter, and reports the wait status and CPU time.

So every execution forks from processes that never held another execution's data. Without PID
namespaces, inits and zygote are child subreapers that kill the process group, then every orphan.
"""
from __future__ import annotations

import builtins
import linecache
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import traceback
import types
from contextlib import suppress
from typing import NoReturn

from minir1ci.env.sandbox.isolation import (CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, MS_NODEV,
                                            MS_NOEXEC, MS_NOSUID, PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG,
                                            drop_tmpfs, fork, fresh_tmpfs, libc, prctl, restart_pid_counter)
from minir1ci.env.sandbox.protocol import STATUS, read_frame

CTRL_IN, CTRL_OUT = 3, 4  # the server's request and result fds
REQ_FD, STATUS_FD = 3, 4  # in a slot init (0-2 are stdin, stdout, stderr)


def zygote_main(sock_fd: int, server: int, cfg: dict, iso: dict) -> NoReturn:
    """Fork slot inits on the server's demand (a slot index and four pipe ends in, the init's pid out).
    A slot's previous init is reaped only then: its pid is not reused while the server might signal it."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: so do we, and the inits with us
    if os.getppid() != server:
        os._exit(0)
    os.dup2(sock_fd, CTRL_IN)  # replaces the server's request pipe; fd 4, its result pipe, closes
    os.closerange(CTRL_IN + 1, os.sysconf("SC_OPEN_MAX"))
    sock = socket.socket(fileno=CTRL_IN)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if iso["pid_ns"] else -1
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # a dead init's orphans come to us
    inits: dict[int, int] = {}  # slot -> pid of its init
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 4, 4)
        if len(msg) < 4:
            os._exit(0)  # the server closed its end
        (slot,) = struct.unpack("<I", msg)
        if slot in inits:
            os.waitpid(inits.pop(slot), 0)
        if not iso["pid_ns"]:  # its user process and theirs are now our orphans
            _sweep(set(inits.values()))
        if iso["pid_ns"]:
            libc("unshare", CLONE_NEWPID)  # our next child is pid 1 of a fresh namespace
        if (pid := fork()) == 0:
            try:
                _slot_main(slot, tuple(fds), cfg, iso)
            finally:
                os._exit(70)
        if iso["pid_ns"]:
            libc("setns", own_pidns, CLONE_NEWPID)  # later children: back in our namespace
        for fd in fds:
            os.close(fd)
        inits[slot] = pid
        sock.send(struct.pack("<i", pid))


def _slot_main(slot: int, fds: tuple[int, ...], cfg: dict, iso: dict) -> None:
    """Pid 1 of the slot's namespace: per request, fork the user process, then clean up after it."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote died: so does the namespace
    null = os.open(os.devnull, os.O_RDWR)
    for src, dst in zip((null, *fds), range(5)):  # sources are >= 4: the zygote keeps 0-3 open
        os.dup2(src, dst)
    os.closerange(5, os.sysconf("SC_OPEN_MAX"))
    os.setsid()
    # Out of memory, the kernel kills the slot's processes first, never the trainer. Inherited by every
    # execution; set here, as root, so code cannot lower it, and once (a write costs ~0.3 ms).
    with suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    failed = None
    opts = f"size={cfg['limits']['disk_bytes']},nr_inodes=16384,mode=1777"
    try:
        if iso["net_ns"]:  # abstract unix sockets and the like reach no other slot
            libc("unshare", CLONE_NEWNET)
        if iso["mount_ns"]:
            libc("unshare", CLONE_NEWNS)
            if iso["pid_ns"]:  # a /proc of this namespace, showing the slot uid none of root's processes:
                # not this init, whose fault and CPU counts sum every execution it reaped (hidepid=invisible)
                libc("mount", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
            fresh_tmpfs(opts)  # a check only: each execution gets its own, mounted as its request arrives
            drop_tmpfs()
    except OSError:  # every request then fails with the reason (a respawn would fail the same way)
        failed = f"sandbox set-up failed:\n{traceback.format_exc()}"
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us instead of the host's init
    poll = select.poll()
    poll.register(REQ_FD, select.POLLIN)
    while all(events & select.POLLIN for _, events in poll.poll()):  # a request waits (not read here)
        if iso["mount_ns"] and not failed:  # mounted now, so nothing in them (times, inode numbers) is older
            _or_retire(fresh_tmpfs, opts)
        workdir = "/tmp" if iso["mount_ns"] else tempfile.mkdtemp(dir=cfg["scratch"])
        # Forks share one random state (numpy never reseeds): reseed here, so the user process touches
        # none of those pages; an int keeps numpy on its cheap C path. Sessions reseed in the user process.
        seed = int.from_bytes(os.urandom(4), "little")
        for name in ("random", "numpy.random"):
            if name in sys.modules:
                sys.modules[name].seed(seed)
        pid = fork()
        if pid == 0:
            _user_main(slot, cfg, iso, workdir, failed)
        _, status, usage = os.wait4(pid, 0)  # its CPU time (with its reaped children's): did RLIMIT_CPU kill it?
        if iso["pid_ns"]:
            ignore(os.kill, -1, signal.SIGKILL)  # from pid 1: every other process of the namespace
            with suppress(ChildProcessError):
                while True:
                    os.waitpid(-1, 0)
        else:
            ignore(os.killpg, pid, signal.SIGKILL)
            _sweep(set())
        if not iso["mount_ns"]:  # in a child, so that the names of its files never enter our memory
            if (cleaner := fork()) == 0:
                shutil.rmtree(workdir, ignore_errors=True)
                os._exit(0)
            os.waitpid(cleaner, 0)
        if iso["pid_ns"]:  # the next execution's processes are numbered as if the namespace were new
            restart_pid_counter()
        os.write(STATUS_FD, STATUS.pack(status, usage.ru_utime + usage.ru_stime))
        if iso["mount_ns"] and not failed:  # after the report, off its path; the run's files go now
            _or_retire(drop_tmpfs)
    os._exit(0)


def _or_retire(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:  # retire the slot: the server reports a run it sent as lost, and respawns the slot
        os._exit(0)


def _sweep(keep: set[int]) -> None:
    """Kill our children except `keep`, and the orphans that reach us (a subreaper) as they die."""
    me = os.getpid()
    for _ in range(1000):
        strays = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            with suppress(OSError), open(f"/proc/{name}/stat", "rb") as f:  # ppid: field 4, after the name's ")"
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == me and int(name) not in keep:
                    strays.append(int(name))
        for pid in strays:
            ignore(os.killpg, pid, signal.SIGKILL)
            ignore(os.kill, pid, signal.SIGKILL)
        for pid in strays:
            ignore(os.waitpid, pid, 0)
        if not strays:
            return


def _user_main(slot: int, cfg: dict, iso: dict, workdir: str, failed: str | None) -> NoReturn:
    """Read the request, set up as root (namespaces, limits), drop to the slot's uid, run the code."""
    try:
        req = read_frame(REQ_FD)  # here, not in the init: the next execution forks from the init
        os.closerange(REQ_FD, os.sysconf("SC_OPEN_MAX"))  # the init's request and status pipes
        if failed:  # the slot's set-up failed: every request reports why
            os.write(2, failed.encode())
            os._exit(71)
        if req is None:
            raise RuntimeError("no request")
        os.setsid()  # kill(0, sig) reaches only this process group
        if not iso["pid_ns"]:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no namespace to take us along
        if req["seed"] is not None:  # a session: the same draws when its blocks are replayed
            for name in ("random", "numpy.random"):
                if name in sys.modules:
                    sys.modules[name].seed(req["seed"] % 2**32)
        if iso["mount_ns"]:  # SysV IPC objects and POSIX queues die with us; code still running as
            # root (no uid to drop to) gets its own mounts and network too, or its changes would last
            root_only = 0 if iso["uid"] else CLONE_NEWNS | (CLONE_NEWNET if iso["net_ns"] else 0)
            libc("unshare", CLONE_NEWIPC | root_only)
        lim, cpu = cfg["limits"], req["cpu_s"]
        limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
                  (resource.RLIMIT_AS, (lim["memory_bytes"],) * 2),
                  (resource.RLIMIT_FSIZE, (lim["file_bytes"],) * 2),
                  (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2)]
        if iso["uid"]:  # NPROC counts all processes of a uid: only meaningful for our own uids
            limits.append((resource.RLIMIT_NPROC, (lim["processes"],) * 2))
        for res, value in limits:
            resource.setrlimit(res, value)
        if iso["uid"]:
            uid = cfg["uid_base"] + slot
            if workdir != "/tmp":
                os.chown(workdir, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # drops every capability; RLIMIT_NPROC now binds
        os.chdir(workdir)
        if workdir != "/tmp":
            os.environ["HOME"] = workdir  # the rest of USER_ENV is the server's own environment
    except BaseException:  # noqa: BLE001 - any set-up failure becomes the result
        os.write(2, f"sandbox set-up failed:\n{traceback.format_exc()}".encode())
        os._exit(71)
    run_code(req["code"], req["prelude"])


def run_code(code: str, prelude: list[str]) -> NoReturn:
    """Run the code as `python -c` would, in a fresh __main__, and leave with its exit code."""
    sys.argv = ["-c"]
    main = types.ModuleType("__main__")  # fresh globals; the server's __main__ stays untouched
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    if prelude:  # session replay: earlier blocks run silently, their errors ignored
        sys.stdout = sys.stderr = open(os.devnull, "w")
        for i, block in enumerate(prelude):
            with suppress(BaseException):  # they were reported when they first ran
                exec(_compile(block, f"<block {i + 1}>"), main.__dict__)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        exec(_compile(code, "<string>"), main.__dict__)
        rc = 0
    except SystemExit as exc:
        rc = _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - printed like the interpreter does
        rc = 1
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # our frames: the traceback starts in the code, as with `python -c`
        with suppress(BaseException):  # reporting must never mask the exit code
            traceback.print_exception(type(exc), exc, tb, limit=-1000)  # as the C printer
    for stream in (sys.stdout, sys.stderr):
        with suppress(BaseException):
            stream.flush()
    os._exit(rc)  # no interpreter shutdown: leftover threads and atexit hooks are dropped


def _exit_code(exc: SystemExit) -> int:
    """The exit status `python -c` gives an uncaught SystemExit: None -> 0; an int -> the low byte of
    a C long (255 when it does not fit); anything else is printed to stderr -> 1. Never raises."""
    try:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            code = int.__index__(code)  # the plain value, whatever a subclass overrides
            return code & 0xFF if -2**63 <= code < 2**63 else 255
        print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reporting must never mask the exit
        pass
    return 1


def _compile(source: str, name: str) -> types.CodeType:
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # traceback lines
    return compile(source, name, "exec")


def ignore(fn, *args) -> None:
    with suppress(ProcessLookupError, ChildProcessError, PermissionError):
        fn(*args)
