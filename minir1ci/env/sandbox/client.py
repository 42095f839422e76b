"""Run model-written Python safely enough for RL rollouts: a fork server with per-execution limits.

    with Sandbox(timeout=10) as sb:
        r = sb.run("import numpy as np\\nprint(np.arange(4).sum())")   # ExecResult(stdout='6\\n', status='ok', ...)
        rs = sb.run_many(codes)                                        # all cores busy, results in input order

`Sandbox` spawns `server.py` (a clean `python -I` process, not a fork of the trainer) on first
use and restarts it transparently if it dies. The server pre-imports math, itertools, collections,
re, json, fractions, decimal, numpy and sympy (configurable) and keeps one init process per worker
slot; each execution is a fresh fork of its slot's init, about 3 ms of CPU here instead of about
0.8 s for a fresh interpreter with the same imports. `child.py` describes the processes and holds
`run_code`, what runs inside each execution.

Result: `status` is "ok" (exit code 0, including `sys.exit(0)` and a bare `raise SystemExit`),
"error" (uncaught exception or non-zero exit; the traceback is in stderr), "timeout" (wall clock,
or the CPU limit), "memory" (exit code 1 with a MemoryError as the last line of stderr: an uncaught
MemoryError, which is what hitting RLIMIT_AS raises) or "signal:N" (killed by signal N, e.g.
"signal:11" for a segfault). Exit codes are those of `python -c`, odd `SystemExit` codes included.
`truncated` is set whenever output was cut, whatever the status: each stream keeps its head and
tail around a "[... N bytes omitted ...]" marker, and an execution that writes more than
`stop_output_bytes` is stopped ("error", with an OutputLimitError line in stderr). Code runs as
`python -c` would run it, in a fresh `__main__`, except that the process ends with `os._exit` once
the code returns: threads left running do not hold it.

Stateless by default, as in R1-Code-Interpreter. Session mode: `run(code, session_id="traj-7")`
replays the session's earlier blocks (silently, errors ignored) before the new one, in a fresh
execution, so later blocks see earlier variables with all the per-execution limits intact. Blocks
that ended in timeout, memory or a signal are not replayed. Each session has a fixed random seed so
that replayed `random`/`numpy.random` draws repeat; time, os.urandom and the like do not. Replay and
new block share one deadline, `timeout` per block (the earlier ones each ran within it), set by the
server alone. `end_session` forgets a session.

Threat model (as root on Linux; each layer is listed in `Sandbox.isolation` and skipped where the
kernel refuses it). Per execution: its processes (all killed and reaped before the result: the
slot's init is pid 1 of a PID namespace), a deadline on the server's clock (SIGKILL from outside)
and RLIMIT_CPU, RLIMIT_AS per process, RLIMIT_FSIZE and NOFILE, output caps, an IPC namespace, no
descriptor but stdin/stdout/stderr, a fresh /tmp and /dev/shm (tmpfs capped at `disk_bytes`,
mounted anew whenever a run left a file), and memory inherited only from processes that never held
another execution's request or output (see `child.py`). Per slot, shared in turn by its
executions: an unprivileged uid `uid_base + slot` (no capabilities, no_new_privs; RLIMIT_NPROC per
uid), the PID namespace and its /proc, a network namespace with no interface up (abstract unix
sockets reach no other slot). Per sandbox: a read-only root, the minimal environment the server
starts with, a seccomp filter that refuses the kernel-key syscalls (keyrings outlive processes), and
a uid range no other sandbox on the host holds (random by default).
Not covered: this is not a VM. Code shares the host kernel (the filter refuses only the key calls,
and unprivileged user namespaces stay reachable where the kernel allows them: a kernel exploit
escapes) and can read every world-readable file (the project, its data and answers included).
Memory is bounded per process, not per execution: a tree of `processes` processes of `memory_bytes`
each, memfd files, or a tmpfs mounted inside a user namespace can outgrow the host's RAM (a memory
cgroup per slot would close this; creating cgroups is left to the deployment). CPU, memory
bandwidth and timing are shared with concurrent executions. "memory" is read from stderr, so code
can claim it (as it can by raising MemoryError). Without root or namespaces the fallbacks are
weaker: no uid change, a process group plus a sweep of orphans instead of a PID namespace, no
network isolation and the workdir under the host's /tmp; without the filter (machines other than
x86_64 and aarch64) keyrings persist per uid.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence

DEFAULT_PRELOAD = ("math", "itertools", "collections", "re", "json", "fractions", "decimal",
                   "random", "statistics", "functools", "heapq", "string", "numpy", "numpy.random", "sympy")
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")


MAX_TIMEOUT = 86400.0  # seconds; a session's budget (one timeout per block) may exceed it


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
    """A timeout in seconds, finite and in (0, MAX_TIMEOUT]: anything else is a ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}")
    return float(timeout)


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    status: str  # "ok" | "error" | "timeout" | "memory" | "signal:N"
    duration: float  # seconds from dispatch to the end of cleanup, measured by the server
    truncated: bool = False
    exit_code: int | None = None  # None when killed or timed out

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class _Session:
    blocks: list[str]
    seed: int


