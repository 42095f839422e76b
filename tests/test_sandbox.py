"""The sandboxed executor against ordinary and hostile code.

Ordinary behaviour is compared with a fresh `python -c` (the reference: same stdout, same exit code,
same last traceback line). Each hostile case checks three things: the right status, the host
unaffected (the test process, a canary, the server itself), and the next execution still working.
At the end no process of the sandbox remains and the server's memory has not grown.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from minir1ci.env.sandbox import Limits, Sandbox

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

SECRET = "minir1ci-test-secret-7f3a"
UID_BASE, FALLBACK_UID_BASE = 61500, 61600
SERVER_FILE = "sandbox/server.py"


@pytest.fixture(scope="module")
def sb():
    os.environ["MINIR1CI_TEST_SECRET"] = SECRET  # in the trainer's environment, never in the sandbox's
    box = Sandbox(Limits(timeout=2.0), workers=2, uid_base=UID_BASE)
    try:
        assert box.run("pass").ok
        yield box
    finally:
        box.close()
        os.environ.pop("MINIR1CI_TEST_SECRET", None)


def _procs() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, uid, cmdline) of every process on the host."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(name), int(fields["PPid"]), int(fields["Uid"].split()[0]), cmd))
    return out


def _strays(box: Sandbox, uid_base: int) -> list[tuple[int, int, int, str]]:
    """Processes left by executions: any process of the slot uids, or a copy of a server of this
    sandbox (they carry its uid_base in their command line) that is neither it, nor its zygote (its
    child), nor the zygote's slot inits."""
    procs = _procs()
    uids, server, parent = range(uid_base, uid_base + box.workers), box.server_pid, {p[0]: p[1] for p in procs}
    return [p for p in procs if p[2] in uids or (
        SERVER_FILE in p[3] and f'"uid_base": {uid_base}' in p[3]
        and server not in (p[0], p[1], parent.get(p[1])))]


def _host_ok(box: Sandbox, server_pid: int, uid_base: int = UID_BASE, grace: float = 0.0) -> None:
    """The server survived, still works, and nothing of earlier executions is left (a slot's init
    reaps everything before it reports, so no grace is needed unless a server was killed)."""
    assert box.server_pid == server_pid, "the server was restarted"
    r = box.run("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n")
    deadline = time.monotonic() + grace
    while _strays(box, uid_base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _strays(box, uid_base) == []


def _reference(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin")})


# ---------------------------------------------------------------- ordinary code, against `python -c`

@pytest.mark.parametrize("code", [
    "print(sum(range(10)))",
    "import numpy as np\nprint(np.arange(6).reshape(2, 3).sum(axis=0))",
    "import sympy\nx = sympy.Symbol('x')\nprint(sympy.factor(x**2 - 1))",
    "print('partial')\n1 / 0",
    "import sys\nprint('bye')\nsys.exit(3)",
    "raise SystemExit('goodbye')",
    "raise SystemExit",
    "import os\nos._exit(5)",
    "x = (",
    # SystemExit codes the C runtime converts: low byte of a C long, 255 when it does not fit
    "raise SystemExit(2**70)", "raise SystemExit(-2**70)", "raise SystemExit(2**63)", "raise SystemExit(-1)",
    "raise SystemExit(2**32 + 3)", "raise SystemExit(256)", "raise SystemExit(True)", "raise SystemExit(1, 2)",
    "raise SystemExit('')",
    # every descriptor above stderr is closed, as in a fresh interpreter: none leads to the server
    "import os\nprint([fd for fd in range(3, 256) if os.path.exists(f'/proc/self/fd/{fd}')])",
    # sqlite3 locks its file (fcntl) and, in WAL mode, its shared-memory index: locks hold nothing, yet it works
    "import sqlite3, tempfile\nwith tempfile.TemporaryDirectory() as d:\n    con = sqlite3.connect(d + '/t.db')\n"
    "    print(con.execute('pragma journal_mode=wal').fetchone())\n    con.execute('create table t(x)')\n"
    "    con.executemany('insert into t values (?)', [(i,) for i in range(100)])\n    con.commit()\n"
    "    print(con.execute('select sum(x) from t').fetchone())\n    con.close()",
])
def test_results_match_a_fresh_interpreter(sb, code):
    ref, r = _reference(code), sb.run(code)
    assert r.stdout == ref.stdout
    assert r.exit_code == ref.returncode
    assert r.status == ("ok" if ref.returncode == 0 else "error")
    assert r.stderr.strip().splitlines()[-1:] == ref.stderr.strip().splitlines()[-1:]


def test_traceback_points_into_the_code(sb):
    r = sb.run("def f(x):\n    return 1 / x\n\nf(0)")
    assert r.status == "error"
    assert 'File "<string>", line 2, in f' in r.stderr and "return 1 / x" in r.stderr
    assert SERVER_FILE not in r.stderr


def test_output_keeps_head_and_tail_around_a_marker(sb):
    n = 100_000
    text = "".join(str(i % 10) for i in range(n)) + "\n"  # the reference output
    r = sb.run(f"print(''.join(str(i % 10) for i in range({n})))")
    half = Limits().output_bytes // 2
    assert r.status == "ok" and r.truncated
    assert r.stdout == text[:half] + f"\n[... {len(text) - 2 * half} bytes omitted ...]\n" + text[-half:]


def test_run_many_returns_results_in_input_order(sb):
    codes = [f"import time\ntime.sleep({0.05 * (5 - i)})\nprint({i})" for i in range(6)]
    t = time.monotonic()
    results = sb.run_many(codes)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - t < sum(0.05 * (5 - i) for i in range(6))  # ran concurrently


def test_run_is_safe_from_several_threads(sb):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: sb.run(f"print({i} * {i})").stdout, range(40)))
    assert outs == [f"{i * i}\n" for i in range(40)]


