"""Run model-written Python safely enough for RL rollouts: a fork server with per-execution limits.

    with Sandbox(timeout=10) as sb:
        r = sb.run("import numpy as np\\nprint(np.arange(4).sum())")   # ExecResult(stdout='6\\n', status='ok', ...)
        rs = sb.run_many(codes)                                        # all cores busy, results in input order

`Sandbox` spawns `server.py` (`python -I`, not a fork of the trainer), which preloads numpy, sympy and the
like; each execution forks from it (a few ms of CPU instead of 0.8 s) and runs the code as `python -c`
would, ending with `os._exit` once it returns. Code whose text imports only the standard library forks
from an image without numpy and sympy (server.py), for about 30% less CPU per execution. Stateless by
default, as in R1-Code-Interpreter; `session_id=` replays the session's earlier "ok"/"error" blocks
silently before the new one, with a fixed per-session seed and one deadline of `timeout` per block.

Threat model (as root on Linux; `Sandbox.isolation` lists the layers the kernel allowed). Per execution:
processes all killed and reaped before the result, a deadline on the server's clock, RLIMIT_CPU, AS (per
process), FSIZE and NOFILE, output caps, an IPC namespace, fds 0-2 only, new tmpfs on /tmp and /dev/shm
(mounted as its request arrives), pids numbered from 2 (the slot's counter restarts), first to go when memory
runs out (oom_score_adj 1000), forked from processes that never held another execution's data. Per slot: uid
`uid_base + slot` (no capabilities, no_new_privs, RLIMIT_NPROC), a PID namespace and its /proc (hiding the
slot's init, whose counters sum its executions), a network namespace with no interface up. Per sandbox: a
read-only root showing only the system's directories and the interpreter's (not the project, its task data and
answers, or home directories), no ptys (the host's devpts numbers all of them), a minimal environment, a
seccomp filter refusing the key syscalls (keyrings outlive processes), new user namespaces, bpf, perf events,
userfaultfd, io_uring, inotify, fanotify and dnotify (they report reads of shared files) and sockets other
than AF_UNIX, under which file locks succeed and lock nothing (a lock on a shared inode signals other slots
and the host), a uid range no other sandbox on the host holds. Not covered (this is not a VM): the host
kernel, and its host-wide state, through which concurrent executions can still signal each other (CPU, memory
and timing, the page cache, the load and memory figures in /proc, inode-number counters, futexes on pages of
shared files); world-readable files in the system's directories; memory beyond one process (a memory cgroup
per slot would bound it); "memory" is read from stderr, so code can claim it. Without root or namespaces: no
uid change, a process-group kill and orphan sweep instead of a PID namespace, no network isolation, no hidden
files, workdirs in the host's /tmp; off x86_64/aarch64, no seccomp filter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, wait
from contextlib import suppress
from dataclasses import dataclass
from typing import Sequence

from minir1ci.env.sandbox.protocol import USER_ENV, read_frame, write_frame

DEFAULT_PRELOAD = ("math", "itertools", "collections", "re", "json", "fractions", "decimal", "datetime",
                   "random", "statistics", "functools", "heapq", "string", "numpy", "numpy.random", "sympy")
MAX_TIMEOUT = 86400.0  # seconds; a session's budget (one timeout per block) may exceed it
# Listed unused by systemd: above its container range, below its "foreign" range and 2**31 (signed readers).
UID_RANGE = (0x70000000, 0x7FFE0000)
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")


@dataclass(frozen=True)
class Limits:
    """Per-execution limits. Defaults leave numpy + sympy room: the server maps about 140 MB."""
    timeout: float = 10.0  # seconds of wall clock
    memory_bytes: int = 2 << 30  # RLIMIT_AS, per process
    output_bytes: int = 64 << 10  # kept per stream: first half + last half
    stop_output_bytes: int = 8 << 20  # both streams together; past this the execution is stopped
    file_bytes: int = 64 << 20  # RLIMIT_FSIZE
    disk_bytes: int = 128 << 20  # size of each slot tmpfs (/tmp, /dev/shm), mounted anew after a run that wrote
    open_files: int = 256  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC (threads count), per slot uid

    def __post_init__(self):
        _check_timeout(self.timeout)
        for name in (f.name for f in dataclasses.fields(self) if f.name != "timeout"):
            if type(getattr(self, name)) is not int or getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {getattr(self, name)!r}")


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")
    return float(timeout)


@dataclass
class ExecResult:
    """`status` "memory": exit code 1 with a MemoryError last in stderr; "timeout": the server's deadline or
    RLIMIT_CPU reached (a SIGXCPU the code sends itself is "signal:24", as `python -c` shows).
    `truncated`: output was cut around "[... N bytes omitted ...]", or stopped past `stop_output_bytes`."""
    stdout: str
    stderr: str
    status: str  # "ok" | "error" | "timeout" | "memory" | "signal:N"
    duration: float  # seconds from dispatch to the end of cleanup, measured by the server
    truncated: bool = False
    exit_code: int | None = None  # None when killed or timed out

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Sandbox:
    """A lazily started fork server; thread-safe. `limits` per execution (`timeout=` overrides its
    timeout); `workers` concurrent executions (default: the CPU count); `preload` modules imported
    once by the server; `namespaces=False` forces the fallback; slot i runs as uid `uid_base + i`
    (default: a free random range; a range another sandbox holds is refused)."""

    def __init__(self, limits: Limits | None = None, *, timeout: float | None = None,
                 workers: int | None = None, preload: Sequence[str] = DEFAULT_PRELOAD,
                 namespaces: bool = True, uid_base: int | None = None, python: str = sys.executable):
        limits = limits or Limits()
        self.limits = dataclasses.replace(limits, timeout=timeout) if timeout is not None else limits
        self.workers = workers or os.cpu_count() or 1
        if type(self.workers) is not int or self.workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if uid_base is not None and (type(uid_base) is not int or not 0 < uid_base <= 2**31 - self.workers):
            raise ValueError(f"uid_base must be an int in [1, 2**31 - workers], got {uid_base!r}")  # 0: root
        uid_base, self._uid_claims = _claim_uids(uid_base, self.workers)
        self._config = {"limits": dataclasses.asdict(self.limits), "workers": self.workers,
                        "preload": list(preload), "namespaces": namespaces, "uid_base": uid_base}
        self._python = python
        self._lock, self._write_lock = threading.Lock(), threading.Lock()
        self._progress = 0.0  # time of the server's last message
        self._proc: subprocess.Popen | None = None
        self._hello: dict = {}
        self._pending: dict[int, tuple[dict, Future, int, subprocess.Popen]] = {}  # id -> req, fut, attempt, server
        self._next_id = 0
        self._sessions: dict[str, tuple[list[str], int]] = {}  # id -> (blocks kept, seed)

    def run(self, code: str, timeout: float | None = None, session_id: str | None = None) -> ExecResult:
        return self.run_many([code], timeout, None if session_id is None else [session_id])[0]

    def run_many(self, codes: Sequence[str], timeout: float | None = None,
                 session_ids: Sequence[str | None] | None = None) -> list[ExecResult]:
        """Execute all codes concurrently (`workers` at a time); results in input order. A session id
        may appear several times: its blocks then run one after the other, in order."""
        sids = list(session_ids) if session_ids is not None else [None] * len(codes)
        assert len(sids) == len(codes), "one session id (or None) per code"
        results: list[ExecResult | None] = [None] * len(codes)
        todo = list(range(len(codes)))
        while todo:  # waves: each session at most once per wave, so a block sees its predecessors
            wave, seen, later = [], set(), []
            for i in todo:
                (later if sids[i] is not None and sids[i] in seen else wave).append(i)
                seen.add(sids[i])
            futures = [self._submit(codes[i], timeout, sids[i]) for i in wave]
            for i, fut in zip(wave, futures):
                results[i] = self._collect(codes[i], sids[i], fut)
            todo = later
        return results  # type: ignore[return-value]

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    @property
    def isolation(self) -> dict:
        """Which layers the kernel allowed: uid, net_ns, mount_ns, hidden_files, readonly_root, pid_ns, seccomp."""
        with self._lock:
            self._ensure_server()
        return dict(self._hello["isolation"])

    @property
    def server_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            lost, self._pending = list(self._pending.values()), {}
            claims, self._uid_claims = self._uid_claims, []
        for sock in claims:  # the uids are free for other sandboxes; a later `run` claims them again
            sock.close()
        if proc is not None:  # closing its stdin makes the server kill its executions and exit
            with self._write_lock, suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, fut, _, _ in lost:
            fut.set_result(ExecResult("", "sandbox: closed during this execution\n", "error", 0.0))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, code: str, timeout: float | None, session_id: str | None) -> Future:
        timeout = self.limits.timeout if timeout is None else _check_timeout(timeout)
        req = {"code": code, "timeout": timeout, "prelude": [], "seed": None}
        if session_id is not None:
            with self._lock:
                blocks, seed = self._sessions.setdefault(session_id, ([], random.getrandbits(31)))
                req.update(prelude=list(blocks), seed=seed)
        fut: Future = Future()
        self._send(req, fut, attempt=1)
        return fut

    def _collect(self, code: str, session_id: str | None, fut: Future) -> ExecResult:
        while not wait([fut], timeout=5.0).done:  # the server enforces every deadline: this catches a hung one
            with self._lock:
                budget = max((r["timeout"] * (1 + len(r["prelude"])) for r, *_ in self._pending.values()),
                             default=0.0)
                if self._proc is not None and time.monotonic() - self._progress > 2 * budget + 30:
                    self._proc.kill()  # its reader thread resubmits what was pending
        result = fut.result()
        if session_id is not None and result.status in ("ok", "error"):
            with self._lock:
                if session_id in self._sessions:
                    self._sessions[session_id][0].append(code)
        return result

    def _send(self, req: dict, fut: Future, attempt: int) -> None:
        with self._lock:
            proc = self._ensure_server()
            rid, self._next_id = self._next_id, self._next_id + 1
            self._pending[rid] = (req, fut, attempt, proc)
        # Not under self._lock: the reader must always be able to take results, or a server
        # blocked on writing a big result would stop reading requests, and both would wait.
        with self._write_lock:
            try:
                write_frame(proc.stdin.fileno(), {**req, "id": rid})
            except (OSError, ValueError):  # it died (or was closed): the reader resubmits, once
                pass

    def _ensure_server(self) -> subprocess.Popen:
        """The running server, started if need be; call with self._lock held."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if not self._uid_claims:  # used again after close()
            self._uid_claims = _claim_uids(self._config["uid_base"], self.workers)[1]
        proc = subprocess.Popen([self._python, "-I", _SERVER, json.dumps(self._config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=USER_ENV,
                                close_fds=True, start_new_session=True, cwd="/")
        hello = read_frame(proc.stdout.fileno())
        if hello is None:
            proc.kill()
            proc.wait()
            raise RuntimeError("sandbox server failed to start (see its stderr above)")
        self._proc, self._hello, self._progress = proc, hello, time.monotonic()
        threading.Thread(target=self._reader, args=(proc,), daemon=True, name="sandbox-reader").start()
        return proc

    def _reader(self, proc: subprocess.Popen) -> None:
        """Deliver results; when the server dies, restart it and resend what was pending, once."""
        while (msg := read_frame(proc.stdout.fileno())) is not None:
            with self._lock:
                entry = self._pending.pop(msg.pop("id"), None)
                self._progress = time.monotonic()
            if entry is not None:
                entry[1].set_result(_result(msg, self.limits))
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
            lost = [self._pending.pop(rid) for rid, e in list(self._pending.items()) if e[3] is proc]
        for req, fut, attempt, _ in lost:
            try:
                if attempt < 2:
                    self._send(req, fut, attempt + 1)
                    continue
                reason = "the server died twice during this execution"
            except Exception as exc:  # noqa: BLE001 - e.g. it cannot start again: report, never hang
                reason = f"cannot restart the server: {exc}"
            fut.set_result(ExecResult("", f"sandbox: {reason}\n", "error", 0.0))


def _claim_uids(base: int | None, n: int) -> tuple[int, list[socket.socket]]:
    """Hold uids base..base+n-1 (default: a random free range) with one abstract unix socket each, bound
    only if no other sandbox on this host holds it: sandboxes never share per-uid state (NPROC, keyrings)."""
    for _ in range(1 if base is not None else 100):
        start = base if base is not None else random.randrange(UID_RANGE[0], UID_RANGE[1] - n)
        claims: list[socket.socket] = []
        try:
            for uid in range(start, start + n):
                claims.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC))
                claims[-1].bind(f"\0minir1ci-sandbox-uid-{uid}".encode())
            return start, claims
        except OSError:
            for sock in claims:
                sock.close()
    if base is None:
        raise ValueError("no free uid range found for the sandbox")
    raise ValueError(f"uid_base={base}: uids {base}..{base + n - 1} overlap another sandbox's on this host")


