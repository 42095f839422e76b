"""The fork server behind `minir1ci.sandbox`: long-lived processes that fork one child per execution.

`Sandbox` runs this file as `python -I _forkserver.py CONFIG_JSON` with a minimal environment (a
clean spawn, never a fork of the trainer: no model memory, no secrets). It imports what model code
usually uses, sets up what all executions share, forks one init per slot, then serves
length-prefixed JSON frames: requests on fd 3, results on fd 4 (its stdin and stdout, moved).

Shared, once (each layer is skipped where the kernel refuses it): a network namespace with no
interface up; a private mount namespace whose root is remounted read-only (a per-mount flag: the
host's view stays writable), where a parent that hides the interpreter from other uids (/root under
pyenv or conda) is covered by a tmpfs holding only bind mounts of the interpreter's directories.

    server ─fork─> slot init: root, pid 1 of the slot's PID namespace, own mount namespace with /proc
                   and capped tmpfs on /tmp (the workdir) and /dev/shm; dies with the server
                   └─fork─> user (one per request): fresh IPC namespace, rlimits, the slot's uid; runs
                            the code
                   then the init kills everything else in its namespace (kill(-1) from pid 1: setsid'd
                   grandchildren, fork bombs), reaps it all, empties /tmp and /dev/shm, and reports the
                   user's wait status. (A mount namespace and two tmpfs per execution cost 0.5-0.9 ms
                   of CPU each time; emptying them costs a directory scan.)

The slot's stdout, stderr and flags (MemoryError, end of a session replay) pipes are read without
pause, so a chatty child never stalls; they belong to the slot's current execution, whose writers
are all dead before its status arrives. At the deadline, or past the output ceiling, the server
SIGKILLs the init (the kernel kills the namespace) and forks a new one. Forking executions from the
inits keeps the server's own pages from being write-protected by every fork. Without PID namespaces,
inits and server are child subreapers that kill the process group, then every orphan that reaches them.
Simplified: one uid per slot (`uid_base + slot`), so RLIMIT_NPROC bounds each execution alone.
"""
from __future__ import annotations

import gc
import importlib
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import deque

# How code runs and how its outcome reads live with the API, in sandbox.py (stdlib imports only).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minir1ci._isolation import (CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, MS_NODEV, MS_NOEXEC,  # noqa: E402
                                 MS_NOSUID, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG,
                                 fork, fresh_tmp, huge_pages, libc, prctl, setup_isolation, try_call)
from minir1ci.sandbox import _Capture, run_code  # noqa: E402

del sys.path[0]  # executions should not import this checkout by accident

CTRL_IN, CTRL_OUT = 3, 4  # the server's request and result fds
FLAGS_FD, REQ_FD, STATUS_FD = 3, 4, 5  # in a slot init (0-2 are stdin, stdout, stderr)
USER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "HOME": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# ---------------------------------------------------------------- a slot's init (forked once)