def test_executions_are_stateless_and_differently_seeded(sb):
    assert sb.run("x = 1").ok
    assert "NameError" in sb.run("print(x)").stderr
    draws = [sb.run("import numpy as np, random\nprint(np.random.rand(), random.random())").stdout
             for _ in range(3)]
    assert len(set(draws)) == 3  # forked children must not share the server's random state
    draws = [sb.run("import random\nprint(random.random())").stdout for _ in range(3)]
    assert len(set(draws)) == 3  # the same from the smaller image (below)


# Which image an execution forked from: sympy is preloaded in the full one only (numpy.random for code
# that imports sympy itself). The module names are built at run time, so the probe names neither.
IN_FULL = "import sys\nprint(('sym' + 'py') in sys.modules)"
IN_FULL_SYMPY = "import sys\nprint(('num' + 'py.random') in sys.modules)"


@pytest.mark.parametrize("code, full", [
    (IN_FULL, False),
    ("from itertools import permutations\nimport math, os.path as p\n" + IN_FULL, False),  # what a from imports
    ("from datetime import date\ntry:\n    from . import x\nexcept ImportError:\n    pass\n" + IN_FULL, False),
    ("import numpy as np\n" + IN_FULL, True),
    ("import json, numpy.linalg\n" + IN_FULL, True),
    ("import json as j,\\\n    numpy\n" + IN_FULL, True),          # named: a continued line too
    ("from sympy import Symbol\n" + IN_FULL_SYMPY, True),
    ("# numpy would be faster\n" + IN_FULL, True),                   # comments count: errs towards the full one
    ("try:\n    import pandas\nexcept ImportError:\n    pass\n" + IN_FULL, True),   # outside the stdlib
    ("m = __import__('math')\n" + IN_FULL, True),                    # a dynamic import
    ("import importlib\n" + IN_FULL, True),
])
def test_an_execution_forks_from_the_full_image_only_when_its_text_may_need_it(sb, code, full):
    r = sb.run(code)
    assert r.stdout == f"{full}\n", r


def test_a_hidden_import_works_from_the_smaller_image_and_sessions_use_the_full_one(sb):
    code = ("import sys\nbefore = ('num' + 'py') in sys.modules\nexec('imp' + 'ort num' + 'py as np')\n"
            "print(before, np.arange(4).sum())")
    assert sb.run(code).stdout == "False 6\n"
    assert sb.run(IN_FULL, session_id="image").stdout == "True\n"   # replays seed numpy as before
    sb.end_session("image")


def test_code_that_is_not_text_is_its_executions_error_not_the_servers(sb):
    pid = sb.server_pid
    r = sb.run(None)  # the server routes it without reading it; the execution reports the TypeError
    assert r.status == "error" and "TypeError" in r.stderr, r
    _host_ok(sb, pid)


def test_one_execution_per_slot_uid_at_a_time_across_both_images():
    # each records its uid and when it ran; the two images' inits of one slot share its uid
    probe = ("import os, time\nt = time.time()\ntime.sleep(0.05)\nprint(os.getuid(), t, time.time())"
             "{}")
    codes = [probe.format("\nimport numpy" if i % 3 else "") for i in range(24)]
    with Sandbox(Limits(timeout=5.0), workers=2, uid_base=UID_BASE + 30) as box:
        if not box.isolation["uid"]:
            pytest.skip("no uid per slot without root")
        runs = [r.stdout.split() for r in box.run_many(codes)]
    spans: dict[str, list[tuple[float, float]]] = {}
    for uid, start, end in runs:
        spans.setdefault(uid, []).append((float(start), float(end)))
    assert set(spans) == {str(UID_BASE + 30), str(UID_BASE + 31)}
    for uid, ss in spans.items():
        ss.sort()
        assert all(a[1] <= b[0] for a, b in zip(ss, ss[1:])), uid


LEAVE_TRACES = """
import ctypes, os
open('/tmp/trace', 'w').write('x')
os.makedirs('/tmp/d/e', exist_ok=True)
open('/tmp/d/e/f', 'w').write('x')
open('/dev/shm/trace', 'w').write('x')
libc = ctypes.CDLL(None)
print(libc.shmget(0x5EED, 4096, 0o1666))  # IPC_CREAT | 0666
"""
FIND_TRACES = """
import ctypes, os
print((sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')), ctypes.CDLL(None).shmget(0x5EED, 4096, 0o666)))
"""


def test_nothing_of_one_execution_reaches_the_next_in_its_slot():
    with Sandbox(Limits(timeout=5.0), workers=1, uid_base=UID_BASE + 8) as box:
        if not box.isolation["mount_ns"]:
            pytest.skip("no mount namespaces: workdirs are fresh directories, not one tmpfs")
        left = box.run(LEAVE_TRACES)
        assert left.ok and int(left.stdout) >= 0, left.stderr
        found = box.run(FIND_TRACES)
        assert found.ok, found.stderr
        tmp, shm, shmid = eval(found.stdout)
        assert "trace" not in tmp and "d" not in tmp and shm == [] and shmid == -1


def test_a_tree_too_deep_to_delete_recursively_does_not_reach_the_next_execution():
    deep = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nopen('secret', 'w').write('x')"
    with Sandbox(Limits(timeout=10.0), workers=1, uid_base=UID_BASE + 9) as box:
        if not box.isolation["mount_ns"]:
            pytest.skip("no mount namespaces: workdirs are fresh directories, not one tmpfs")
        assert box.run(deep).ok  # the slot mounts fresh tmpfs: nothing walks the tree
        found = box.run("import os\nprint(os.listdir('/tmp'))")
        assert found.ok and "'d'" not in found.stdout, found


