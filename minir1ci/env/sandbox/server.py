"""The fork server behind `minir1ci.sandbox`: long-lived processes that fork one child per execution.

`Sandbox` runs this file as `python -I _forkserver.py CONFIG_JSON` with a minimal environment (a
clean spawn, never a fork of the trainer: no model memory, no secrets). It imports what model code
usually uses, sets up what all executions share, forks a zygote and, through it, one init per slot,
then serves length-prefixed JSON frames: requests on fd 3, results on fd 4 (its stdin and stdout, moved).

Shared, once (each layer is skipped where the kernel refuses it): a seccomp filter that refuses the
kernel-key syscalls; a private mount namespace whose root is remounted read-only (a per-mount flag:
the host's view stays writable), where a parent that hides the interpreter from other uids (/root
under pyenv or conda) is covered by a tmpfs holding only bind mounts of the interpreter's directories.

    server ─fork─> zygote: forked before the server reads any request, so it never holds one nor
                   any output; forks every slot init, first ones and respawns alike
                   └─fork─> slot init: root, pid 1 of the slot's PID namespace, own network namespace
                            (no interface up), own mount namespace with /proc and capped tmpfs on
                            /tmp (the workdir) and /dev/shm; dies with the zygote; never reads a
                            request or an output either
                            └─fork─> user (one per request): reads its own request, then gets a fresh
                                     IPC namespace, rlimits, the slot's uid, closes every descriptor
                                     but 0-2, and runs the code
                   then the init kills everything else in its namespace (kill(-1) from pid 1: setsid'd
                   grandchildren, fork bombs), reaps it all, mounts fresh tmpfs if the run left any
                   file (it counts inodes, never reads names), and reports the user's wait status.

So every execution forks from processes that never held another execution's data. The slot's
stdout and stderr pipes are read without pause, so a chatty child never stalls; they belong to the
slot's current execution, whose writers are all dead before its status arrives. The deadline and
the status are the server's alone: its clock, the init's wait status, and the output it counted.
At the deadline, or past the output ceiling, the server SIGKILLs the init (the kernel kills the
namespace) and the zygote forks a new one. Without PID namespaces, inits and zygote are child
subreapers that kill the process group, then every orphan that reaches them.
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
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections import deque

# How code runs and how its outcome reads live with the API, in sandbox.py (stdlib imports only).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minir1ci._isolation import (CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID,  # noqa: E402
                                 MNT_DETACH, MS_NODEV, MS_NOEXEC, MS_NOSUID, PR_SET_CHILD_SUBREAPER,
                                 PR_SET_DUMPABLE, PR_SET_PDEATHSIG, fork, fresh_tmp, huge_pages, libc,
                                 prctl, setup_isolation)
from minir1ci.sandbox import _Capture, run_code  # noqa: E402

del sys.path[0]  # executions should not import this checkout by accident

CTRL_IN, CTRL_OUT = 3, 4  # the server's request and result fds
REQ_FD, STATUS_FD = 3, 4  # in a slot init (0-2 are stdin, stdout, stderr)
USER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "HOME": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# ---------------------------------------------------------------- the zygote and a slot's init

def _zygote_main(sock_fd: int, server: int, cfg: dict, iso: dict) -> None:
    """Fork slot inits on the server's demand: a slot index and the init's four pipe ends arrive on
    the socket, the init's pid goes back. The previous init of that slot is reaped only then (the
    server has seen it die), so its pid cannot be reused while the server might still signal it."""
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
        pid = -1
        try:
            if iso["pid_ns"]:
                libc("unshare", CLONE_NEWPID)  # our next child is pid 1 of a fresh namespace
            pid = fork()
        finally:
            if iso["pid_ns"] and pid != 0:
                libc("setns", own_pidns, CLONE_NEWPID)  # later children: back in our namespace
        if pid == 0:
            try:
                _slot_main(slot, tuple(fds), cfg, iso)
            finally:
                os._exit(70)
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
    failed, clean = None, (0, 0)
    opts = f"size={cfg['limits']['disk_bytes']},nr_inodes=16384,mode=1777"
    try:
        if iso["net_ns"]:  # abstract unix sockets and the like reach no other slot
            libc("unshare", CLONE_NEWNET)
        if iso["mount_ns"]:  # the slot's own /tmp (the workdir) and /dev/shm, fresh after any run that wrote
            libc("unshare", CLONE_NEWNS)
            if iso["pid_ns"]:  # a /proc that shows only this namespace
                libc("mount", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            clean = _fresh_tmpfs(opts, remount=False)
    except OSError:  # every request then fails with the reason (a respawn would fail the same way)
        failed = f"sandbox set-up failed:\n{traceback.format_exc()}"
    if not iso["pid_ns"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us instead of the host's init
    poll = select.poll()
    poll.register(REQ_FD, select.POLLIN)
    while all(events & select.POLLIN for _, events in poll.poll()):  # a request waits (not read here)
        workdir = "/tmp" if iso["mount_ns"] else tempfile.mkdtemp(dir=cfg["scratch"])
        # Forked children would share one random state (`random` reseeds only after os.fork, numpy
        # never): reseed here, before the fork, so the user process touches none of those pages.
        # An int seed keeps numpy on its cheap C path. A session's seed is set in the user process.
        seed = int.from_bytes(os.urandom(4), "little")
        for name in ("random", "numpy.random"):
            if name in sys.modules:
                sys.modules[name].seed(seed)
        pid = fork()
        if pid == 0:
            _user_main(slot, cfg, iso, workdir, failed)
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
        if iso["mount_ns"] and not failed and _inodes() != clean:  # every writer is dead
            try:
                clean = _fresh_tmpfs(opts, remount=True)
            except OSError:  # retire the slot: the server reports this run as lost and respawns it
                os._exit(0)
        elif not iso["mount_ns"]:  # in a child, so that the names of its files never enter our memory
            if (cleaner := fork()) == 0:
                shutil.rmtree(workdir, ignore_errors=True)
                os._exit(0)
            os.waitpid(cleaner, 0)
        os.write(STATUS_FD, struct.pack("<i", status))
    os._exit(0)


def _fresh_tmpfs(opts: str, remount: bool) -> tuple[int, int]:
    """Mount empty tmpfs on /tmp and /dev/shm (first detaching the used ones, with everything in
    them); returns their inode counts, which differ after a run exactly when it left something."""
    if remount:
        libc("umount2", "/tmp", MNT_DETACH)
        libc("umount2", "/dev/shm", MNT_DETACH)
    fresh_tmp(opts)
    libc("mount", "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    return _inodes()


def _inodes() -> tuple[int, int]:
    used = [os.statvfs(p) for p in ("/tmp", "/dev/shm")]
    return tuple(st.f_files - st.f_ffree for st in used)


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

def _user_main(slot: int, cfg: dict, iso: dict, workdir: str, failed: str | None):
    """Read the request, set up as root (mounts, limits), drop to the slot's uid, run the code.
    Never returns."""
    try:
        req = _read_frame(REQ_FD)  # here, not in the init: the next execution forks from the init
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
    run_code(req["code"], req["prelude"])


# ---------------------------------------------------------------- the server

class _Job:
    def __init__(self, req: dict, keep: int):
        self.req = req
        self.out, self.err = _Capture(keep), _Capture(keep)
        self.start = time.monotonic()
        # The server's alone: a session's replayed blocks and the new one share one budget, so the
        # new block gets at least about `timeout` of its own, however fast the replay went.
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
        self.zygote, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = os.getpid()
        if fork() == 0:  # before any request: the zygote holds nothing of an execution
            _zygote_main(theirs.fileno(), server, cfg, iso)
        theirs.close()
        self.slots = [_Slot(i) for i in range(cfg["workers"])]
        for slot in self.slots:
            self._spawn(slot)

    def serve(self) -> None:
        while True:
            deadlines = [s.job.deadline for s in self.slots if s.job and not s.job.timed_out]
            # at most a minute per wait: epoll refuses waits beyond 2**31 ms (a long session's budget)
            wait = min(60.0, max(0.0, min(deadlines) - time.monotonic())) if deadlines else -1
            for fd, _ in self.epoll.poll(wait):
                kind, slot = self.handlers.get(fd, (None, None))
                if kind == "ctrl" and not self._read_requests():
                    return self._shutdown()
                if kind == "status":
                    self._on_status(slot)
                elif kind in ("out", "err") and slot.job is not None:
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
        """Have the zygote fork the slot's init, with four pipes: stdout, stderr, requests, status."""
        pipes = {k: os.pipe() for k in ("out", "err", "req", "status")}
        theirs = [pipes["out"][1], pipes["err"][1], pipes["req"][0], pipes["status"][1]]
        socket.send_fds(self.zygote, [struct.pack("<I", slot.index)], theirs)
        (slot.pid,) = struct.unpack("<i", self.zygote.recv(4))
        for fd in theirs:
            os.close(fd)
        slot.req_w = pipes.pop("req")[1]
        for kind, (r, _) in pipes.items():
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
            for kind in ("out", "err"):  # every writer is dead: read what they wrote
                while self._read_stream(slot, kind):
                    pass
            self._finish(slot.job, status)
            slot.job = None
        if status is None:  # EOF: the init died (killed at a deadline or for output, or crashed)
            for fd in (slot.req_w, *slot.fds.values()):
                self.handlers.pop(fd, None)
                os.close(fd)
            slot.fds = {}
            self._spawn(slot)  # the zygote reaps the dead init first

    def _finish(self, job: _Job, st: int | None) -> None:
        """Raw facts only; `sandbox._result` turns them into a status and texts."""
        _write_frame(CTRL_OUT, {"id": job.req["id"], "out": job.out.parts(), "err": job.err.parts(),
                                "wait_status": st, "timed_out": job.timed_out, "flooded": job.flooded,
                                "duration": time.monotonic() - job.start})

    def _shutdown(self) -> None:
        for slot in self.slots:
            _ignore(os.kill, slot.pid, signal.SIGKILL)
        self.zygote.close()
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
    # Not dumpable (nor the zygote and inits, which inherit it): without a uid change or a PID
    # namespace, code of the same uid could otherwise open /proc/PID/fd or /proc/PID/mem of them.
    prctl(PR_SET_DUMPABLE, 0)
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
