"""The sandbox's fork server, run by `Sandbox` (client.py) as `python -I server.py CONFIG_JSON`.

It preloads modules, sets up the shared isolation layers (isolation.py), forks a zygote and through it
one init per slot (child.py), then serves length-prefixed JSON frames: requests on fd 3, results on
fd 4. Two images: the preloaded standard-library modules, then with the others (numpy, sympy) too, each
with its zygote and an init per slot. An execution forks from the smaller image unless its text imports
a module from outside the standard library (`image_of`): a fork, its exit and its copy-on-write faults
cost in proportion to the image (about half the CPU for a small program). A hidden import still works
from there, at the cost of importing the module afresh. Each slot's stdout and stderr are read without
pause; the deadline, the output count and the wait status are the server's alone. At the deadline or
past the output ceiling it SIGKILLs the slot's init (the kernel kills the namespace) and its zygote
forks a new one.
Simplified: one uid per slot (`uid_base + slot`), so RLIMIT_NPROC bounds each execution alone.
"""
from __future__ import annotations

import gc
import importlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from minir1ci.env.sandbox.child import CTRL_IN, CTRL_OUT, ignore, zygote_main  # noqa: E402
from minir1ci.env.sandbox.isolation import PR_SET_DUMPABLE, fork, huge_pages, prctl, setup_isolation  # noqa: E402
from minir1ci.env.sandbox.protocol import STATUS, USER_ENV, pop_frames, write_frame  # noqa: E402

del sys.path[0]  # executions should not import this checkout by accident


class _Capture:
    """Keeps the first and the last `keep // 2` bytes of a stream and counts the rest."""

    def __init__(self, keep: int):
        self.half, self.head, self.tail, self.total = keep // 2, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = max(0, self.half - len(self.head))
        self.head += data[:room]
        self.tail += data[room:]
        del self.tail[:max(0, len(self.tail) - self.half)]

    def parts(self) -> tuple[str, str, int]:  # head, tail, bytes omitted between them
        omitted = self.total - len(self.head) - len(self.tail)
        return self.head.decode("utf-8", "replace"), self.tail.decode("utf-8", "replace"), omitted


class _Job:
    def __init__(self, req: dict, keep: int):
        self.req = req
        self.out, self.err = _Capture(keep), _Capture(keep)
        self.start = time.monotonic()
        # one budget for a session's replay and new block: the new one gets about `timeout` at least
        budget = req["timeout"] * (1 + len(req["prelude"]))
        self.deadline = self.start + budget
        req["cpu_s"] = math.ceil(budget) + 1  # RLIMIT_CPU's soft limit (hard: one more), set by the execution
        self.timed_out = self.flooded = False


_IMPORT = re.compile(r"\bfrom\s+([\w.]+)\s+import\b"                                  # from M import ...
                     r"|\bimport\s+([\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*)")   # import M [as x], ...


def stdlib(module: str) -> bool:
    top = module.split(".")[0]
    return not top or top in sys.stdlib_module_names   # "": a relative import


def image_of(req: dict, names: re.Pattern) -> int:
    """1 (the full image) for a session (its replay seeds numpy as before) and for code that imports a
    module outside the standard library or names one of the full image's modules or a dynamic import
    (`names`, words); else 0. Read from the text, comments and strings too: it errs towards the full image."""
    code = req["code"] if isinstance(req["code"], str) else ""   # not text: the execution reports it
    if req["seed"] is not None or names.search(code):
        return 1
    for m in _IMPORT.finditer(code):
        for name in [m[1]] if m[1] else [part.split()[0] for part in m[2].split(",")]:
            if not stdlib(name):
                return 1
    return 0


class _Slot:
    def __init__(self, index: int, image: int):
        self.index, self.image, self.pid, self.req_w, self.fds, self.job = index, image, 0, -1, {}, None