def test_session_replays_earlier_blocks(sb):
    sid = "trajectory-1"
    first = sb.run("import random\nr = random.random()\nx = 41\nprint(r)", session_id=sid)
    assert sb.run("print(x + 1)\nprint(r)", session_id=sid).stdout == f"42\n{first.stdout}"
    assert sb.run("while True:\n    pass", timeout=0.5, session_id=sid).status == "timeout"
    r = sb.run("x += 1\nprint(x)", session_id=sid)  # the timed-out block was not kept
    assert (r.status, r.stdout) == ("ok", "42\n")
    out = sb.run_many(["x += 1", "y = 1", "print(x)"], session_ids=[sid, "other", sid])
    assert [o.stdout for o in out] == ["", "", "43\n"]  # one session's blocks run in order
    sb.end_session(sid)
    assert "NameError" in sb.run("print(x)", session_id=sid).stderr


def test_session_replay_has_its_own_time_budget(sb):
    sid = "trajectory-slow"
    assert sb.run("import time\ntime.sleep(0.7)\na = 1", timeout=1.0, session_id=sid).ok
    r = sb.run("import time\ntime.sleep(0.7)\nprint(a)", timeout=1.0, session_id=sid)
    assert (r.status, r.stdout) == ("ok", "1\n")  # 1.4 s in all: the replay did not eat the budget
    sb.end_session(sid)


# ---------------------------------------------------------------- hostile code

def test_infinite_loop_times_out(sb):
    pid = sb.server_pid
    r = sb.run("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and r.exit_code is None and 1.0 <= r.duration < 1.8
    _host_ok(sb, pid)


def test_loop_ignoring_signals_is_killed_from_outside(sb):
    pid = sb.server_pid
    code = ("import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):\n"
            "    signal.signal(s, signal.SIG_IGN)\nsignal.alarm(1)\nwhile True:\n    pass")
    assert sb.run(code, timeout=1.0).status == "timeout"
    _host_ok(sb, pid)


@pytest.mark.parametrize("code, status", [
    ("import sys\nsys.exit(0)", "ok"), ("import sys\nsys.exit(2)", "error"),
    ("import os\nos._exit(0)", "ok"), ("import os\nos._exit(9)", "error"),
    ("raise SystemExit", "ok"), ("raise SystemExit(1)", "error"),
])
def test_exits_map_to_status_by_exit_code(sb, code, status):
    pid = sb.server_pid
    assert sb.run(code).status == status
    _host_ok(sb, pid)


def test_fork_bomb_is_contained_and_reaped(sb):
    pid = sb.server_pid
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert sb.run(code, timeout=1.0).status == "timeout"
    _host_ok(sb, pid)


def test_setsid_grandchild_does_not_outlive_the_call(sb):
    pid = sb.server_pid
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(1000)\n    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')")
    r = sb.run(code)
    assert (r.status, r.stdout) == ("ok", "parent done\n") and r.duration < 1.5
    _host_ok(sb, pid)


def test_thread_that_never_ends_does_not_hold_the_result(sb):
    pid = sb.server_pid
    r = sb.run("import threading, time\n"
               "threading.Thread(target=time.sleep, args=(1000,)).start()\nprint('main')")
    assert (r.status, r.stdout) == ("ok", "main\n") and r.duration < 1.0
    _host_ok(sb, pid)


@pytest.mark.parametrize("code", ["x = bytearray(8 << 30)", "import numpy as np\nx = np.ones(1 << 30)"])
def test_eight_gigabytes_is_a_memory_error(sb, code):
    pid = sb.server_pid
    r = sb.run(code)
    assert r.status == "memory" and "MemoryError" in r.stderr
    _host_ok(sb, pid)


def test_deep_recursion_with_raised_limit_crashes_only_the_child(sb):
    pid = sb.server_pid  # recursion through repr() uses the C stack: a segfault, as in `python -c`
    code = ("import sys\nsys.setrecursionlimit(10**7)\n"
            "class A:\n    def __repr__(self):\n        return repr(self)\nrepr(A())")
    assert sb.run(code).status == f"signal:{signal.SIGSEGV}" == f"signal:{-_reference(code).returncode}"
    _host_ok(sb, pid)


def test_segfault_through_ctypes_is_reported_as_signal(sb):
    pid = sb.server_pid
    assert sb.run("import ctypes\nctypes.string_at(0)").status == "signal:11"
    _host_ok(sb, pid)


def test_printing_a_gigabyte_is_stopped_by_the_cap(sb):
    pid = sb.server_pid
    r = sb.run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)")
    half = Limits().output_bytes // 2
    assert r.status == "error" and r.truncated and "OutputLimitError" in r.stderr
    assert r.stdout.startswith("x" * half) and r.stdout.endswith("x" * half)
    assert len(r.stdout) < 2 * half + 100 and r.duration < 1.0  # stopped, not a gigabyte of I/O
    _host_ok(sb, pid)


def test_writing_ten_gigabytes_is_stopped_by_the_file_size_limit(sb):
    pid = sb.server_pid
    code = "with open('big.bin', 'wb') as f:\n    for _ in range(10 * 1024):\n        f.write(bytes(1 << 20))"
    r = sb.run(code)
    assert r.status == "error" and "File too large" in r.stderr and r.duration < 1.5
    _host_ok(sb, pid)


