"""Executions per second of the sandbox against a fresh `python -c` per call, measured in one run.

    python bench/sandbox.py [--n 1000] [--n-baseline 8] [--workers 2]

Two snippets: a trivial one and a numpy one. Each is run one at a time (latency p50/p99 too) and
with `run_many` on `--workers` concurrent executions. The baseline starts a fresh interpreter per
call that imports the same modules the server preloads (the cost the fork server avoids), one at a
time and `--workers` at a time. The machine is shared: the load average before and after is printed,
and the CPU time the sandbox spends per execution (server, inits and executions), which does not
depend on the load: cores / that is the rate idle cores would sustain.
The last line is one JSON object: the sandbox's figures, the baseline's, and their ratios (last key).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minir1ci.env.sandbox import Sandbox  # noqa: E402

SNIPPETS = {
    "trivial": "print(1 + 1)",
    "numpy": "import numpy as np\nprint(np.arange(10).sum())",
}
IMPORTS = "import math, itertools, collections, re, json, fractions, decimal, numpy, sympy\n"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of the server and its descendants (zygote, slot inits), with the executions
    they reaped."""
    procs = {}  # pid -> (parent's pid, CPU ticks)
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # utime .. cstime
    tree, grew = {pid}, True
    while grew:
        new = {p for p, (ppid, _) in procs.items() if ppid in tree} - tree
        tree, grew = tree | new, bool(new)
    return sum(procs[p][1] for p in tree if p in procs) / os.sysconf("SC_CLK_TCK")


def bench_sandbox(sb: Sandbox, code: str, n: int) -> dict:
    latencies = []
    for _ in range(n // 3):  # one at a time
        t = time.perf_counter()
        assert sb.run(code).ok
        latencies.append(time.perf_counter() - t)
    cpu, t = _tree_cpu_s(sb.server_pid), time.perf_counter()
    results = sb.run_many([code] * n)
    many, cpu = time.perf_counter() - t, _tree_cpu_s(sb.server_pid) - cpu
    assert all(r.ok for r in results)
    return {"serial_per_s": len(latencies) / sum(latencies), "p50_ms": 1e3 * _percentile(latencies, 0.5),
            "p99_ms": 1e3 * _percentile(latencies, 0.99), "many_per_s": n / many,
            "cpu_ms_per_exec": 1e3 * cpu / n}  # load-independent: cores / this = rate on idle cores


def bench_baseline(code: str, n: int, workers: int) -> dict:
    def once(_=None) -> float:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", IMPORTS + code], capture_output=True, text=True,
                             env={"PATH": os.environ.get("PATH", "/usr/bin"), "OPENBLAS_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        return time.perf_counter() - t
    latencies = [once() for _ in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(once, range(n)))
    many = time.perf_counter() - t
    return {"serial_per_s": n / sum(latencies), "p50_ms": 1e3 * _percentile(latencies, 0.5),
            "p99_ms": 1e3 * _percentile(latencies, 0.99), "many_per_s": n / many}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="executions per sandbox measurement")
    ap.add_argument("--n-baseline", type=int, default=8, help="calls per baseline measurement")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    load_before = os.getloadavg()
    sandbox, baseline = {}, {}
    with Sandbox(workers=args.workers) as sb:
        sb.run_many(["pass"] * 20)  # start and warm the server
        for name, code in SNIPPETS.items():
            sandbox[name] = bench_sandbox(sb, code, args.n)
    for name, code in SNIPPETS.items():
        baseline[name] = bench_baseline(code, args.n_baseline, args.workers)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores, shared); workers {args.workers}")
    print(f"{'':24s}{'serial/s':>10s}{'p50 ms':>9s}{'p99 ms':>9s}{'run_many/s':>12s}{'CPU ms/exec':>13s}")
    for side, figures in (("sandbox", sandbox), ("python -c", baseline)):
        for name, f in figures.items():
            cpu = f"{f['cpu_ms_per_exec']:13.2f}" if "cpu_ms_per_exec" in f else f"{'':>13s}"
            print(f"{side + ' ' + name:24s}{f['serial_per_s']:10.1f}{f['p50_ms']:9.1f}{f['p99_ms']:9.1f}"
                  f"{f['many_per_s']:12.1f}{cpu}")
    ratio = {f"{name}_{key}": sandbox[name][key] / baseline[name][key]
             for name in SNIPPETS for key in ("serial_per_s", "many_per_s")}
    rnd = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    print(json.dumps({"load_before": round(load_before[0], 2), "load_after": round(load_after[0], 2),
                      "workers": args.workers,
                      "sandbox": {k: rnd(v) for k, v in sandbox.items()},
                      "baseline": {k: rnd(v) for k, v in baseline.items()},
                      "ratio": rnd(ratio)}))


if __name__ == "__main__":
    main()
