"""Executions per second of the sandbox against a fresh `python -c` per call, measured in one run.

    python bench/sandbox.py [--n 1000] [--n-baseline 8] [--workers 2]
    python bench/sandbox.py --against ../other-checkout [--blocks 20] [--n 100]

Two snippets: a trivial one and a numpy one. Each is run one at a time (latency p50/p99 too) and
with `run_many` on `--workers` concurrent executions. The baseline starts a fresh interpreter per
call that imports the same modules the server preloads (the cost the fork server avoids), one at a
time and `--workers` at a time. The machine is shared: the load average before and after is printed,
and the CPU time the sandbox spends per execution (server, inits and executions), which does not
depend on the load: cores / that is the rate idle cores would sustain.
The last line is one JSON object: the sandbox's figures, the baseline's, and their ratios (last key).
`--against` compares this checkout's sandbox with another's instead, on a shared machine: each runs in
its own process, and blocks of `--n` executions (run_many, then one at a time) alternate between them
(ABBA), so both see the same load; medians over the blocks, and CPU per execution of each side's tree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


SIDE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from minir1ci.env.sandbox import Sandbox
with Sandbox(workers=int(sys.argv[2])) as sb:
    sb.run_many(["pass"] * 20)
    print(flush=True)
    for line in sys.stdin:  # a snippet and a count: the seconds of one run_many, then of each single run
        code, n = json.loads(line)
        t = time.perf_counter()
        assert all(r.ok for r in sb.run_many([code] * n))
        times = [time.perf_counter() - t]
        for _ in range(n):
            t = time.perf_counter()
            assert sb.run(code).ok
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)
"""


def bench_against(other: str, blocks: int, n: int, workers: int) -> dict:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sides = {name: subprocess.Popen([sys.executable, "-c", SIDE, os.path.abspath(path), str(workers)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, path in (("this", here), ("other", other))}
    for proc in sides.values():
        proc.stdout.readline()  # its sandbox is warm
    raw = {(side, name): ([], [], []) for side in sides for name in SNIPPETS}  # rates, latencies, CPU
    for block in range(blocks):
        for name, code in SNIPPETS.items():
            for side in (list(sides) if block % 2 == 0 else list(sides)[::-1]):
                cpu = _tree_cpu_s(sides[side].pid)
                sides[side].stdin.write(json.dumps([code, n]) + "\n")
                sides[side].stdin.flush()
                many, *latencies = json.loads(sides[side].stdout.readline())
                rates, lat, cpus = raw[side, name]
                rates.append(n / many)
                lat.extend(latencies)
                cpus.append(1e3 * (_tree_cpu_s(sides[side].pid) - cpu) / (2 * n))
    for proc in sides.values():
        proc.stdin.close()
        proc.wait()
    return {side: {name: {"many_per_s": statistics.median(raw[side, name][0]),
                          "p50_ms": 1e3 * _percentile(raw[side, name][1], 0.5),
                          "p99_ms": 1e3 * _percentile(raw[side, name][1], 0.99),
                          "cpu_ms_per_exec": statistics.median(raw[side, name][2])} for name in SNIPPETS}
            for side in sides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="executions per sandbox measurement")
    ap.add_argument("--n-baseline", type=int, default=8, help="calls per baseline measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--against", help="another checkout of minir1ci: an interleaved A/B instead")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per side and snippet with --against")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if args.against:
        return print_against(bench_against(args.against, args.blocks, args.n, args.workers), args, load_before[0])
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
    print(json.dumps({"load_before": round(load_before[0], 2), "load_after": round(load_after[0], 2),
                      "workers": args.workers,
                      "sandbox": {k: rnd(v) for k, v in sandbox.items()},
                      "baseline": {k: rnd(v) for k, v in baseline.items()},
                      "ratio": rnd(ratio)}))


def print_against(ab: dict, args: argparse.Namespace, load_before: float) -> None:
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; {args.blocks} interleaved "
          f"blocks of {args.n} per side and snippet; medians; CPU includes each side's client")
    print(f"{'':24s}{'run_many/s':>12s}{'p50 ms':>9s}{'p99 ms':>9s}{'CPU ms/exec':>13s}")
    for side, figures in ab.items():
        for name, f in figures.items():
            print(f"{side + ' ' + name:24s}{f['many_per_s']:12.1f}{f['p50_ms']:9.2f}{f['p99_ms']:9.2f}"
                  f"{f['cpu_ms_per_exec']:13.2f}")
    ratio = {f"{name}_many_per_s": ab["this"][name]["many_per_s"] / ab["other"][name]["many_per_s"]
             for name in SNIPPETS}
    print(json.dumps({"load_before": round(load_before, 2), "against": args.against,
                      **{side: {k: rnd(v) for k, v in f.items()} for side, f in ab.items()}, "ratio": rnd(ratio)}))


def rnd(d: dict) -> dict:
    return {k: round(v, 2) for k, v in d.items()}


if __name__ == "__main__":
    main()