@pytest.mark.parametrize("layer", ["uid", "readonly_root"])
def test_canary_outside_the_workdir_survives(sb, layer):
    if not sb.isolation[layer]:
        pytest.skip(f"{layer} not available here")
    if not os.access(sys.prefix, os.W_OK):  # the interpreter's directories are what executions still see
        pytest.skip(f"{sys.prefix} is not writable here")
    pid = sb.server_pid
    with tempfile.TemporaryDirectory(dir=sys.prefix) as d:
        canary = os.path.join(d, "canary.txt")
        with open(canary, "w") as f:
            f.write("canary")
        # uid: an ordinary root-owned file; readonly_root: world-writable, so only the mount protects it
        os.chmod(canary, 0o644 if layer == "uid" else 0o666)
        os.chmod(d, 0o755 if layer == "uid" else 0o1777)
        code = (f"import os\ntry:\n    open({canary!r}, 'w').write('pwned')\nexcept OSError as e:\n    print(e)\n"
                f"os.remove({canary!r})")
        assert sb.run(code).status == "error"
        with open(canary) as f:
            assert f.read() == "canary"
    _host_ok(sb, pid)


def test_code_reads_neither_the_project_nor_its_task_data(sb):
    """Reward hacking by reading the answers: the checkout and the task data (with their gold answers)
    are world-readable on the host, as a `python -c` run shows, and out of reach in the sandbox."""
    if not sb.isolation["hidden_files"]:
        pytest.skip("no private mounts here")
    repo = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("MINIR1CI_DATA") or repo.parent / "shared" / "data").resolve()
    targets = [repo / "README.md", repo / "minir1ci" / "config.py"] + sorted(data.glob("*/*"))[:3]
    code = ("import os\nfor path in " + repr([str(t) for t in targets]) + ":\n"
            "    try:\n        open(path).close() if os.path.isfile(path) else os.listdir(path)\n"
            "        print('read', path)\n    except OSError as e:\n        print(type(e).__name__)")
    ref = _reference(code)
    assert ref.stdout.count("read ") == len(targets), ref  # the reference: on the host anyone reads them
    r = sb.run(code)
    assert r.ok and "read " not in r.stdout and r.stdout.count("FileNotFoundError") == len(targets), r


def test_out_of_memory_the_kernel_kills_executions_first(sb):
    code = ("path = '/proc/self/oom_score_adj'\nprint(open(path).read().strip())\ntry:\n"
            "    open(path, 'w').write('0')\nexcept OSError as e:\n    print(type(e).__name__)\n"
            "print(open(path).read().strip())")
    assert _reference(code).stdout.splitlines()[0] != "1000"  # the reference: a plain process is not marked
    r = sb.run(code)
    assert r.ok and r.stdout.splitlines()[0] == "1000", r
    if sb.isolation["uid"]:  # only code still running as root could unmark itself
        assert r.stdout.splitlines()[1:] == ["PermissionError", "1000"], r


def test_killing_the_parent_reaches_nothing_outside(sb):
    if not sb.isolation["pid_ns"] or not sb.isolation["uid"]:
        pytest.skip("no PID namespace or uid change here")
    pid = sb.server_pid
    # The parent is the namespace's init (pid 1, root); kill(-1) finds no one else to signal.
    r = sb.run("import os\nprint(os.getppid())\nos.kill(os.getppid(), 9)")
    assert (r.status, r.stdout) == ("error", "1\n") and "PermissionError" in r.stderr
    assert "ProcessLookupError" in sb.run("import os\nos.kill(-1, 9)").stderr
    assert sb.run("import os\nos.kill(0, 9)").status == "signal:9"  # its own process group only
    _host_ok(sb, pid)


def test_root_only_file_is_unreadable(sb):
    if not sb.isolation["uid"]:
        pytest.skip("no unprivileged uid here")
    if not os.access(sys.prefix, os.W_OK):  # the interpreter's directories are what executions still see
        pytest.skip(f"{sys.prefix} is not writable here")
    pid = sb.server_pid
    with tempfile.TemporaryDirectory(dir=sys.prefix) as d:
        os.chmod(d, 0o755)
        secret = os.path.join(d, "secret.txt")
        with open(os.open(secret, os.O_CREAT | os.O_WRONLY, 0o600), "w") as f:
            f.write(SECRET)
        r = sb.run(f"print(open({secret!r}).read())")
        assert r.status == "error" and "PermissionError" in r.stderr and SECRET not in r.stdout
    _host_ok(sb, pid)


def test_parent_environment_secrets_are_unreachable(sb):
    pid = sb.server_pid
    code = (f"import os\nprint(dict(os.environ))\nfor p in os.listdir('/proc') + ['{os.getpid()}', '{pid}']:\n"
            "    try:\n        print(open(f'/proc/{p}/environ', 'rb').read())\n    except OSError:\n        pass")
    r = sb.run(code)
    assert r.status == "ok" and "PATH" in r.stdout and SECRET not in r.stdout + r.stderr
    _host_ok(sb, pid)


def test_localhost_listener_is_unreachable(sb):
    if not sb.isolation["net_ns"]:
        pytest.skip("no network namespace here")
    pid = sb.server_pid
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')")
        assert r.status == "error" and "OSError" in r.stderr
        server.settimeout(0.1)
        with pytest.raises(socket.timeout):
            server.accept()
    _host_ok(sb, pid)


def test_filling_dev_shm_is_capped_and_leaves_no_trace(sb):
    pid = sb.server_pid
    free = os.statvfs("/dev/shm").f_bavail
    code = "for i in range(1000):\n    open(f'/dev/shm/minir1ci-fill{i}', 'wb').write(bytes(32 << 20))"
    r = sb.run(code)
    assert r.status == "error" and ("No space left" in r.stderr or "File too large" in r.stderr)
    assert not os.path.exists("/dev/shm/minir1ci-fill0")
    assert os.statvfs("/dev/shm").f_bavail >= free - 4096  # blocks; others may use it meanwhile
    _host_ok(sb, pid)


def test_opening_a_thousand_files_hits_the_descriptor_limit(sb):
    pid = sb.server_pid
    r = sb.run("files = [open(f'f{i}', 'w') for i in range(1000)]")
    assert r.status == "error" and "Too many open files" in r.stderr
    _host_ok(sb, pid)