def _slot_main(slot: int, fds: tuple[int, ...], cfg: dict, iso: dict) -> None:
    """Pid 1 of the slot's namespace: per request, fork the user process, then clean up after it."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: so does the namespace
    null = os.open(os.devnull, os.O_RDWR)
    for src, dst in zip((null, *fds), range(6)):  # sources are >= 5: the server keeps 0-4 open
        os.dup2(src, dst)
    os.closerange(6, os.sysconf("SC_OPEN_MAX"))
    os.setsid()
    keep: list[str] = []
    failed = None
    try:
        if iso["mount_ns"]:  # the slot's own /tmp (the workdir) and /dev/shm, emptied after each run
            libc("unshare", CLONE_NEWNS)
            if iso["pid_ns"]:  # a /proc that shows only this namespace
                libc("mount", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            opts = f"size={cfg['limits']['disk_bytes']},nr_inodes=16384,mode=1777"
            keep = fresh_tmp(opts)
            libc("mount", "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    except OSError:  # every request then fails with the reason (a respawn would fail the same way)
        failed = f"sandbox set-up failed:\n{traceback.format_exc()}".encode()
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us instead of the host's init
    while (req := _read_frame(REQ_FD)) is not None:
        if failed:
            os.write(2, failed)
            os.write(STATUS_FD, struct.pack("<i", 71 << 8))  # exit code 71, as a failed user set-up
            continue
        workdir = "/tmp" if iso["mount_ns"] else tempfile.mkdtemp(dir=cfg["scratch"])
        # Forked children would share one random state (`random` reseeds only after os.fork, numpy
        # never): reseed here, before the fork, so the user process touches none of those pages.
        # An int seed keeps numpy on its cheap C path: 32 bits of OS entropy, or the session's.
        seed = int.from_bytes(os.urandom(4), "little") if req["seed"] is None else req["seed"] % 2**32
        for name in ("random", "numpy.random"):
            if name in sys.modules:
                sys.modules[name].seed(seed)
        pid = fork()
        if pid == 0:
            _user_main(req, slot, cfg, iso, workdir)
        _, status = os.waitpid(pid, 0)
        if iso["pid_ns"]:
            _ignore(os.kill, -1, signal.SIGKILL)  # from pid 1: every other process of the namespace
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break
        else:
            _ignore(os.killpg, pid, signal.SIGKILL)
            _sweep(set())
        if iso["mount_ns"]:  # every writer is dead: nothing of this run reaches the next one
            try:
                clean = _empty("/tmp", keep) and _empty("/dev/shm", [])
            except BaseException:  # noqa: BLE001 - e.g. RecursionError on a very deep tree
                clean = False
            if not clean:  # retire the slot: the server reports this run as lost, then mounts new tmpfs
                os._exit(0)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        os.write(STATUS_FD, struct.pack("<i", status))
    os._exit(0)


def _empty(root: str, keep: list[str]) -> bool:
    """Delete everything in `root` but the directories leading to the bind mounts in `keep`
    (root-owned, mode 755: an execution cannot write there). False if anything else is left."""
    def kept(path: str) -> bool:
        return any(k == path or k.startswith(path + "/") for k in keep)
    with os.scandir(root) as entries:
        for entry in entries:
            if kept(entry.path):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _ignore(os.unlink, entry.path)
    return all(kept(os.path.join(root, name)) for name in os.listdir(root))


def _sweep(keep: set[int]) -> None:
    """Kill our children except `keep`, and the orphans that reach us (a subreaper) as they die."""
    for _ in range(1000):
        strays = [pid for pid in _children() if pid not in keep]
        for pid in strays:
            _ignore(os.killpg, pid, signal.SIGKILL)
            _ignore(os.kill, pid, signal.SIGKILL)
        for pid in strays:
            _ignore(os.waitpid, pid, 0)
        if not strays:
            return


def _children() -> list[int]:
    kids, me = [], os.getpid()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:  # field 4, after the ")" of the name
                kids += [int(name)] if int(f.read().rsplit(b")", 1)[1].split()[1]) == me else []
        except OSError:
            pass
    return kids


# ---------------------------------------------------------------- the user process (one per execution)

def _user_main(req: dict, slot: int, cfg: dict, iso: dict, workdir: str):
    """Set up as root (mounts, limits), drop to the slot's uid, run the code. Never returns."""
    try:
        os.closerange(REQ_FD, os.sysconf("SC_OPEN_MAX"))  # the init's request and status pipes
        os.setsid()  # kill(0, sig) reaches only this process group
        if not iso["pid_ns"]:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no namespace to take us along
        if iso["mount_ns"]:  # SysV IPC objects and POSIX queues die with us; so do the mount changes
            # of code still running as root (no uid to drop to), which could otherwise outlive it
            libc("unshare", CLONE_NEWIPC | (0 if iso["uid"] else CLONE_NEWNS))
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
    run_code(req["code"], req["prelude"], FLAGS_FD)


# ---------------------------------------------------------------- the server

