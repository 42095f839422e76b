"""The whole R1-Code-Interpreter pipeline in miniature, on a CPU: `make demo`, `make ablations`.

0. pretraining of the tiny preset from scratch on the synthetic copy corpus (the stand-in for the
   pretrained checkpoint the paper starts from: the model learns to copy text, nothing of the tasks);
1. SFT from it on the built-in tasks' oracle trajectories, every answer with code (`sft-code`: the
   best SFT set-up measured, so the start of RL, as in the paper);
2. the same SFT budget, from the same start, on text-only answers (`sft-text`, the text baseline);
3. GRPO and 4. PPO from `sft-code`, with the paper's 4p(1-p) curriculum (tiny preset);
5. evaluation of all four on held-out questions (the built-in families' test split), with the
   interpreter for the code models and without it for the text model; and for the RL curves, every
   kept RL checkpoint evaluated greedily on a fixed subset of them.

Prints the table (accuracy per task family, code-use rate, mean code calls), writes
`<out>/results.json`, PNG plots to docs/, and rewrites the README's results section.
`--ablations` then trains only the RL runs that differ from the demo's GRPO (interpreter output
unmasked, curriculum off, cold start from the pretrain checkpoint, bf16 rollouts with and without
TIS), reuses the demo's GRPO and PPO runs, and writes `<out>/ablations.json` and the README table.
Every stage is an ordinary `train.py` run, so each can be rerun or inspected on its own.
Seeds are fixed. Evaluation samples at temperature 0.6, the paper's evaluation setting, 3 seeded
samples per question; the greedy average is reported beside it. `evaluate.py --seed 1 --limit 100
--n 3 --temperature 0.6 --max_new_tokens 160 --max_code_calls 2` gives the same numbers.

    python demo.py [--out runs/demo] [--eval_limit 100] [--ablations] [--no-readme]

Rerun, it resumes each stage from its run directory (a finished stage is kept; seeds and resumes
are exact, so the result is the one an uninterrupted run gives); delete --out for a fresh start.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PRETRAIN_STEPS = 500
SFT_STEPS = 400
RL_STEPS = 30
FAMILIES = ["mul", "add", "letters", "sort", "base", "date"]
EVAL_TEMPERATURE = 0.6
EVAL_SAMPLES = 3
EVAL_SEED = 1          # questions and sampling seeds of the held-out evaluation
CURVE_LIMIT = 30       # held-out questions per family for the RL curves (greedy)


def train(args: list[str]) -> float:
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t0


def latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def evaluate(ckpt: Path, use_code: bool, limit: int, greedy_only: bool = False) -> dict:
    """{"sampled": summary at EVAL_TEMPERATURE, EVAL_SAMPLES per question; "greedy": summary}
    on the first `limit` test questions per family of seed EVAL_SEED. Kept in the checkpoint
    directory, so a rerun (or the ablations) reads it instead of evaluating again."""
    cache = ckpt / f"demo-eval-{limit}{'-greedy' if greedy_only else ''}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from minir1ci.inference.checkpoint import load_pretrained
    from minir1ci.config import TINY_TASKS
    from minir1ci.env.evaluation import evaluate_examples
    from minir1ci.env.interpreter import RolloutParams
    from minir1ci.env.sandbox import Sandbox
    from minir1ci.env.tasks import load_tasks

    model, tok = load_pretrained(ckpt)
    examples = load_tasks(TINY_TASKS, split="test", limit=limit, seed=EVAL_SEED)
    settings = (("greedy", 0.0, 1),) if greedy_only else (("sampled", EVAL_TEMPERATURE, EVAL_SAMPLES),
                                                          ("greedy", 0.0, 1))
    out = {}
    with Sandbox(timeout=5.0) as sb:
        for key, temperature, n in settings:
            params = RolloutParams(temperature=temperature, max_new_tokens=160, max_code_calls=2, use_code=use_code,
                                   seed=EVAL_SEED)
            out[key], _ = evaluate_examples(model.eval(), tok, sb, examples, n, params)
    cache.write_text(json.dumps(out))
    return out


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(RL steps done, checkpoint dir) of every step-* dir kept in `run`."""
    return sorted((int(p.name.removeprefix("step-")) + 1, p) for p in run.glob("step-*") if p.is_dir())