def test_writing_to_fd_3_neither_extends_the_deadline_nor_changes_the_status(sb):
    pid = sb.server_pid  # fd 3 once carried the server's flags ("P" re-armed the deadline, "M" read as memory)
    spam = "import os, time\nwhile True:\n    try:\n        os.write(3, b'x' * 64 + b'P')\n    except OSError:\n" \
           "        pass\n    time.sleep(0.05)"
    r = sb.run(spam, timeout=1.0)
    assert r.status == "timeout" and 1.0 <= r.duration < 1.8
    fake = "import os\ntry:\n    os.write(3, b'M')\nexcept OSError:\n    pass\nraise SystemExit(1)"
    r, ref = sb.run(fake), _reference(fake)
    assert r.status == "error" and r.exit_code == ref.returncode == 1
    _host_ok(sb, pid)


def test_concurrent_executions_cannot_talk_over_abstract_unix_sockets(sb):
    if not sb.isolation["net_ns"]:
        pytest.skip("no network namespace here")
    pid = sb.server_pid  # abstract socket names live in the network namespace: one per slot
    listen = ("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
              "s.bind(b'\\0minir1ci-test-channel')\ns.settimeout(1.0)\ntry:\n    print(s.recv(64))\n"
              "except socket.timeout:\n    print('nothing')")
    send = ("import socket, time\nc = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nfor _ in range(80):\n"
            "    try:\n        c.sendto(b'" + SECRET + "', b'\\0minir1ci-test-channel')\n        print('sent')\n"
            "        break\n    except OSError:\n        time.sleep(0.01)\nelse:\n    print('no listener')")
    heard, said = sb.run_many([listen, send])
    assert (heard.stdout, said.stdout) == ("nothing\n", "no listener\n"), (heard, said)
    _host_ok(sb, pid)


# Kernel keys through raw syscalls (no keyutils in the image): add_key and keyctl, by machine.
KEYS = """
import ctypes, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ADD_KEY, KEYCTL = {'x86_64': (248, 250), 'aarch64': (217, 219)}[platform.machine()]
L = ctypes.c_long
def add(payload, ring):
    return libc.syscall(ADD_KEY, b'user', b'minir1ci-test-key', payload, L(len(payload)), L(ring))
def find():  # search the session (-3), user (-4) and user-session (-5) keyrings, read what is found
    found = []
    for ring in (-3, -4, -5):
        key = libc.syscall(KEYCTL, L(10), L(ring), b'user', b'minir1ci-test-key', L(0))  # KEYCTL_SEARCH
        buf = ctypes.create_string_buffer(256)
        n = libc.syscall(KEYCTL, L(11), L(key), buf, L(256)) if key > 0 else -1  # KEYCTL_READ
        found.append(buf.raw[:n].decode() if n > 0 else None)
    return found
"""


def test_kernel_keys_reach_neither_later_executions_nor_the_clients_keyring():
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("key syscall numbers known for x86_64 and aarch64 only")
    host = {}
    exec(KEYS, host)  # the test process plays the trainer: a secret in its session keyring
    host["libc"].syscall(host["KEYCTL"], host["L"](1), None)  # KEYCTL_JOIN_SESSION_KEYRING: a fresh one
    host_key = host["add"](SECRET.encode(), -3)
    assert host_key > 0 and host["find"]()[0] == SECRET  # the reference: the key is there to find
    try:
        planted = SECRET[::-1]
        with Sandbox(Limits(timeout=5.0), workers=1, uid_base=UID_BASE + 10) as box:
            box.run(KEYS + f"print(add(b'{planted}', -4), add(b'{planted}', -3), add(b'{planted}', -5))")
            r = box.run(KEYS + "print(find())")
        with Sandbox(Limits(timeout=5.0), workers=1, uid_base=UID_BASE + 10) as box:  # same uids, later
            r2 = box.run(KEYS + "print(find())")
        for out in (r, r2):
            assert out.ok and SECRET not in out.stdout and planted not in out.stdout, out
    finally:
        host["libc"].syscall(host["KEYCTL"], host["L"](3), host["L"](host_key))  # KEYCTL_REVOKE


# A user namespace of its own gives code every capability inside it: unshare and raw clone (the
# flags libc's fork passes) with CLONE_NEWUSER, and clone3 (whose flags seccomp cannot read).
USERNS = """
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
CLONE, CLONE3 = {'x86_64': (56, 435), 'aarch64': (220, 435)}[platform.machine()]
def err(ret):
    return 'ok' if ret >= 0 else os.strerror(ctypes.get_errno())
pid = libc.syscall(CLONE, ctypes.c_long(0x10000000 | 17), None, None, None, None)  # CLONE_NEWUSER | SIGCHLD
if pid == 0:
    os._exit(0)
print(err(pid), os.waitpid(pid, 0)[1] if pid > 0 else '-')
print(err(libc.syscall(CLONE3, None, ctypes.c_long(0))))
r = libc.unshare(0x10000000)  # last: inside a new namespace without a uid map, no nested one is allowed
print(err(r), open('/proc/self/status').read().split('CapEff:')[1].split()[0] if r == 0 else '-')
"""


def test_code_cannot_enter_a_user_namespace_of_its_own(sb):
    if os.uname().machine not in ("x86_64", "aarch64") or not sb.isolation["seccomp"]:
        pytest.skip("no seccomp filter here")
    ref = _reference(USERNS)  # the reference: outside the sandbox this host lets any process in
    if ref.returncode or not ref.stdout.startswith("ok"):
        pytest.skip(f"this host refuses user namespaces anyway: {ref.stdout!r} {ref.stderr[-200:]!r}")
    assert ref.stdout.splitlines()[0] == "ok 0" and ref.stdout.splitlines()[2].startswith("ok ")
    r = sb.run(USERNS)
    assert r.ok and r.stdout.splitlines() == ["Operation not permitted -", "Function not implemented",
                                              "Operation not permitted -"], r
    # threads and processes still start: libc falls back from clone3 to clone
    r = sb.run("import subprocess, threading\nt = threading.Thread(target=print, args=('thread',))\n"
               "t.start()\nt.join()\nprint(subprocess.run(['/bin/echo', 'child'], capture_output=True, "
               "text=True).stdout, end='')")
    assert (r.status, r.stdout) == ("ok", "thread\nchild\n"), r