class _Job:
    def __init__(self, req: dict, keep: int):
        self.req, self.flags = req, b""
        self.out, self.err = _Capture(keep), _Capture(keep)
        self.start = time.monotonic()
        self.deadline = self.start + req["timeout"] * (1 + len(req["prelude"]))
        self.timed_out = self.flooded = False


class _Slot:
    def __init__(self, index: int):
        self.index, self.pid, self.req_w, self.fds, self.job = index, 0, -1, {}, None


class Server:
    def __init__(self, cfg: dict, iso: dict):
        self.cfg, self.iso, self.lim = cfg, iso, cfg["limits"]
        self.epoll, self.handlers = select.epoll(), {CTRL_IN: ("ctrl", None)}  # fd -> (kind, slot)
        self.epoll.register(CTRL_IN, select.EPOLLIN)
        self.inbuf, self.queue = bytearray(), deque()
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if iso["pid_ns"] else -1
        self.slots = [_Slot(i) for i in range(cfg["workers"])]
        for slot in self.slots:
            self._spawn(slot)

    def serve(self) -> None:
        while True:
            deadlines = [s.job.deadline for s in self.slots if s.job and not s.job.timed_out]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else -1
            for fd, _ in self.epoll.poll(wait):
                kind, slot = self.handlers.get(fd, (None, None))
                if kind == "ctrl" and not self._read_requests():
                    return self._shutdown()
                if kind == "status":
                    self._on_status(slot)
                elif kind in ("out", "err", "flags") and slot.job is not None:
                    self._read_stream(slot, kind)
            now = time.monotonic()
            for slot in self.slots:
                if slot.job and not slot.job.timed_out and now >= slot.job.deadline:
                    slot.job.timed_out = True
                    _ignore(os.kill, slot.pid, signal.SIGKILL)  # the namespace goes with its init
            for slot in self.slots:
                if self.queue and slot.job is None:
                    self._dispatch(slot, self.queue.popleft())

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

    def _spawn(self, slot: _Slot) -> None:
        """Fork the slot's init, in a fresh PID namespace where allowed, with its five pipes."""
        pipes = {k: os.pipe() for k in ("out", "err", "flags", "req", "status")}
        pid = -1
        try:
            if self.iso["pid_ns"]:
                libc("unshare", CLONE_NEWPID)  # our next child is pid 1 of a fresh namespace
            pid = fork()
        finally:
            if self.iso["pid_ns"] and pid != 0:
                libc("setns", self.own_pidns, CLONE_NEWPID)  # later children: back in our namespace
        if pid == 0:
            try:
                ends = [pipes[k][1] for k in ("out", "err", "flags")] + [pipes["req"][0], pipes["status"][1]]
                _slot_main(slot.index, tuple(ends), self.cfg, self.iso)
            finally:
                os._exit(70)
        slot.pid, slot.req_w = pid, pipes.pop("req")[1]
        for kind, (r, w) in pipes.items():
            os.close(w)
            os.set_blocking(r, False)
            slot.fds[kind], self.handlers[r] = r, (kind, slot)
            self.epoll.register(r, select.EPOLLIN)

    def _dispatch(self, slot: _Slot, req: dict) -> None:
        slot.job = _Job(req, self.lim["output_bytes"])
        try:
            _write_frame(slot.req_w, req)
        except BrokenPipeError:  # the init is gone: its status pipe reports it
            _ignore(os.kill, slot.pid, signal.SIGKILL)

    def _read_stream(self, slot: _Slot, kind: str) -> bool:
        """Read once into the slot's current job; False when nothing is available (or at EOF)."""
        job = slot.job
        try:
            data = os.read(slot.fds[kind], 1 << 16)
        except BlockingIOError:
            return False
        if not data:
            return False  # the init died; its status pipe reports it
        if kind == "flags":
            if b"P" in data and b"P" not in job.flags:  # prelude replayed: the block's own deadline
                job.deadline = time.monotonic() + job.req["timeout"]
            job.flags += data[:64]
        else:
            (job.out if kind == "out" else job.err).add(data)
            if job.out.total + job.err.total > self.lim["stop_output_bytes"] and not job.flooded:
                job.flooded = True
                _ignore(os.kill, slot.pid, signal.SIGKILL)
        return True

    def _on_status(self, slot: _Slot) -> None:
        try:
            data = os.read(slot.fds["status"], 64)
        except BlockingIOError:  # a stale event for a reused fd number (a respawn in this batch)
            return
        status = struct.unpack("<i", data[:4])[0] if len(data) >= 4 else None
        if slot.job is not None:
            for kind in ("out", "err", "flags"):  # every writer is dead: read what they wrote
                while self._read_stream(slot, kind):
                    pass
            self._finish(slot.job, status)
            slot.job = None
        if status is None:  # EOF: the init died (killed at a deadline or for output, or crashed)
            os.waitpid(slot.pid, 0)
            for fd in (slot.req_w, *slot.fds.values()):
                self.handlers.pop(fd, None)
                os.close(fd)
            slot.fds = {}
            if not self.iso["pid_ns"]:  # its user process and theirs are now our orphans
                _sweep({s.pid for s in self.slots if s is not slot})
            self._spawn(slot)

    def _finish(self, job: _Job, st: int | None) -> None:
        """Raw facts only; `sandbox._result` turns them into a status and texts."""
        _write_frame(CTRL_OUT, {"id": job.req["id"], "out": job.out.parts(), "err": job.err.parts(),
                                "wait_status": st, "memory_error": b"M" in job.flags,
                                "timed_out": job.timed_out, "flooded": job.flooded,
                                "duration": time.monotonic() - job.start})

    def _shutdown(self) -> None:
        for slot in self.slots:
            _ignore(os.kill, slot.pid, signal.SIGKILL)
        if self.cfg["scratch"]:
            shutil.rmtree(self.cfg["scratch"], ignore_errors=True)


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


