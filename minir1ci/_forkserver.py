"""The fork server behind `minir1ci.sandbox`: one long-lived process, one forked child per execution.

`Sandbox` runs this file as `python -I _forkserver.py CONFIG_JSON` with a minimal environment: a
clean spawn, never a fork of the trainer, so executions inherit neither its memory nor its secrets.
The server imports what model code usually uses once, sets up the isolation that all executions
share, then serves length-prefixed JSON frames: requests on fd 3, results on fd 4 (its stdin and
stdout, moved). The fields are the ones `sandbox.py` writes and reads.

Shared, set up once (each layer is skipped where the kernel refuses it):
  - a network namespace with no interface up: not even 127.0.0.1 is reachable;
  - a private mount namespace whose root is remounted read-only (a per-mount flag: the host's view
    stays writable); parents that hide the interpreter from other uids (/root, mode 700, under pyenv
    or conda) are covered by a tmpfs that holds only bind mounts of the interpreter's directories.

Per execution:

    server ─ unshare(CLONE_NEWPID) ─ posix_spawn ─> `sleep`: pid 1 of a fresh PID namespace
           └─ fork ─> user (pid 2 there): as root, a mount namespace with fresh size-capped tmpfs on
                      /tmp (the workdir) and /dev/shm and its own /proc; then rlimits, the slot's
                      uid, no_new_privs, a scrubbed environment; runs the code; os._exit

The init is a vfork-spawned `sleep` rather than a second fork of this large process (a fork plus
an exit cost about 2 ms here; the spawn about 0.3 ms), and it outlives the code by design: when the
user process exits, or at the deadline, or when the output passes its ceiling, the server SIGKILLs
the init, and the kernel kills everything left in the namespace (setsid'd grandchildren, fork
bombs) before the init can be reaped; the tmpfs mounts go with the namespace. The job ends when
both are reaped. The user process dies with the server (PDEATHSIG); the init sleeps until 2 s past the
deadline, so a namespace outlives a killed server by at most that.
Fallback without PID namespaces: the server is a child subreaper; at the end of an execution it
kills the execution's process group, then every orphan reparented to it, until none is left.

Simplified: one execution per slot, each slot its own uid (`uid_base + slot`) so RLIMIT_NPROC
bounds each execution alone; no seccomp filter; no cgroup (memory is limited per process).
"""
from __future__ import annotations

import os
import sys

# BLAS pools must be single-threaded before numpy is imported: fork copies only the calling
# thread, and a pool of one never starts another.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import builtins  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import linecache  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from collections import deque  # noqa: E402

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
INIT_NAME = "minir1ci-sandbox-init"  # argv[0] of the `sleep` that is each namespace's pid 1
CTRL_IN, CTRL_OUT, META_FD = 3, 4, 3  # server: request/result fds; execution: MemoryError flag fd
USER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_libc = ctypes.CDLL(None, use_errno=True)