def _result(msg: dict, limits: Limits) -> ExecResult:
    """The status and texts of an execution from the server's raw report (see `ExecResult`)."""
    texts, truncated = [], msg["flooded"]
    for head, tail, omitted in (msg["out"], msg["err"]):
        texts.append(head + (f"\n[... {omitted} bytes omitted ...]\n" if omitted > 0 else "") + tail)
        truncated |= omitted > 0
    stdout, stderr = texts
    st, code = msg["wait_status"], None
    used, limit = msg["cpu"]  # CPU seconds, RLIMIT_CPU's soft limit: SIGXCPU there, SIGKILL a second later
    if msg["timed_out"] or st is not None and os.WIFSIGNALED(st) and os.WTERMSIG(st) in (
            signal.SIGXCPU, signal.SIGKILL) and used >= limit:
        status = "timeout"
    elif msg["flooded"]:
        status = "error"
        stderr += f"\nOutputLimitError: more than {limits.stop_output_bytes} bytes of output; stopped\n"
    elif st is None:  # the slot's init died before reporting
        status, stderr = "error", stderr + "\nsandbox: the execution was lost\n"
    elif os.WIFSIGNALED(st):  # a SIGXCPU the code sent itself, too: as `python -c` shows it
        status = f"signal:{os.WTERMSIG(st)}"
    else:
        code = os.WEXITSTATUS(st)
        last = stderr.rstrip("\n").rpartition("\n")[2]  # an uncaught MemoryError (or subclass), as printed
        memory = code == 1 and re.fullmatch(r"[\w.]*MemoryError(: .*)?", last) is not None
        status = "ok" if code == 0 else "memory" if memory else "error"
    return ExecResult(stdout, stderr, status, msg["duration"], truncated, code)