# Kernel attack surface no Python program needs: bpf, perf_event_open, userfaultfd, io_uring_setup/enter/register
SURFACE = """
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
for nr in {'x86_64': (321, 298, 323, 425, 426, 427), 'aarch64': (280, 241, 282, 425, 426, 427)}[platform.machine()]:
    ret = libc.syscall(nr, ctypes.c_long(0), None, ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    print(nr, 'ok' if ret >= 0 else os.strerror(ctypes.get_errno()))
"""


def test_kernel_attack_surface_calls_are_refused(sb):
    if os.uname().machine not in ("x86_64", "aarch64") or not sb.isolation["seccomp"]:
        pytest.skip("no seccomp filter here")
    nosys = os.strerror(38)  # ENOSYS
    ref = _reference(SURFACE)  # the reference: on the host each call reaches the kernel (and fails otherwise)
    assert ref.returncode == 0 and len(ref.stdout.splitlines()) == 6 and nosys not in ref.stdout, ref
    r = sb.run(SURFACE)
    assert r.ok and [line.split(" ", 1)[1] for line in r.stdout.splitlines()] == [nosys] * 6, r


# ---------------------------------------------------------------- state that outlives an execution or spans slots
# Each case: a value one execution sets and another (the next in its slot, or one running beside it) reads.

GETPID = "import os\nprint(os.getpid())"
FORK_137 = "import os\nfor _ in range(137):\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()"


def test_the_pid_counter_starts_afresh_in_every_execution(sb):
    if not sb.isolation["pid_ns"]:
        pytest.skip("no PID namespace here")
    pid = sb.server_pid
    fresh = [r.stdout for r in sb.run_many([GETPID] * 2)]  # one per slot
    assert all(r.ok for r in sb.run_many([FORK_137] * 2))
    assert [r.stdout for r in sb.run_many([GETPID] * 2)] == fresh  # not 137 further on
    _host_ok(sb, pid)


def test_executions_cannot_read_the_counters_of_their_slots_init(sb):
    """The slot's init reaps every execution, so its /proc/PID/stat sums their page faults and CPU time: a
    count one execution sets and the next reads. Hidden from the slot's uid, as another user's process."""
    if not sb.isolation["pid_ns"] or not sb.isolation["uid"]:
        pytest.skip("no PID namespace or uid change here")
    code = ("import os\nprint(os.getppid())\ntry:\n"
            "    print(open(f'/proc/{os.getppid()}/stat').read().split(')')[1].split()[8])  # cminflt\n"
            "except OSError as e:\n    print(type(e).__name__)")
    assert _reference(code).stdout.splitlines()[1].isdigit()  # the reference: a parent's cminflt, readable
    r = sb.run(code)
    assert r.ok and r.stdout.splitlines() == ["1", "FileNotFoundError"], r


TMP_STATE = ("import os\nfor d in ('/tmp', '/dev/shm'):\n    st = os.stat(d)\n    open(f'{d}/f', 'w').close()\n"
             "    print(min(st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns), os.stat(f'{d}/f').st_ino)")
CHURN = ("import os\nfor d in ('/tmp', '/dev/shm'):\n    for i in range(50):\n"
         "        open(f'{d}/x{i}', 'w').close()\n        os.unlink(f'{d}/x{i}')")


def test_tmp_and_dev_shm_are_new_mounts_in_every_execution(sb):
    """A run that creates and removes files leaves the inode count as it was, but not the directories'
    times or the next inode number; the next run in the slot sees mounts made for it."""
    if not sb.isolation["mount_ns"]:
        pytest.skip("no mount namespaces: workdirs are fresh directories, not one tmpfs")
    pid = sb.server_pid
    inodes = [[line.split()[1] for line in r.stdout.splitlines()] for r in sb.run_many([TMP_STATE] * 2)]
    assert all(r.ok for r in sb.run_many([CHURN] * 2))
    time.sleep(0.3)
    start = time.time_ns() - 50_000_000  # file times come from a coarse clock, a few ms behind
    for r, fresh in zip(sb.run_many([TMP_STATE] * 2), inodes):
        times, inos = zip(*(line.split() for line in r.stdout.splitlines()))
        assert r.ok and list(inos) == fresh and min(map(int, times)) >= start, (r, fresh, start)
    _host_ok(sb, pid)


LOCK_HOLDER = """
import fcntl, os, struct, time
f, g = open('/etc/passwd', 'rb'), open('/etc/passwd', 'rb')
fcntl.flock(f, fcntl.LOCK_EX)
fcntl.lockf(f, fcntl.LOCK_SH)  # a POSIX read lock
fcntl.fcntl(g, fcntl.F_OFD_SETLK, struct.pack('hhqqi', fcntl.F_RDLCK, 0, 0, 0, 0))  # struct flock
e = os.eventfd(0)
fcntl.flock(e, fcntl.LOCK_EX)  # every eventfd on the host has the same inode
print('holding', flush=True)
time.sleep({hold})
"""
LOCK_PROBE = """
import fcntl, os, struct, time
time.sleep(0.4)
def blocked(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
f = open('/etc/passwd', 'rb')
query = struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0)  # F_GETLK: the type of a conflicting lock
print(blocked(f), struct.unpack('hhqqi', fcntl.fcntl(f, fcntl.F_GETLK, query))[0] != fcntl.F_UNLCK,
      blocked(os.eventfd(0)))
"""


