"""The sandbox's fork server: a long-lived process that forks one execution per request.

`Sandbox` (client.py) runs this file as `python -I server.py CONFIG_JSON` with a minimal environment
(a clean spawn, never a fork of the trainer: no model memory, no secrets). It imports what model code
usually uses, sets up what all executions share, forks a zygote and, through it, one init per slot
(child.py), then serves length-prefixed JSON frames: requests on fd 3, results on fd 4.

Shared, once (each layer is skipped where the kernel refuses it): a seccomp filter that refuses the
kernel-key syscalls; a private mount namespace whose root is remounted read-only (a per-mount flag:
the host's view stays writable), where a parent that hides the interpreter from other uids (/root
under pyenv or conda) is covered by a tmpfs holding only bind mounts of the interpreter's directories.

The slot's stdout and stderr pipes are read without pause, so a chatty child never stalls; they
belong to the slot's current execution, whose writers are all dead before its status arrives. The
deadline and the status are the server's alone: its clock, the init's wait status, and the output
it counted. At the deadline, or past the output ceiling, the server SIGKILLs the init (the kernel
kills the namespace) and the zygote forks a new one.
Simplified: one uid per slot (`uid_base + slot`), so RLIMIT_NPROC bounds each execution alone.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from minir1ci.env.sandbox.child import (CTRL_IN, CTRL_OUT, USER_ENV, ignore, write_frame,  # noqa: E402
                                        zygote_main)
from minir1ci.env.sandbox.isolation import PR_SET_DUMPABLE, fork, huge_pages, prctl, setup_isolation  # noqa: E402

del sys.path[0]  # executions should not import this checkout by accident


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

    def parts(self) -> tuple[str, str, int]:
        """(head, tail, bytes omitted between them)."""
        omitted = self.total - len(self.head) - len(self.tail)
        return self.head.decode("utf-8", "replace"), self.tail.decode("utf-8", "replace"), omitted



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
            zygote_main(theirs.fileno(), server, cfg, iso)
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
                    ignore(os.kill, slot.pid, signal.SIGKILL)  # the namespace goes with its init
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
            write_frame(slot.req_w, req)
        except BrokenPipeError:  # the init is gone: its status pipe reports it
            ignore(os.kill, slot.pid, signal.SIGKILL)

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
            ignore(os.kill, slot.pid, signal.SIGKILL)
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
        write_frame(CTRL_OUT, {"id": job.req["id"], "out": job.out.parts(), "err": job.err.parts(),
                                "wait_status": st, "timed_out": job.timed_out, "flooded": job.flooded,
                                "duration": time.monotonic() - job.start})

    def _shutdown(self) -> None:
        for slot in self.slots:
            ignore(os.kill, slot.pid, signal.SIGKILL)
        self.zygote.close()
        if self.cfg["scratch"]:
            shutil.rmtree(self.cfg["scratch"], ignore_errors=True)


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
    write_frame(CTRL_OUT, {"ready": True, "isolation": iso, "preloaded": preloaded, "pid": os.getpid()})
    server.serve()


if __name__ == "__main__":
    main()
