"""The whole R1-Code-Interpreter pipeline in miniature, on a CPU: `make demo`, `make ablations`.

0. pretraining of the tiny preset from scratch on the synthetic copy corpus (the stand-in for the
   pretrained checkpoint the paper starts from: the model learns to copy text, nothing of the tasks);
1. SFT from it, as the paper's: a teacher that answers 40% of the questions in text and the rest with
   code (`sft-teacher`, the RL start; the paper's GPT-4o trajectories mix both); with the same budget,
   every answer in text (`sft-text`, the text baseline) and every answer with code (`sft-oracle`: the
   best policy there is for these families, a reference no real teacher gives);
2. GRPO and PPO from `sft-teacher`, with the paper's 4p(1-p) curriculum (tiny preset);
3. evaluation of all five on held-out questions (the built-in families' test split), with the
   interpreter for the code models and without it for the text model: accuracy and code use per
   family, how often a trajectory calls code a second time and what for; and for the RL curves,
   every kept RL checkpoint evaluated greedily on a fixed subset of them.

Prints the table and each stage's time, writes `<out>/results.json`, PNG plots to docs/, and
rewrites the README's results section. `--ablations` then trains the RL runs that change one thing
against the demo's GRPO, each with two seeds (the demo's GRPO and PPO are seed 0), and writes
`<out>/ablations.json` and the README table (ablations.py); `--sft_seeds` trains the demo's SFT and
RL from other SFT seeds (sft_seeds.py). Every stage is an ordinary `train.py` run (started in a fork
of this process, which imports torch once for all of them), so each can be rerun or inspected on its
own. Seeds are fixed. Evaluation samples at temperature 0.6, the paper's
evaluation setting, 3 seeded samples per question; the greedy average is reported beside it.
`evaluate.py --seed 1 --limit 100 --n 3 --temperature 0.6 --max_new_tokens 160 --max_code_calls 2
--dtype float32` gives the same numbers.

    python demo.py [--out runs/demo] [--eval_limit 100] [--ablations] [--sft_seeds 1,2] [--no-readme]

Rerun, it resumes each stage from its run directory (a finished stage is kept; seeds and resumes
are exact, so the result is the one an uninterrupted run gives); delete --out for a fresh start.
"""
import argparse
import hashlib
import importlib
import json
import os
import re
import runpy
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PRETRAIN_STEPS = 500
SFT_STEPS = 400
RL_STEPS = 30
TEACHER_TEXT_SHARE = 0.4   # the share of questions the SFT teacher answers in text (see the README)
FAMILIES = ["mul", "add", "letters", "sort", "base", "date"]
EVAL_TEMPERATURE = 0.6
EVAL_SAMPLES = 3
EVAL_SEED = 1          # questions and sampling seeds of the held-out evaluation
CURVE_LIMIT = 30       # held-out questions per family for the RL curves (greedy)


LANES = 2   # jobs at a time, one thread each: on 2 cores two one-thread runs do 1.65x the work of one on two