def test_file_locks_carry_no_signal_between_concurrent_executions(sb):
    """Locks on a file both can open (a system file, or the one inode all eventfds share) are one bit each
    between slots, and reach the host's processes. Lock calls succeed and hold nothing (sqlite3 still works:
    see the fresh-interpreter cases)."""
    if not sb.isolation["seccomp"] or os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("no seccomp filter here")
    pid = sb.server_pid
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(hold=60)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        ref = _reference(LOCK_PROBE)  # the reference: plain processes see each other's locks
    finally:
        holder.kill()
        holder.communicate()
    assert ref.stdout == "True True True\n", ref
    held, probe = sb.run_many([LOCK_HOLDER.format(hold=1.2), LOCK_PROBE])
    assert (held.stdout, probe.status, probe.stdout) == ("holding\n", "ok", "False False False\n"), (held, probe)
    _host_ok(sb, pid)


NOTIFY = """
import ctypes, fcntl, os, platform
libc = ctypes.CDLL(None, use_errno=True)
INOTIFY_INIT1, FANOTIFY_INIT = {'x86_64': (294, 300), 'aarch64': (26, 262)}[platform.machine()]
for ret in (libc.syscall(INOTIFY_INIT1, 0), libc.syscall(FANOTIFY_INIT, 0x200, 0)):  # FAN_REPORT_FID
    print('ok' if ret >= 0 else os.strerror(ctypes.get_errno()))
try:
    fcntl.fcntl(os.open('/usr', os.O_RDONLY), fcntl.F_NOTIFY, fcntl.DN_ACCESS)
    print('ok')
except OSError as e:
    print(e.strerror)
"""


def test_notify_watches_are_refused(sb):
    """inotify, fanotify and dnotify report reads of files every slot and the host share (/dev/null, the
    system's files): a signal between executions. Refused, as by a kernel built without them."""
    if not sb.isolation["seccomp"] or os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("no seccomp filter here")
    assert _reference(NOTIFY).stdout.split() == ["ok"] * 3  # the reference: all three work on the host
    r = sb.run(NOTIFY)
    assert r.ok and r.stdout.splitlines() == [os.strerror(38)] * 2 + [os.strerror(22)], r  # ENOSYS, EINVAL


def test_ptys_of_one_execution_do_not_show_in_another(sb):
    """The host's devpts numbers the ptys of every process on the host: executions get none."""
    if not sb.isolation["hidden_files"]:
        pytest.skip("no private mounts here")
    pid = sb.server_pid
    opener = ("import os, time\ntry:\n    fds = [os.open('/dev/ptmx', os.O_RDWR) for _ in range(5)]\n"
              "    print('opened')\nexcept OSError as e:\n    print(e.strerror)\ntime.sleep(0.8)")
    assert _reference(opener).stdout == "opened\n"
    opened, listed = sb.run_many([opener, "import os, time\ntime.sleep(0.4)\nprint(os.listdir('/dev/pts'))"])
    assert (opened.stdout, listed.stdout) == (os.strerror(19) + "\n", "[]\n"), (opened, listed)  # ENODEV
    _host_ok(sb, pid)


SNMP = "print(open('/proc/net/snmp').read().splitlines()[1])"  # the IP counters of this network namespace
FAMILIES = ("import socket\nfor family in ('AF_UNIX', 'AF_INET', 'AF_INET6', 'AF_NETLINK'):\n    try:\n"
            "        socket.socket(getattr(socket, family), socket.SOCK_DGRAM).close()\n        print('ok')\n"
            "    except OSError as e:\n        print(e.strerror)")
SEND_37 = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(37):\n    try:\n"
           "        s.sendto(b'x', ('10.1.2.3', 9))\n    except OSError:\n        pass")


def test_only_unix_sockets_so_no_network_counter_outlives_an_execution(sb):
    """An unroutable datagram counts in the slot's network namespace (OutNoRoutes), which outlives the
    execution; netlink's port numbers come from a host-wide counter. Sockets other than AF_UNIX are refused."""
    if not sb.isolation["net_ns"] or not sb.isolation["seccomp"]:
        pytest.skip("no network namespace or seccomp filter here")
    pid = sb.server_pid
    assert _reference(FAMILIES).stdout.split() == ["ok"] * 4
    r = sb.run(FAMILIES)
    assert r.ok and r.stdout.splitlines() == ["ok"] + [os.strerror(97)] * 3, r  # EAFNOSUPPORT
    before = [r.stdout for r in sb.run_many([SNMP] * 2)]
    sb.run_many([SEND_37] * 2)
    assert [r.stdout for r in sb.run_many([SNMP] * 2)] == before
    _host_ok(sb, pid)


def test_a_self_sent_sigxcpu_is_that_signal_not_a_timeout(sb):
    pid = sb.server_pid
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)"
    r = sb.run(code)
    assert r.status == f"signal:{signal.SIGXCPU}" == f"signal:{-_reference(code).returncode}", r
    _host_ok(sb, pid)


def test_a_death_by_sigxcpu_or_sigkill_is_a_timeout_only_past_the_cpu_limit():
    from minir1ci.env.sandbox.client import _result
    msg = {"out": ("", "", 0), "err": ("", "", 0), "flooded": False, "timed_out": False, "duration": 1.0}
    for sig in (signal.SIGXCPU, signal.SIGKILL):  # the soft limit's signal, the hard limit's
        assert _result({**msg, "wait_status": sig, "cpu": [3.0, 3]}, Limits()).status == "timeout"
        assert _result({**msg, "wait_status": sig, "cpu": [0.01, 3]}, Limits()).status == f"signal:{sig}"