class Sandbox:
    """A lazily started fork server; thread-safe (`run` may be called from several threads).

    `limits` per execution (`timeout=` overrides its timeout); `workers` concurrent executions
    (default: the CPU count); `preload` modules imported once by the server; `namespaces=False`
    forces the fallback without namespaces; slot i runs as uid `uid_base + i` (default: a free
    random range, see `_claim_uids`; a range another sandbox holds is refused); `python` is the
    server's interpreter.
    """

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
        self._pending: dict[int, tuple[dict, Future, int, subprocess.Popen]] = {}
        self._next_id = 0
        self._sessions: dict[str, _Session] = {}

    # ---- public API
    def run(self, code: str, timeout: float | None = None, session_id: str | None = None) -> ExecResult:
        return self.run_many([code], timeout, None if session_id is None else [session_id])[0]

    def run_many(self, codes: Sequence[str], timeout: float | None = None,
                 session_ids: Sequence[str | None] | None = None) -> list[ExecResult]:
        """Execute all codes concurrently (`workers` at a time); results in input order.

        A session id may appear several times: its blocks then run one after the other, in order.
        """
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
        """Which layers the kernel allowed: uid, net_ns, mount_ns, readonly_root, pid_ns, seccomp."""
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
        if proc is not None:
            _stop(proc)
        for _, fut, _, _ in lost:
            fut.set_result(ExecResult("", "sandbox: closed during this execution\n", "error", 0.0))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests and results
    def _submit(self, code: str, timeout: float | None, session_id: str | None) -> Future:
        timeout = self.limits.timeout if timeout is None else _check_timeout(timeout)
        req = {"code": code, "timeout": timeout, "prelude": [], "seed": None}
        if session_id is not None:
            with self._lock:
                sess = self._sessions.setdefault(session_id, _Session([], random.getrandbits(31)))
                req.update(prelude=list(sess.blocks), seed=sess.seed)
        fut: Future = Future()
        self._send(req, fut, attempt=1)
        return fut

    def _collect(self, code: str, session_id: str | None, fut: Future) -> ExecResult:
        while True:
            try:
                result = fut.result(timeout=5.0)
                break
            except TimeoutError:  # the server enforces every deadline: this only catches a hung one
                with self._lock:
                    budget = max((r["timeout"] * (1 + len(r["prelude"])) for r, *_ in self._pending.values()),
                                 default=0.0)
                    if self._proc is not None and time.monotonic() - self._progress > 2 * budget + 30:
                        self._proc.kill()  # its reader thread resubmits what was pending
        if session_id is not None and result.status in ("ok", "error"):
            with self._lock:
                if session_id in self._sessions:
                    self._sessions[session_id].blocks.append(code)
        return result

    def _send(self, req: dict, fut: Future, attempt: int) -> None:
        with self._lock:
            proc = self._ensure_server_locked()
            rid, self._next_id = self._next_id, self._next_id + 1
            self._pending[rid] = (req, fut, attempt, proc)
        data = json.dumps({**req, "id": rid}).encode()
        # Not under self._lock: the reader must always be able to take results, or a server
        # blocked on writing a big result would stop reading requests, and both would wait.
        with self._write_lock:
            try:
                proc.stdin.write(struct.pack(">I", len(data)) + data)
                proc.stdin.flush()
            except (OSError, ValueError):  # it died (or was closed): the reader resubmits, once
                pass

    def _ensure_server(self) -> subprocess.Popen:
        with self._lock:
            return self._ensure_server_locked()

    def _ensure_server_locked(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if not self._uid_claims:  # used again after close()
            self._uid_claims = _claim_uids(self._config["uid_base"], self.workers)[1]
        # A clean spawn with a minimal environment: no trainer memory, no secrets.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([self._python, "-I", _SERVER, json.dumps(self._config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                close_fds=True, start_new_session=True, cwd="/")
        hello = _read_frame(proc.stdout)
        if hello is None:
            proc.kill()
            proc.wait()
            raise RuntimeError("sandbox server failed to start (see its stderr above)")
        self._proc, self._hello, self._progress = proc, hello, time.monotonic()
        threading.Thread(target=self._reader, args=(proc,), daemon=True, name="sandbox-reader").start()
        return proc

    def _reader(self, proc: subprocess.Popen) -> None:
        """Deliver results; when the server dies, restart it and resend what was pending, once."""
        while (msg := _read_frame(proc.stdout)) is not None:
            with self._lock:
                entry = self._pending.pop(msg.pop("id"), None)
                self._progress = time.monotonic()
            if entry is not None:
                entry[1].set_result(_result(msg, self.limits))
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
            lost = [rid for rid, entry in self._pending.items() if entry[3] is proc]
            lost = [self._pending.pop(rid) for rid in lost]
        for req, fut, attempt, _ in lost:
            try:
                if attempt < 2:
                    self._send(req, fut, attempt + 1)
                    continue
                reason = "the server died twice during this execution"
            except Exception as exc:  # noqa: BLE001 - e.g. it cannot start again: report, never hang
                reason = f"cannot restart the server: {exc}"
            fut.set_result(ExecResult("", f"sandbox: {reason}\n", "error", 0.0))


UID_RANGE = (0x70000000, 0x7FFE0000)  # listed unused by systemd: above its container range, below
# its "foreign" range, and below 2**31 (tools that read uids as signed)


def _claim_uids(base: int | None, n: int) -> tuple[int, list[socket.socket]]:
    """Hold uids base .. base+n-1 for this sandbox's life: one abstract unix socket per uid, bound
    only if no other sandbox on this host (network namespace) holds that uid; the kernel frees the
    names with the sockets. Default: a random free range in UID_RANGE, so that sandboxes never share
    per-uid kernel state (RLIMIT_NPROC, user keyrings) by accident."""
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
    if msg["timed_out"]:
        status = "timeout"
    elif msg["flooded"]:
        status = "error"
        stderr += f"\nOutputLimitError: more than {limits.stop_output_bytes} bytes of output; stopped\n"
    elif st is None:  # the slot's init died before reporting
        status, stderr = "error", stderr + "\nsandbox: the execution was lost\n"
    elif os.WIFSIGNALED(st):  # SIGXCPU: RLIMIT_CPU, the CPU side of the time limit
        status = "timeout" if os.WTERMSIG(st) == signal.SIGXCPU else f"signal:{os.WTERMSIG(st)}"
    else:
        code = os.WEXITSTATUS(st)
        status = "ok" if code == 0 else "memory" if code == 1 and _names_memory_error(stderr) else "error"
    return ExecResult(stdout, stderr, status, msg["duration"], truncated, code)


def _names_memory_error(stderr: str) -> bool:
    """Whether the last line of stderr is that of an uncaught MemoryError (or of a subclass such as
    numpy's `_ArrayMemoryError`), as the interpreter prints it. Read from the output, which the
    server caps and counts, never from a side channel: code that prints such a line and exits 1
    reads as "memory", just as one that raises MemoryError itself."""
    last = stderr.rstrip("\n").rpartition("\n")[2]
    return re.fullmatch(r"[\w.]*MemoryError(: .*)?", last) is not None


def _read_frame(stream) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    body = stream.read(n)
    return json.loads(body) if len(body) == n else None


def _stop(proc: subprocess.Popen) -> None:
    """Closing its stdin makes the server kill its executions and exit."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