def _read_frame(fd: int) -> dict | None:
    """Blocking read of one length-prefixed JSON frame; None at EOF."""
    buf, need = b"", 4
    while len(buf) < need:
        chunk = os.read(fd, need - len(buf))
        if not chunk:
            return None
        buf += chunk
        if len(buf) == 4 == need:
            buf, need = b"", struct.unpack(">I", buf)[0]
    return json.loads(buf)


def _write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # BLAS pools must be single-threaded before numpy is imported: fork copies only the calling
    # thread, and a pool of one never starts another.
    os.environ.update({k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    # Requests and results move to fds 3 and 4; fd 1 becomes stderr so that a stray print cannot
    # corrupt the protocol. With 0-4 always open, every pipe the server makes is >= 5.
    os.dup2(0, CTRL_IN, inheritable=False)
    os.dup2(1, CTRL_OUT, inheritable=False)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdout.reconfigure(errors="backslashreplace")  # executions print through copies of these
    preloaded = []
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
            preloaded.append(name)
        except Exception:  # noqa: BLE001 - a missing optional module is reported, not fatal
            pass
    os.environ.clear()  # the client passed a minimal environment; executions inherit exactly this
    os.environ.update(USER_ENV)
    iso = setup_isolation(cfg)
    if len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the fork server must be single-threaded (see `fork`)")
    try_call(lambda: prctl(PR_SET_NO_NEW_PRIVS, 1))  # inherited by every execution: no setuid gains
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # a dead init's orphans come to us (see `_on_status`)
    cfg["scratch"] = None
    if not iso["mount_ns"]:
        cfg["scratch"] = tempfile.mkdtemp(prefix="minir1ci-sandbox-")
        os.chmod(cfg["scratch"], 0o711)  # slot uids may enter their own workdir, not list others
    gc.collect()
    gc.freeze()  # executions share the heap copy-on-write; a collection would touch every page
    huge_pages()
    server = Server(cfg, iso)
    _write_frame(CTRL_OUT, {"ready": True, "isolation": iso, "preloaded": preloaded, "pid": os.getpid()})
    server.serve()


if __name__ == "__main__":
    main()