def test_sandboxes_on_one_host_get_disjoint_uids_by_default():
    with Sandbox(workers=2) as a, Sandbox(workers=2) as b:
        if not a.isolation["uid"]:
            pytest.skip("no unprivileged uid here")
        both = ["import os, time\ntime.sleep(0.1)\nprint(os.getuid())"] * 2  # on both slots at once
        uids = [{int(r.stdout) for r in box.run_many(both)} for box in (a, b)]
        assert len(uids[0] | uids[1]) == 4 and min(uids[0] | uids[1]) > 65535, uids
    with Sandbox(workers=2, uid_base=UID_BASE + 20):
        with pytest.raises(ValueError, match="uid_base"):  # a range another sandbox holds is refused
            Sandbox(workers=2, uid_base=UID_BASE + 21)
    with pytest.raises(ValueError, match="uid_base"):  # uid 0 would leave the code root
        Sandbox(uid_base=0)


# Scans the execution's own memory for the other executions' output and code, knowing only a prefix
# and the SHA-256 of each (the secrets themselves must not appear in the scanner's code); prints
# how many of them it found.
SCAN = """
import ctypes, hashlib
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: lets this uid open its own /proc/self/mem
prefix, digests, n = {prefix!r}, {digests!r}, {n}
found, chunk = set(), 16 << 20
with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split('-'))
        for at in range(lo, hi, chunk) if perms[0] == 'r' else ():
            try:
                mem.seek(at)
                data = mem.read(min(chunk + n, hi - at))
            except (OSError, ValueError, OverflowError):
                continue
            i = data.find(prefix)
            while i >= 0:
                found.add(hashlib.sha256(data[i:i + n]).hexdigest())
                i = data.find(prefix, i + 1)
print(len(found & set(digests)))
"""


def test_a_respawned_slot_inherits_no_output_or_code_of_other_executions():
    import hashlib
    import secrets
    prefix = b"minir1ci-leak-"
    out_secret, code_secret = (prefix + secrets.token_hex(16).encode() for _ in range(2))
    digests = [hashlib.sha256(s).hexdigest() for s in (out_secret, code_secret)]
    # the output is built at run time: the code holds the reversed body, the output the secret
    body = out_secret[len(prefix):].decode()
    leak = f"# {code_secret.decode()}\nprint('{prefix.decode()}' + '{body[::-1]}'[::-1])"
    scan = SCAN.format(prefix=prefix, digests=digests, n=len(out_secret))
    with Sandbox(Limits(timeout=20.0), workers=2, uid_base=UID_BASE + 12) as box:
        assert [r.stdout for r in box.run_many([leak] * 4)] == [out_secret.decode() + "\n"] * 4
        assert {r.status for r in box.run_many(["while True:\n    pass"] * 2, timeout=0.5)} == {"timeout"}
        r = box.run(scan)  # in a slot respawned after the timeouts
        assert (r.status, r.stdout) == ("ok", "0\n"), r
        r = box.run(leak.replace("print", "x = ") + "\n" + scan)  # the reference: finds its own secrets
        assert (r.status, r.stdout) == ("ok", "2\n"), r


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, 0.0, 3e6])
def test_bad_timeouts_are_refused_naming_the_limit(sb, timeout):
    with pytest.raises(ValueError, match="timeout"):
        sb.run("print(1)", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(timeout=timeout)
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(memory_bytes=0)


def test_a_session_with_a_budget_beyond_polls_range_runs(sb):
    pid = sb.server_pid  # 30 blocks of a day each: a deadline past what epoll accepts (24.8 days)
    out = sb.run_many(["x = 1"] * 30 + ["print(x)"], timeout=86400.0, session_ids=["long"] * 31)
    assert out[-1].stdout == "1\n"
    sb.end_session("long")
    _host_ok(sb, pid)


def test_server_restarts_transparently_after_being_killed(sb):
    pid = sb.server_pid
    results = []
    thread = __import__("threading").Thread(
        target=lambda: results.extend(sb.run_many(["import time\ntime.sleep(0.3)\nprint('done')"] * 2)))
    thread.start()
    time.sleep(0.15)
    os.kill(pid, signal.SIGKILL)
    thread.join(10)
    assert [r.stdout for r in results] == ["done\n"] * 2  # resent to a fresh server
    assert sb.server_pid not in (None, pid)
    _host_ok(sb, sb.server_pid, grace=2.0)  # the old server's inits die with it (PDEATHSIG)


def test_no_stray_process_and_server_memory_stable(sb):
    """Last in the file: the hostile cases above ran on this server (restarted once, just above)."""
    def rss() -> int:
        with open(f"/proc/{sb.server_pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    sb.run_many(["print(1)"] * 50)
    before = rss()
    sb.run_many(["import numpy as np\nprint(np.ones(10**6).sum())"] * 200
                + ["import sys\nsys.stdout.write('y' * 300000)"] * 50 + ["1 / 0"] * 50)
    assert rss() - before < 4096  # kB
    assert _strays(sb, UID_BASE) == []


def test_fallback_without_namespaces_still_reaps_everything():
    with Sandbox(Limits(timeout=1.0), workers=2, namespaces=False, uid_base=FALLBACK_UID_BASE) as box:
        assert not box.isolation["pid_ns"]
        pid = box.server_pid
        code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                "        time.sleep(1000)\n    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')")
        assert box.run(code).stdout == "parent done\n"
        _host_ok(box, pid, FALLBACK_UID_BASE)
        bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        assert box.run(bomb).status == "timeout"
        _host_ok(box, pid, FALLBACK_UID_BASE)
        assert box.run("open('f', 'w').write('x')\nimport os\nprint(os.listdir('.'))").stdout == "['f']\n"