def fork_job(cmd: list[str], log: Path) -> int:
    """`python *cmd` with its output in `log`, run in a fork of this process, which has imported torch and
    the package once (2-3 s of every job's start): the script runs as __main__ with its argv, as python
    runs it. Returns the child's pid. This process starts no threads, so the fork holds none."""
    sys.stdout.flush()   # else the child would write this process's buffered output into its log
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)   # line-buffered: the log shows each line
        sys.stderr = open(2, "w", buffering=1, closefd=False)   # as it is printed, in print order
        sys.argv = list(cmd)
        sys.path[0] = str(Path(cmd[0]).resolve().parent)
        runpy.run_path(cmd[0], run_name="__main__")
        code = 0
    except SystemExit as e:   # as python exits: None is 0, an int the status, anything else a message and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_jobs(jobs: list[tuple[str, list[str], set[str]]], logs: Path) -> dict[str, float]:
    """Run (name, command after `python`, names it waits for) jobs, LANES at a time, the first ready in
    list order next, each in a fork of this process (`fork_job`); each job's output goes to
    logs/<name>.log. A job's thread count is fixed in its command, so its result does not depend on what
    runs beside it. Returns each job's seconds."""
    for module in ("torch", "minir1ci.env.evaluation", "minir1ci.training.rl", "minir1ci.training.sft"):
        importlib.import_module(module)   # once here, for every job
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, times = list(jobs), {}, {}
    while pending or running:
        for name, cmd, after in [j for j in pending if j[2] <= times.keys()][:LANES - len(running)]:
            pending.remove((name, cmd, after))
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: python {' '.join(cmd)}", flush=True)
            running[name] = (fork_job(cmd, logs / f"{name}.log"), time.time())
        time.sleep(0.5)
        for name, (pid, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            if code := os.waitstatus_to_exitcode(status):
                sys.exit(f"demo.py: {name} failed (exit {code}); see {logs / (name + '.log')}")
            times[name] = time.time() - t0
            del running[name]
            print(f"[{time.strftime('%H:%M:%S')}] done {name} in {times[name]:.0f}s", flush=True)
    return times


def train(args: list[str], threads: int = 1) -> list[str]:
    return [str(ROOT / "train.py"), *args, f"--threads={threads}"]


def sft_job(out: Path, seed: int, text_share: float, run: Path) -> list[str]:
    """The command of an SFT run beside the demo's (the ablations' and sft_seeds.py's): from the demo's
    pretrain checkpoint in `out`, SFT_STEPS steps, with `seed` and the teacher's `text_share`, into `run`."""
    return train(["--stage=sft", "--preset=tiny", "--resume", f"--model={out / 'pretrain'}", f"--steps={SFT_STEPS}",
                  f"--seed={seed}", f"--text_fraction={text_share}", f"--out={run}"])


def require_demo(out: Path) -> None:
    """Exit, naming the run, unless `out` holds the demo's finished runs (what --ablations and --sft_seeds
    start from)."""
    for run in ("pretrain", "sft-teacher", "sft-oracle", "grpo", "ppo"):
        if not (out / run / "latest").exists():
            sys.exit(f"demo.py: {out / run} has no checkpoint; run `make demo` first")


def eval_job(run: Path, use_code: bool, limit: int, settings: str = "both") -> list[str]:
    """The command that evaluates the newest checkpoint of `run` (see `evaluate`), one thread."""
    return [str(ROOT / "demo.py"), "--evaluate", str(run), f"--eval_limit={limit}", f"--settings={settings}",
            *(["--no-code"] if not use_code else [])]


def latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def second_calls(trajs) -> dict:
    """How often a trajectory calls code a second time, and what for: after an error (a fix), the same
    program again, or another program after one that ran (a check, or the next part of the work)."""
    kinds = {"fix": 0, "same": 0, "other": 0}
    for t in trajs:
        if t.num_code_calls >= 2:
            first, second = t.code_blocks[:2]
            kind = "fix" if first["status"] != "ok" else "same" if first["code"] == second["code"] else "other"
            kinds[kind] += 1
    return {"share": sum(kinds.values()) / max(len(trajs), 1), **kinds}


def digest(ckpt: Path) -> str:
    """What a checkpoint's evaluation depends on: the names and bytes of its files (not the evaluations kept
    there, nor the optimizer's state), and for a LoRA adapter its base checkpoint's digest (the adapter
    holds only its own tensors)."""
    from minir1ci.inference import lora
    h = hashlib.sha256()
    for f in sorted(p for p in ckpt.iterdir() if p.is_file() and not p.name.startswith("demo-eval")
                    and not p.name.startswith("trainer_state")):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    if lora.is_adapter_dir(ckpt):
        h.update(digest(lora.adapter_config(ckpt)[1]).encode())
    return h.hexdigest()[:24]


def evaluate(ckpt: Path, use_code: bool, limit: int, settings: str = "both") -> dict:
    """{"sampled": summary at EVAL_TEMPERATURE, EVAL_SAMPLES per question, with "second_calls";
    "greedy": summary} (`settings`: both, or one of them) on the first `limit` test questions per
    family of seed EVAL_SEED, in fp32 (what evaluate.py --dtype float32 does). Kept in the checkpoint
    directory, so a rerun (or the ablations) reads it instead of evaluating again, and under the digest
    of its files in the run directory's `evals/`, so a checkpoint of the same bytes (the cold-start
    rows: RL that never updates leaves the pretrain weights) is evaluated once."""
    names = [f"demo-eval-{limit}{'' if settings == 'both' else '-' + settings}.json", f"demo-eval-{limit}.json"]
    own = [ckpt / n for n in names]   # either name: both settings hold either one
    for path in own:
        if path.exists():
            return json.loads(path.read_text())
    key = f"{digest(ckpt)}-{'code' if use_code else 'text'}"   # only when the checkpoint has no result of its own
    shared = [ckpt.parent.parent / "evals" / f"{key}-{n}" for n in names]
    for path in shared:
        if path.exists():
            return json.loads(path.read_text())
    import torch
    from minir1ci.config import TINY_TASKS
    from minir1ci.env.evaluation import evaluate_examples
    from minir1ci.env.interpreter import RolloutParams
    from minir1ci.env.sandbox import Sandbox
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.checkpoint import load_pretrained

    model, tok = load_pretrained(ckpt, dtype=torch.float32)
    examples = load_tasks(TINY_TASKS, split="test", limit=limit, seed=EVAL_SEED)
    out = {}
    with Sandbox(timeout=5.0) as sb:
        for key, temperature, n in (("sampled", EVAL_TEMPERATURE, EVAL_SAMPLES), ("greedy", 0.0, 1)):
            if settings not in ("both", key):
                continue
            params = RolloutParams(temperature=temperature, max_new_tokens=160, max_code_calls=2, use_code=use_code,
                                   seed=EVAL_SEED)
            out[key], trajs = evaluate_examples(model.eval(), tok, sb, examples, n, params)
            out[key]["second_calls"] = second_calls(trajs)
    for path in (own[0], shared[0]):   # whole or absent: an evaluation starting beside this one may read it
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)
    return out


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(RL steps done, checkpoint dir) of every step-* dir kept in `run`."""
    return sorted((int(p.name.removeprefix("step-")) + 1, p) for p in run.glob("step-*") if p.is_dir())


def curves(start: Path, runs: dict) -> dict:
    """{name: [(RL step, greedy summary on CURVE_LIMIT questions per family)]}, step 0 = `start`."""
    first = evaluate(start, True, CURVE_LIMIT, "greedy")["greedy"]
    return {name: [(0, first)] + [(s, evaluate(p, True, CURVE_LIMIT, "greedy")["greedy"])
                                  for s, p in checkpoints(run)] for name, run in runs.items()}


def plot(runs: dict, curve: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run in runs.items():
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        ax.plot([r["step"] + 1 for r in rows], [r["reward"] for r in rows], label=f"{name} reward", marker=".")
        ax.plot([r["step"] + 1 for r in rows], [r["code_use"] for r in rows], "--", label=f"{name} code use")
    ax.set_xlabel("RL step")
    ax.set_title("sampled trajectories during RL (T=1.0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "rl_reward.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(curve), figsize=(6 * len(curve), 7), sharex=True, sharey="row", squeeze=False)
    for col, (name, points) in enumerate(curve.items()):
        steps = [s for s, _ in points]
        for row, (key, label) in enumerate((("accuracy", "held-out accuracy"), ("code_use", "code use"))):
            ax = axes[row][col]
            for fam in FAMILIES:
                ax.plot(steps, [100 * m["tasks"][f"builtin:{fam}"][key] for _, m in points], marker=".", label=fam)
            ax.plot(steps, [100 * m["average"][key] for _, m in points], "k-", lw=2, label="average")
            ax.set_title(f"{name}: {label} per family (greedy, {CURVE_LIMIT} per family)", fontsize=9)
            ax.grid(alpha=0.3)
            axes[row][0].set_ylabel("%")
        axes[1][col].set_xlabel("RL step")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out / "rl_heldout.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def table(results: dict) -> str:
    """Accuracy / code use (%) per family and model, then the averages."""
    names = list(results)
    lines = ["| family | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    sampled = {n: results[n]["sampled"] for n in names}
    for fam in FAMILIES:
        cells = [sampled[n]["tasks"][f"builtin:{fam}"] for n in names]
        lines.append(f"| {fam} | " + " | ".join(f"{100 * c['accuracy']:.1f} / {100 * c['code_use']:.0f}" for c in cells)
                     + " |")
    rows = (("**average accuracy** / code use", lambda n: f"**{100 * sampled[n]['average']['accuracy']:.1f}** / "
                                                          f"{100 * sampled[n]['average']['code_use']:.0f}"),
            ("average accuracy, greedy", lambda n: f"{100 * results[n]['greedy']['average']['accuracy']:.1f}"),
            ("mean code calls", lambda n: f"{sampled[n]['average']['code_calls']:.2f}"),
            ("second code call: share of trajectories", lambda n: f"{100 * sampled[n]['second_calls']['share']:.1f}"),
            ("second call after an error / same program / another program",
             lambda n: "{fix} / {same} / {other}".format(**sampled[n]["second_calls"])))
    lines += [f"| {label} | " + " | ".join(cell(n) for n in names) + " |" for label, cell in rows]
    return "\n".join(lines)


def update_readme(text: str, name: str = "results") -> None:
    """Replace the README block between `<!-- name:start -->` and `<!-- name:end -->` (or put it
    at the top of the Results section)."""
    readme = ROOT / "README.md"
    body = readme.read_text()
    block = f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->"
    if f"<!-- {name}:start -->" in body:
        body = re.sub(f"<!-- {name}:start -->.*?<!-- {name}:end -->", lambda _: block, body, flags=re.S)
    else:
        body = body.replace("## Results\n", "## Results\n\n" + block + "\n", 1)
    readme.write_text(body)


def fmt_times(times: dict) -> str:
    return ", ".join(f"{k} {v:.0f}s" for k, v in times.items())


def host_note() -> str:
    """The machine: its CPU's matrix units as torch sees them, and the load average (other jobs share
    the 2 cores and slow every stage)."""
    import torch
    caps = torch.cpu.get_capabilities()
    units = [k for k in ("amx_bf16", "avx512_bf16", "avx512_f", "avx2") if caps.get(k)]
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    return f"CPU {caps.get('cpu_name', '?')} ({', '.join(units) or 'no vector units listed'}), load average {load}"


def main() -> int:
    ap = argparse.ArgumentParser(description="the CPU demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--eval_limit", type=int, default=100, help="held-out questions per family")
    ap.add_argument("--ablations", action="store_true", help="the ablation table (after the demo)")
    ap.add_argument("--rows", default="", help="with --ablations: only these rows (comma list of keys)")
    ap.add_argument("--sft_seeds", metavar="S,S", help="after the demo: its SFT and RL from these SFT seeds too")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    ap.add_argument("--evaluate", metavar="RUN", help="(a demo job) evaluate RUN's newest checkpoint into its cache")
    ap.add_argument("--curve", action="store_true", help="with --evaluate: every kept checkpoint, greedy")
    ap.add_argument("--no-code", dest="use_code", action="store_false", help="with --evaluate: text only")
    ap.add_argument("--settings", choices=["both", "sampled", "greedy"], default="both", help="with --evaluate")
    args = ap.parse_args()
    out = Path(args.out)
    if args.evaluate:
        import torch
        torch.set_num_threads(1)
        run = Path(args.evaluate)
        for ckpt in ([p for _, p in checkpoints(run)] if args.curve else [latest(run)]):
            evaluate(ckpt, args.use_code, args.eval_limit, args.settings)
        return 0
    if args.sft_seeds:
        from sft_seeds import sft_seeds
        try:
            seeds = sorted({0, *(int(x) for x in args.sft_seeds.split(","))})
        except ValueError:
            ap.error(f"--sft_seeds expects a comma list of seeds, got {args.sft_seeds!r}")
        if min(seeds) < 0:
            ap.error(f"--sft_seeds: seeds are >= 0, got {args.sft_seeds!r}")
        return sft_seeds(out, seeds, args.eval_limit)
    if args.ablations:
        from ablations import ablations
        return ablations(out, args.eval_limit, args.readme, args.rows)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # --resume: a demo stopped part-way (Ctrl-C) picks up where it stopped, and a finished stage is
    # kept as it is (its run directory holds the final checkpoint); delete --out to start afresh.
    common = ["--preset=tiny", "--seed=0", "--resume"]
    sft = ["--stage=sft", f"--model={out / 'pretrain'}", f"--steps={SFT_STEPS}", *common]   # a run: its newest
    # GRPO and PPO start from one checkpoint with one seed: the curriculum's measurement is made once (by
    # the run that starts first) and read by the other from the cache
    rl = [f"--model={out / 'sft-teacher'}", f"--steps={RL_STEPS}", f"--curriculum_cache={out / 'curriculum'}", *common]
    n = args.eval_limit
    jobs = [  # (name, command, what it waits for), started in this order as lanes free up
        ("pretrain", train(["--stage=pretrain", f"--out={out / 'pretrain'}", f"--steps={PRETRAIN_STEPS}", *common],
                           threads=LANES), set()),
        ("sft-teacher", train([*sft, f"--out={out / 'sft-teacher'}", f"--text_fraction={TEACHER_TEXT_SHARE}"]),
         {"pretrain"}),
        ("sft-text", train([*sft, f"--out={out / 'sft-text'}", "--use_code=false"]), {"pretrain"}),
        ("grpo", train(["--stage=grpo", f"--out={out / 'grpo'}", *rl]), {"sft-teacher"}),
        ("sft-oracle", train([*sft, f"--out={out / 'sft-oracle'}"]), {"pretrain"}),
        ("ppo", train(["--stage=ppo", f"--out={out / 'ppo'}", *rl]), {"sft-teacher"}),
        ("eval-sft-text", eval_job(out / "sft-text", False, n), {"sft-text"}),
        ("eval-sft-teacher", eval_job(out / "sft-teacher", True, n), {"sft-teacher"}),
        ("eval-sft-oracle", eval_job(out / "sft-oracle", True, n), {"sft-oracle"}),
        ("eval-grpo", eval_job(out / "grpo", True, n), {"grpo"}),
        ("eval-ppo", eval_job(out / "ppo", True, n), {"ppo"}),
        ("curve-start", eval_job(out / "sft-teacher", True, CURVE_LIMIT, "greedy"), {"sft-teacher"}),
        ("curve-grpo", [*eval_job(out / "grpo", True, CURVE_LIMIT, "greedy"), "--curve"], {"grpo"}),
        ("curve-ppo", [*eval_job(out / "ppo", True, CURVE_LIMIT, "greedy"), "--curve"], {"ppo"}),
    ]
    times = run_jobs(jobs, out / "logs")
    start = latest(out / "sft-teacher")
    results = {
        "text-only SFT": evaluate(latest(out / "sft-text"), False, n),
        "teacher SFT (RL start)": evaluate(start, True, n),
        "+GRPO": evaluate(latest(out / "grpo"), True, n),
        "+PPO": evaluate(latest(out / "ppo"), True, n),
        "oracle SFT (reference)": evaluate(latest(out / "sft-oracle"), True, n),
    }
    rl_runs = {"GRPO": out / "grpo", "PPO": out / "ppo"}
    curve = curves(start, rl_runs)
    (out / "results.json").write_text(json.dumps({**results, "eval_limit": n, "curves": curve, "times": times},
                                                 indent=2))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    plots = [p.relative_to(ROOT) for p in plot(rl_runs, curve, docs)]
    total = time.time() - t_start
    tbl = table(results)
    print(f"\nHeld-out accuracy / code use (%), built-in test split, {n} per family, temperature "
          f"{EVAL_TEMPERATURE}, {EVAL_SAMPLES} samples per question (greedy average below):\n" + tbl)
    print(f"\ntimes: {fmt_times(times)}; total {total / 60:.1f} min, {LANES} jobs at a time; {host_note()}")
    if args.readme:
        update_readme(f"`make demo`, seeds fixed, {n} held-out questions per family, {EVAL_SAMPLES} samples each at "
                      f"temperature {EVAL_TEMPERATURE} (the paper's evaluation temperature), plus the greedy "
                      f"average; each cell is accuracy / code use (%); RL {RL_STEPS} steps from the teacher SFT; "
                      f"total {total / 60:.1f} min, {LANES} jobs at a time ({fmt_times(times)}; {host_note()})."
                      f"\n\n{tbl}\n\n" + " ".join(f"![{p.stem}]({p.as_posix()})" for p in plots)
                      + f"\n\nThe curves evaluate every kept RL checkpoint (every 5 steps) greedily on the first "
                      f"{CURVE_LIMIT} of the same held-out questions per family (cheaper than the table's "
                      f"evaluation); step 0 is the teacher SFT checkpoint.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