def curves(start: Path, runs: dict) -> dict:
    """{name: [(RL step, greedy summary on CURVE_LIMIT questions per family)]}, step 0 = `start`."""
    first = evaluate(start, True, CURVE_LIMIT, greedy_only=True)["greedy"]
    return {name: [(0, first)] + [(s, evaluate(p, True, CURVE_LIMIT, greedy_only=True)["greedy"])
                                  for s, p in checkpoints(run)] for name, run in runs.items()}


def plot(runs: dict, curve: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run in runs.items():
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        ax.plot([r["step"] + 1 for r in rows], [r["reward"] for r in rows], label=name, marker=".")
    ax.set_xlabel("RL step")
    ax.set_ylabel("training reward")
    ax.set_title("reward of sampled trajectories during RL (T=1.0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "rl_reward.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(curve), figsize=(6 * len(curve), 4), sharey=True, squeeze=False)
    for ax, (name, points) in zip(axes[0], curve.items()):
        steps = [s for s, _ in points]
        for fam in FAMILIES:
            ax.plot(steps, [100 * m["tasks"][f"builtin:{fam}"]["accuracy"] for _, m in points], marker=".", label=fam)
        ax.plot(steps, [100 * m["average"]["accuracy"] for _, m in points], "k-", lw=2, label="average")
        ax.plot(steps, [100 * m["average"]["code_use"] for _, m in points], "k--", label="code-use rate")
        ax.set_xlabel("RL step")
        ax.set_title(f"{name}: held-out accuracy per family (greedy, {CURVE_LIMIT} per family)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("%")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out / "rl_heldout.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def table(results: dict) -> str:
    names = list(results)
    head = "| family | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    sampled = {n: results[n]["sampled"] for n in names}
    for fam in FAMILIES:
        task = f"builtin:{fam}"
        lines.append(f"| {fam} | " + " | ".join(f"{100 * sampled[n]['tasks'][task]['accuracy']:.1f}" for n in names) + " |")
    rows = (("**average accuracy**", sampled, "accuracy", 100),
            ("average accuracy, greedy", {n: results[n]["greedy"] for n in names}, "accuracy", 100),
            ("code-use rate", sampled, "code_use", 100), ("mean code calls", sampled, "code_calls", 1))
    for label, summaries, key, scale in rows:
        fmt = "{:.1f}" if scale == 100 else "{:.2f}"
        lines.append(f"| {label} | " + " | ".join(fmt.format(scale * summaries[n]["average"][key]) for n in names) + " |")
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


def load_note() -> str:
    """The machine's load average (other jobs share the 2 cores and slow every stage)."""
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


# The ablations: (row, run dir under --out or None for a demo run, train.py arguments, the paper's finding).
PAPER_ABLATIONS = {
    "mask": "masking the interpreter output helps (R1-CI v1: training on it lowers accuracy and stability)",
    "curriculum": "the curriculum matters: GRPO 66.5 without, 72.4 with (v2, 14B; SFT 63.1)",
    "cold": "warm start (SFT, then RL) beats RL from the base model (v1)",
    "ppo": "GRPO beats PPO (v1)",
    "tis": "not in the paper (sampler/trainer mismatch correction, veRL and others)",
}


def ablations(out: Path, rl_steps: int, limit: int, readme: bool, train_runs: bool = True) -> int:
    """Train the RL runs that differ from the demo's GRPO, evaluate all rows, write the table.
    Without `train_runs`, a row whose run has not finished is reported as not run."""
    base, code, grpo, ppo = out / "pretrain", out / "sft-code", out / "grpo", out / "ppo"

    def need(*runs):
        for run in runs:
            if not (run / "latest").exists():
                sys.exit(f"demo.py: {run} has no checkpoint; run `make demo` first")

    need(base, code)
    t_start = time.time()
    common = ["--stage=grpo", "--preset=tiny", "--seed=0", "--resume", f"--steps={rl_steps}"]
    warm, cold = latest(code), latest(base)
    rows = [  # (label, run dir, start checkpoint and arguments beyond the demo's GRPO or None, paper key)
        ("GRPO (demo: masked, curriculum, warm start, fp32 rollouts)", grpo, None, ""),
        ("interpreter output unmasked (`--mask_tool_output=false`)", out / "abl-unmasked",
         (warm, ["--mask_tool_output=false"]), "mask"),
        ("curriculum off (`--curriculum=false`)", out / "abl-no-curriculum", (warm, ["--curriculum=false"]),
         "curriculum"),
        ("cold start: RL from the pretrain checkpoint", out / "abl-cold", (cold, []), "cold"),
        ("PPO instead of GRPO (demo)", ppo, None, "ppo"),
        ("bf16 rollouts, TIS on (cap 2)", out / "abl-bf16-tis", (warm, ["--rollout_dtype=bfloat16"]), "tis"),
        ("bf16 rollouts, TIS off (`--tis_cap=0`)", out / "abl-bf16-notis",
         (warm, ["--rollout_dtype=bfloat16", "--tis_cap=0"]), "tis"),
    ]
    times, results = {}, {}
    for label, run, change, _ in rows:
        if change is not None and train_runs:
            times[run.name] = train([*common, f"--model={change[0]}", f"--out={run}", *change[1]])
    done = [r for r in rows if (r[1] / "latest").exists() and latest(r[1]).name == f"step-{rl_steps - 1:06d}"]
    need(grpo, ppo)
    t0 = time.time()
    demo = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    same = demo.get("eval_limit") == limit      # the demo's own evaluation of its GRPO and PPO is reused
    for label, run, _, _ in done:
        key = {grpo: "+GRPO", ppo: "+PPO"}.get(run)
        results[label] = demo[key] if same and key in demo else evaluate(latest(run), True, limit)
    times["evaluation"] = time.time() - t0
    total = time.time() - t_start
    ref = results[rows[0][0]]["sampled"]["average"]["accuracy"]
    lines = ["| run | accuracy (T=0.6) | Δ vs GRPO | greedy | code-use rate | paper |", "|---|---|---|---|---|---|"]
    for label, run, _, key in rows:
        if label not in results:
            lines.append(f"| {label} | not run (time) | | | | {PAPER_ABLATIONS.get(key, '')} |")
            continue
        s, g = results[label]["sampled"]["average"], results[label]["greedy"]["average"]
        delta = "" if run == grpo else f"{100 * (s['accuracy'] - ref):+.1f}"
        lines.append(f"| {label} | {100 * s['accuracy']:.1f} | {delta} | {100 * g['accuracy']:.1f} | "
                     f"{100 * s['code_use']:.1f} | {PAPER_ABLATIONS.get(key, '')} |")
    tbl = "\n".join(lines)
    (out / "ablations.json").write_text(json.dumps(
        {label: {"run": str(run), "args": change and [f"--model={change[0]}", *change[1]], **results[label]}
         for label, run, change, _ in done}, indent=2))
    print(f"\nAblations (held-out, {limit} per family, T={EVAL_TEMPERATURE} x {EVAL_SAMPLES}; greedy beside):\n{tbl}")
    print(f"\ntimes: {fmt_times(times)}; total {total / 60:.1f} min; {load_note()}")
    if readme:
        update_readme(f"`make ablations` (`python demo.py --ablations`), after `make demo`: each row is one GRPO "
                      f"run of {rl_steps} steps from the demo's `sft-code` checkpoint (the cold start from "
                      f"`pretrain`) that changes one thing, evaluated as the main table ({limit} held-out "
                      f"questions per family). Total {total / 60:.1f} min ({fmt_times(times)}; {load_note()})."
                      f"\n\n{tbl}", "ablations")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="the CPU demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--eval_limit", type=int, default=100, help="held-out questions per family")
    ap.add_argument("--pretrain_steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    ap.add_argument("--rl_steps", type=int, default=RL_STEPS)
    ap.add_argument("--ablations", action="store_true", help="the ablation table (after the demo)")
    ap.add_argument("--no-train", dest="train_runs", action="store_false",
                    help="--ablations: report the finished runs only")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    args = ap.parse_args()
    out = Path(args.out)
    if args.ablations:
        return ablations(out, args.rl_steps, args.eval_limit, args.readme, args.train_runs)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    times = {}
    base, code, text = out / "pretrain", out / "sft-code", out / "sft-text"
    grpo, ppo = out / "grpo", out / "ppo"
    # --resume: a demo stopped part-way (Ctrl-C) picks up where it stopped, and a finished stage is
    # kept as it is (its run directory holds the final checkpoint); delete --out to start afresh.
    common = ["--preset=tiny", "--seed=0", "--resume"]
    times["pretrain"] = train(["--stage=pretrain", f"--out={base}", f"--steps={args.pretrain_steps}", *common])
    sft = ["--stage=sft", f"--model={latest(base)}", f"--steps={args.sft_steps}", *common]
    times["sft (code)"] = train([*sft, f"--out={code}"])
    times["sft (text)"] = train([*sft, f"--out={text}", "--use_code=false"])
    start = latest(code)
    times["grpo"] = train(["--stage=grpo", f"--model={start}", f"--out={grpo}", f"--steps={args.rl_steps}", *common])
    times["ppo"] = train(["--stage=ppo", f"--model={start}", f"--out={ppo}", f"--steps={args.rl_steps}", *common])
    t0 = time.time()
    results = {
        "text-only SFT": evaluate(latest(text), False, args.eval_limit),
        "code SFT (RL start)": evaluate(start, True, args.eval_limit),
        "+GRPO": evaluate(latest(grpo), True, args.eval_limit),
        "+PPO": evaluate(latest(ppo), True, args.eval_limit),
    }
    times["evaluation"] = time.time() - t0
    t0 = time.time()
    curve = curves(start, {"GRPO": grpo, "PPO": ppo})
    times["curves"] = time.time() - t0
    (out / "results.json").write_text(json.dumps({**results, "eval_limit": args.eval_limit, "curves": curve},
                                                 indent=2))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    plots = [p.relative_to(ROOT) for p in plot({"GRPO": grpo, "PPO": ppo}, curve, docs)]
    total = time.time() - t_start
    tbl = table(results)
    print(f"\nHeld-out accuracy (%), built-in test split, {args.eval_limit} per family, temperature "
          f"{EVAL_TEMPERATURE}, {EVAL_SAMPLES} samples per question (greedy average below it):\n" + tbl)
    print(f"\ntimes: {fmt_times(times)}; total {total / 60:.1f} min; {load_note()}")
    if args.readme:
        n = args.eval_limit
        text_block = (f"`make demo` on this repository's CPU machine (2 cores), seeds fixed, {n} held-out "
                      f"questions per family, {EVAL_SAMPLES} samples each at temperature {EVAL_TEMPERATURE} (the "
                      f"paper's evaluation temperature), plus the greedy average; RL {args.rl_steps} steps; "
                      f"total {total / 60:.1f} min ({fmt_times(times)}; {load_note()}).\n\n{tbl}\n\n"
                      + " ".join(f"![{p.stem}]({p.as_posix()})" for p in plots)
                      + f"\n\nThe curves evaluate every kept RL checkpoint (every 5 steps) greedily on the first "
                      f"{CURVE_LIMIT} of the same held-out questions per family (cheaper than the table's "
                      f"evaluation); step 0 is the code SFT checkpoint.")
        update_readme(text_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