def _sys(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:  # os.unshare and os.setns arrive only with Python 3.12
    _sys(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _sys(_libc.setns(fd, nstype), "setns")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _sys(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def umount(target: str) -> None:
    _sys(_libc.umount2(target.encode(), 2), f"umount {target}")  # 2: MNT_DETACH


def prctl(option: int, arg: int) -> None:
    _sys(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def fork() -> int:
    """fork(2) without os.fork's after-fork work (thread and lock re-initialisation, at-fork hooks),
    which dirties some 200 shared pages, about 0.7 ms here. Safe only because the server has one
    thread and holds the GIL across the call (PyDLL); children reseed `random` themselves."""
    pid = _pyfork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


_pyfork = ctypes.PyDLL(None, use_errno=True).fork


# ---------------------------------------------------------------- the user process (forked)

def _user_main(req: dict, slot: int, fds: tuple[int, int, int], cfg: dict, iso: dict, workdir: str):
    """Set up as root (mounts, limits), drop to the slot's uid, run the code. Never returns."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: so does this process
        null = os.open(os.devnull, os.O_RDWR)  # >= 5: the server keeps fds 0-4 open (see `main`)
        for src, dst in zip((null, *fds), range(4)):
            os.dup2(src, dst)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        os.setsid()  # out of the server's process group: kill(0, sig) reaches only this execution
        if iso["mount_ns"]:
            unshare(CLONE_NEWNS)
            opts = f"size={cfg['limits']['disk_bytes']},nr_inodes=16384,mode=1777"
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
            mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
            if iso["pid_ns"]:  # a /proc that shows only this execution's processes
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        lim, cpu = cfg["limits"], math.ceil(req["timeout"] * (1 + len(req["prelude"]))) + 1
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
            if not iso["mount_ns"]:
                os.chown(workdir, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # drops every capability; RLIMIT_NPROC now binds
        os.chdir(workdir)
        if workdir != "/tmp":
            os.environ["HOME"] = workdir  # the rest of USER_ENV is the server's own environment
        sys.argv = ["-c"]
        _reseed(req["seed"])
    except BaseException:  # noqa: BLE001 - any set-up failure becomes the result
        os.write(2, f"sandbox set-up failed:\n{traceback.format_exc()}".encode())
        os._exit(71)
    _run_code(req["code"], req["prelude"])


def _reseed(seed: int | None) -> None:
    """Forked children would share the server's random states (`random` reseeds itself after a
    fork, numpy does not). An int seed keeps numpy on its cheap C path: 32 bits of OS entropy."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed % 2**32
    if "random" in sys.modules:
        sys.modules["random"].seed(seed)
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed(seed)


def _run_code(code: str, prelude: list[str]):
    """Run the code as `python -c` would, in a fresh __main__, and exit with its exit code."""
    main = types.ModuleType("__main__")  # fresh globals; the server's __main__ stays untouched
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    if prelude:  # session replay: earlier blocks run silently, their errors ignored
        sys.stdout = sys.stderr = open(os.devnull, "w")
        for i, block in enumerate(prelude):
            try:
                exec(_compile(block, f"<block {i + 1}>"), main.__dict__)
            except BaseException:  # noqa: BLE001 - they were reported when they first ran
                pass
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        os.write(META_FD, b"P")  # the server now gives this block its own deadline
    try:
        exec(_compile(code, "<string>"), main.__dict__)
        rc = 0
    except SystemExit as exc:  # as the interpreter: None -> 0, int -> itself, else print it, 1
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            _safe(lambda: print(exc.code, file=sys.stderr))
    except BaseException as exc:  # noqa: BLE001 - printed like the interpreter does
        rc = 1
        if isinstance(exc, MemoryError):
            _safe(lambda: os.write(META_FD, b"M"))
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # our frames: the traceback starts in the code, as with `python -c`
        _safe(lambda: traceback.print_exception(type(exc), exc, tb, limit=-1000))  # as the C printer
    _safe(sys.stdout.flush)
    _safe(sys.stderr.flush)
    os._exit(rc & 0xFF)  # no interpreter shutdown: leftover threads and atexit hooks are dropped


def _compile(source: str, name: str) -> types.CodeType:
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # traceback lines
    return compile(source, name, "exec")


def _safe(fn) -> None:
    try:
        fn()
    except BaseException:  # noqa: BLE001 - reporting must never mask the exit code
        pass


# ---------------------------------------------------------------- the server

class _Capture:
    """Keeps the first and the last `keep // 2` bytes of a stream and counts the rest."""

    def __init__(self, keep: int):
        self.half, self.head, self.tail, self.total = keep // 2, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[:len(self.tail) - self.half]

    def text(self) -> tuple[str, bool]:
        omitted = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {omitted} bytes omitted ...]\n".encode() if omitted else b""
        return bytes(self.head + middle + self.tail).decode("utf-8", "replace"), omitted > 0


class _Job:
    def __init__(self, req: dict, slot: int, keep: int):
        self.req, self.slot, self.fds, self.flags = req, slot, {}, b""
        self.pid = self.init = 0  # the user process; the namespace's init (0: none)
        self.wait_status: int | None = None
        self.out, self.err = _Capture(keep), _Capture(keep)
        self.start = time.monotonic()
        self.deadline = self.start + req["timeout"] * (1 + len(req["prelude"]))
        self.timed_out = self.flooded = False
        self.workdir = "/tmp"


class Server:
    def __init__(self, cfg: dict, iso: dict):
        self.cfg, self.iso, self.lim = cfg, iso, cfg["limits"]
        self.sel = selectors.DefaultSelector()
        self.sel.register(CTRL_IN, selectors.EVENT_READ, ("ctrl", None))
        self.inbuf, self.queue, self.jobs = bytearray(), deque(), set()
        self.free = list(range(cfg["workers"]))[::-1]
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if iso["pid_ns"] else -1
        self.scratch = None if iso["mount_ns"] else tempfile.mkdtemp(prefix="minir1ci-sandbox-")
        if self.scratch:
            os.chmod(self.scratch, 0o711)  # slot uids may enter their own workdir, not list others

    def serve(self) -> None:
        while True:
            deadlines = [j.deadline for j in self.jobs if not j.timed_out]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.sel.select(wait):
                kind, job = key.data
                if kind == "ctrl":
                    if not self._read_requests():
                        return self._shutdown()
                elif job not in self.jobs:
                    continue  # finished earlier in this batch
                elif kind in ("pid", "init"):
                    self._reap(job, kind)
                else:
                    self._read_stream(job, kind)
            now = time.monotonic()
            for job in list(self.jobs):
                if not job.timed_out and now >= job.deadline:
                    job.timed_out = True
                    self._kill(job)
            while self.queue and self.free:
                self._start(self.queue.popleft())

    def _read_requests(self) -> bool:
        data = os.read(CTRL_IN, 1 << 16)
        if not data:
            return False
        self.inbuf += data
        while len(self.inbuf) >= 4:
            (n,) = struct.unpack(">I", self.inbuf[:4])
            if len(self.inbuf) < 4 + n:
                break
            self.queue.append(json.loads(self.inbuf[4:4 + n]))
            del self.inbuf[:4 + n]
        return True

    def _start(self, req: dict) -> None:
        req.setdefault("prelude", [])
        req.setdefault("seed", None)
        req["timeout"] = float(req.get("timeout") or self.lim["timeout"])
        job = _Job(req, self.free.pop(), self.lim["output_bytes"])
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, flags; close-on-exec for `sleep`
        if not self.iso["mount_ns"]:
            job.workdir = tempfile.mkdtemp(dir=self.scratch)
        sys.stdout.flush()  # nothing buffered may reach the child's output (normally a no-op)
        sys.stderr.flush()
        pid = -1
        try:
            if self.iso["pid_ns"]:
                unshare(CLONE_NEWPID)  # our next child is pid 1 of a fresh namespace
            try:
                if self.iso["pid_ns"]:
                    budget = math.ceil(job.deadline - job.start) + 2  # outlives us, but not long
                    job.init = os.posix_spawn(self.iso["init"], [INIT_NAME, str(budget)], {},
                                              file_actions=[(os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
                pid = job.pid = fork() if self.iso["raw_fork"] else os.fork()
            finally:
                if self.iso["pid_ns"] and pid != 0:
                    setns(self.own_pidns, CLONE_NEWPID)  # later children: back in our namespace
            if pid == 0:
                try:
                    _user_main(req, job.slot, tuple(w for _, w in pipes), self.cfg, self.iso, job.workdir)
                finally:
                    os._exit(70)
        except OSError as exc:  # spawn or fork refused (memory, pids): report it, keep serving
            for fd in (fd for pair in pipes for fd in pair):
                os.close(fd)
            if job.init:
                self._kill(job)
                os.waitpid(job.init, 0)
            self.free.append(job.slot)
            self._send(req["id"], "", f"sandbox: cannot start the execution: {exc}\n", "error", 0.0, False, None)
            return
        for (r, w), kind in zip(pipes, ("out", "err", "flags")):
            os.close(w)
            os.set_blocking(r, False)
            job.fds[kind] = r
        for kind, pid in (("pid", job.pid), ("init", job.init)):
            if pid:
                job.fds[kind] = os.pidfd_open(pid)
        for kind, fd in job.fds.items():
            self.sel.register(fd, selectors.EVENT_READ, (kind, job))
        self.jobs.add(job)

    def _read_stream(self, job: _Job, kind: str) -> bool:
        """Read once; False on EOF or when nothing is available."""
        try:
            data = os.read(job.fds[kind], 1 << 16)
        except BlockingIOError:
            return False
        if not data:
            self._close(job, kind)
            return False
        if kind == "flags":
            if b"P" in data and b"P" not in job.flags:  # prelude replayed: the block's own deadline
                job.deadline = time.monotonic() + job.req["timeout"]
            job.flags += data[:64]
        else:
            (job.out if kind == "out" else job.err).add(data)
            if job.out.total + job.err.total > self.lim["stop_output_bytes"] and not job.flooded:
                job.flooded = True
                self._kill(job)
        return True

    def _kill(self, job: _Job) -> None:
        if job.init:  # pid 1 of the namespace: the kernel takes every process in it along
            _ignore(os.kill, job.init, signal.SIGKILL)
        else:
            _ignore(os.killpg, job.pid, signal.SIGKILL)
            _ignore(os.kill, job.pid, signal.SIGKILL)

    def _reap(self, job: _Job, kind: str) -> None:
        _, status = os.waitpid(job.pid if kind == "pid" else job.init, 0)
        self._close(job, kind)
        if kind == "init" and os.WIFEXITED(status):
            job.timed_out = True  # the init's sleep ran out before we killed it: past the deadline
        if kind == "pid":
            job.wait_status = status
            self._kill(job)  # the code is done: take its leftovers with it
            if not self.iso["pid_ns"]:
                self._sweep()
        if "pid" not in job.fds and "init" not in job.fds:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        duration = time.monotonic() - job.start
        self.jobs.discard(job)
        for kind in ("out", "err", "flags"):  # every writer is gone: read to the end
            while kind in job.fds and self._read_stream(job, kind):
                pass
        for kind in list(job.fds):
            self._close(job, kind)
        if job.workdir != "/tmp":
            shutil.rmtree(job.workdir, ignore_errors=True)
        self.free.append(job.slot)
        (stdout, cut_out), (stderr, cut_err) = job.out.text(), job.err.text()
        status, code = self._status(job)
        if job.flooded and not job.timed_out:
            stderr += f"\nOutputLimitError: more than {self.lim['stop_output_bytes']} bytes of output; stopped\n"
        self._send(job.req["id"], stdout, stderr, status, duration, cut_out or cut_err or job.flooded, code)

    def _status(self, job: _Job) -> tuple[str, int | None]:
        st = job.wait_status
        if job.timed_out:
            return "timeout", None
        if job.flooded:
            return "error", None
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            return ("timeout" if sig == signal.SIGXCPU else f"signal:{sig}"), None
        code = os.WEXITSTATUS(st)
        if b"M" in job.flags and code != 0:
            return "memory", code
        return ("ok" if code == 0 else "error"), code

    def _sweep(self) -> None:
        """Without PID namespaces: kill the orphans reparented to us (a subreaper) until none."""
        me, ours = os.getpid(), {j.pid for j in self.jobs if "pid" in j.fds}
        for _ in range(1000):
            strays = [p for p in _children_of(me) if p not in ours]
            if not strays:
                return
            for pid in strays:
                _ignore(os.killpg, pid, signal.SIGKILL)
                _ignore(os.kill, pid, signal.SIGKILL)
            for pid in strays:
                _ignore(os.waitpid, pid, 0)

    def _close(self, job: _Job, kind: str) -> None:
        fd = job.fds.pop(kind)
        self.sel.unregister(fd)
        os.close(fd)

    def _send(self, rid: int, stdout: str, stderr: str, status: str, duration: float,
              truncated: bool, exit_code: int | None) -> None:
        _write_frame(CTRL_OUT, {"id": rid, "stdout": stdout, "stderr": stderr, "status": status,
                                "duration": duration, "truncated": truncated, "exit_code": exit_code})

    def _shutdown(self) -> None:
        for job in self.jobs:
            self._kill(job)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _children_of(ppid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == ppid:
                    kids.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


def _write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _setup_isolation(cfg: dict) -> dict:
    """Enable each shared layer the kernel allows, and probe the per-execution ones in a child."""
    iso = dict(uid=False, net_ns=False, mount_ns=False, readonly_root=False, pid_ns=False, init=None)
    if os.geteuid() != 0:
        return iso
    iso["uid"] = _probe(lambda: (os.setgid(cfg["uid_base"]), os.setuid(cfg["uid_base"])))
    if not cfg["namespaces"]:
        return iso
    iso["net_ns"] = _try(lambda: unshare(CLONE_NEWNET))
    if _try(lambda: (unshare(CLONE_NEWNS), mount(None, "/", None, MS_REC | MS_PRIVATE))):
        iso["mount_ns"] = _probe(lambda: (unshare(CLONE_NEWNS), mount("tmpfs", "/tmp", "tmpfs", 0)))
        if iso["mount_ns"]:  # without per-execution tmpfs, workdirs need a writable /tmp
            _expose([p for p in (*sys.path, sys.prefix, sys.base_prefix) if os.path.isdir(p)])
            iso["readonly_root"] = _try(lambda: mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY))
    init = shutil.which("sleep", path="/usr/bin:/bin")
    if init and _try(lambda: unshare(CLONE_NEWPID)):
        own = os.open(f"/proc/{os.getpid()}/ns/pid", os.O_RDONLY)
        first = os.posix_spawn(init, ["sleep", "5"], {})
        iso["pid_ns"] = _probe(lambda: os.getpid() == 2 or os._exit(1))
        setns(own, CLONE_NEWPID)
        os.close(own)
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
        iso["init"] = init if iso["pid_ns"] else None
    return iso


def _expose(paths: list[str]) -> None:
    """Let the slot uids reach the interpreter when a parent directory is closed to them: cover
    that parent with a tmpfs that holds only bind mounts of the children on the way."""
    while True:
        blocked: dict[str, set[str]] = {}
        for path in paths:
            parts = os.path.abspath(path).split("/")
            for i in range(2, len(parts)):
                parent = "/".join(parts[:i])
                if not os.stat(parent).st_mode & 0o001:
                    blocked.setdefault(parent, set()).add(parts[i])
                    break
        if not blocked:
            return
        for parent, children in blocked.items():
            mount(parent, "/dev/shm", None, MS_BIND | MS_REC)  # stage the original
            mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            for child in children:
                os.mkdir(f"{parent}/{child}")
                mount(f"/dev/shm/{child}", f"{parent}/{child}", None, MS_BIND | MS_REC)
            umount("/dev/shm")


def _try(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


def _probe(fn) -> bool:
    """Run fn in a child; True when it returns without raising."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _try(fn) else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # Requests and results move to fds 3 and 4 (close-on-exec, so `sleep` never holds them); fd 1
    # becomes stderr so a stray print cannot corrupt the protocol. With 0-4 open, pipes are >= 5.
    os.dup2(0, CTRL_IN, inheritable=False)
    os.dup2(1, CTRL_OUT, inheritable=False)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    # Executions write through these objects, on their own fds 0-2 (each child's sys.std* are copies).
    sys.stdout.reconfigure(errors="backslashreplace")
    preloaded = []
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
            preloaded.append(name)
        except Exception:  # noqa: BLE001 - a missing optional module is reported, not fatal
            pass
    os.environ.clear()  # the client passed a minimal environment; executions inherit exactly this
    os.environ.update(USER_ENV, HOME="/tmp")
    iso = _setup_isolation(cfg)
    iso["raw_fork"] = len(os.listdir("/proc/self/task")) == 1  # one thread: see `fork`
    _try(lambda: prctl(PR_SET_NO_NEW_PRIVS, 1))  # inherited by every execution: no setuid gains
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    server = Server(cfg, iso)
    gc.collect()
    gc.freeze()  # children share the heap copy-on-write; a collection would touch every page
    iso = {k: v for k, v in iso.items() if k not in ("init", "raw_fork")}
    _write_frame(CTRL_OUT, {"ready": True, "isolation": iso, "preloaded": preloaded, "pid": os.getpid()})
    server.serve()


if __name__ == "__main__":
    main()