class Server:
    def __init__(self, cfg: dict, iso: dict, extra: list[str]):
        """A zygote of the modules imported so far, then, with `extra` (the preloaded modules outside the
        standard library) imported, a second one; both before any request, so that no zygote holds
        anything of an execution."""
        self.cfg, self.lim = cfg, cfg["limits"]
        self.epoll, self.handlers = select.epoll(), {CTRL_IN: ("ctrl", None)}  # fd -> (kind, slot)
        self.epoll.register(CTRL_IN, select.EPOLLIN)
        self.inbuf, self.queue = bytearray(), deque()
        self.zygotes = [self._fork_zygote(iso)]
        if extra:
            preload(extra)
            self.zygotes.append(self._fork_zygote(iso))
        words = sorted({name.split(".")[0] for name in extra} | {"__import__", "importlib"})
        self.names = re.compile(r"\b(?:%s)\b" % "|".join(words))   # in code: the full image
        self.slots = [_Slot(i, image) for i in range(cfg["workers"]) for image in range(len(self.zygotes))]
        for slot in self.slots:
            self._spawn(slot)

    def _fork_zygote(self, iso: dict) -> socket.socket:
        if len(os.listdir("/proc/self/task")) != 1:
            raise RuntimeError("the fork server must be single-threaded (see `fork`)")
        gc.collect()
        gc.freeze()  # executions share the heap copy-on-write; a collection would touch every page
        huge_pages()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = os.getpid()
        if fork() == 0:
            try:
                zygote_main(theirs.fileno(), server, self.cfg, iso)
            finally:
                os._exit(70)  # never back into the server's code
        theirs.close()
        return ours

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
            busy = {slot.index for slot in self.slots if slot.job}   # one execution per slot (its uid) at a time
            for index in [i for i in range(self.cfg["workers"]) if i not in busy][:len(self.queue)]:
                req = self.queue.popleft()
                self._dispatch(next(s for s in self.slots if (s.index, s.image) == (index, req["image"])), req)

    def _read_requests(self) -> bool:
        data = os.read(CTRL_IN, 1 << 16)
        if not data:
            return False
        self.inbuf += data
        for req in pop_frames(self.inbuf):
            req["image"] = image_of(req, self.names) if len(self.zygotes) > 1 else 0
            self.queue.append(req)
        return True

    def _spawn(self, slot: _Slot) -> None:
        """Have the zygote fork the slot's init, with four pipes: stdout, stderr, requests, status."""
        pipes = {k: os.pipe() for k in ("out", "err", "req", "status")}
        theirs = [pipes["out"][1], pipes["err"][1], pipes["req"][0], pipes["status"][1]]
        zygote = self.zygotes[slot.image]
        socket.send_fds(zygote, [struct.pack("<I", slot.index)], theirs)
        (slot.pid,) = struct.unpack("<i", zygote.recv(4))
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
        status, cpu = STATUS.unpack(data[:STATUS.size]) if len(data) >= STATUS.size else (None, 0.0)
        if (job := slot.job) is not None:
            for kind in ("out", "err"):  # every writer is dead: read what they wrote
                while self._read_stream(slot, kind):
                    pass
            # raw facts only: the client's `_result` turns them into a status and texts
            write_frame(CTRL_OUT, {"id": job.req["id"], "out": job.out.parts(), "err": job.err.parts(),
                                   "wait_status": status, "cpu": [cpu, job.req["cpu_s"]],
                                   "timed_out": job.timed_out, "flooded": job.flooded,
                                   "duration": time.monotonic() - job.start})
            slot.job = None
        if status is None:  # EOF: the init died (killed at a deadline or for output, or crashed)
            for fd in (slot.req_w, *slot.fds.values()):
                self.handlers.pop(fd, None)
                os.close(fd)
            slot.fds = {}
            self._spawn(slot)  # the zygote reaps the dead init first

    def _shutdown(self) -> None:
        for slot in self.slots:
            ignore(os.kill, slot.pid, signal.SIGKILL)
        for zygote in self.zygotes:
            zygote.close()
        if self.cfg["scratch"]:
            shutil.rmtree(self.cfg["scratch"], ignore_errors=True)


def preload(names: list[str]) -> None:
    for name in names:
        with suppress(Exception):  # a missing optional module is not fatal
            importlib.import_module(name)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # Requests and results move to fds 3 and 4; fd 1 becomes stderr so that a stray print cannot
    # corrupt the protocol. With 0-4 always open, every pipe the server makes is >= 5.
    os.dup2(0, CTRL_IN, inheritable=False)
    os.dup2(1, CTRL_OUT, inheritable=False)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdout.reconfigure(errors="backslashreplace")  # executions print through copies of these
    preload([name for name in cfg["preload"] if stdlib(name)])   # the others: in Server, for the second image
    os.environ.clear()  # the client passed USER_ENV (BLAS pools of one); executions inherit exactly it
    os.environ.update(USER_ENV)
    iso = setup_isolation(cfg)
    # Not dumpable (nor the zygote and inits, which inherit it): without a uid change or a PID
    # namespace, code of the same uid could otherwise open /proc/PID/fd or /proc/PID/mem of them.
    prctl(PR_SET_DUMPABLE, 0)
    cfg["scratch"] = None
    if not iso["mount_ns"]:
        cfg["scratch"] = tempfile.mkdtemp(prefix="minir1ci-sandbox-")
        os.chmod(cfg["scratch"], 0o711)  # slot uids may enter their own workdir, not list others
    server = Server(cfg, iso, [name for name in cfg["preload"] if not stdlib(name)])
    write_frame(CTRL_OUT, {"isolation": iso})
    server.serve()


if __name__ == "__main__":
    main()
