"""The whole R1-Code-Interpreter pipeline in miniature, on a CPU: `make demo`.

0. pretraining of the tiny preset from scratch on the synthetic copy corpus (the stand-in for the
   pretrained checkpoint the paper starts from: the model learns to copy text, nothing of the tasks);
1. SFT from it on the built-in tasks' oracle trajectories, where, as in the paper's GPT-4o SFT set,
   not every answer uses code: 40% of the questions get the text-only answer (`text_fraction`);
2. the same SFT budget, from the same start, on text-only answers (the paper's text baseline);
3. GRPO and 4. PPO, each starting from the code SFT checkpoint;
5. evaluation of all four on held-out questions (the built-in families' test split), with the
   interpreter for the code models and without it for the text model.

Prints the table (accuracy per task family, code-use rate, mean code calls), writes PNG plots
of reward and accuracy during RL to docs/, and rewrites the README's results section.
Every stage is an ordinary `train.py` run, so each can be rerun or inspected on its own.
Seeds are fixed. Evaluation samples at temperature 0.6, the paper's evaluation setting, 3 seeded
samples per question; the greedy average is reported beside it.

    python demo.py [--out runs/demo] [--eval_limit 40] [--no-readme]

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
RL_STEPS = 25
FAMILIES = ["mul", "add", "letters", "sort", "base", "date"]


def train(args: list[str]) -> float:
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t0


def latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


EVAL_TEMPERATURE = 0.6
EVAL_SAMPLES = 3


def evaluate(ckpt: Path, use_code: bool, limit: int) -> dict:
    """{"sampled": summary at EVAL_TEMPERATURE, EVAL_SAMPLES per question; "greedy": summary}."""
    from minir1ci.inference.checkpoint import load_pretrained
    from minir1ci.config import TINY_TASKS
    from minir1ci.env.evaluation import evaluate_examples
    from minir1ci.env.interpreter import RolloutParams
    from minir1ci.env.sandbox import Sandbox
    from minir1ci.env.tasks import load_tasks

    model, tok = load_pretrained(ckpt)
    examples = load_tasks(TINY_TASKS, split="test", limit=limit, seed=1)
    out = {}
    with Sandbox(timeout=5.0) as sb:
        for key, temperature, n in (("sampled", EVAL_TEMPERATURE, EVAL_SAMPLES), ("greedy", 0.0, 1)):
            params = RolloutParams(temperature=temperature, max_new_tokens=160, max_code_calls=2, use_code=use_code,
                                   seed=0)
            out[key], _ = evaluate_examples(model.eval(), tok, sb, examples, n, params)
    return out


def plot(runs: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in ("reward", "accuracy"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, run in runs.items():
            rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
            ax.plot([r["step"] + 1 for r in rows], [r[key] for r in rows], label=name, marker=".")
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"training {key}")
        ax.set_title(f"{key} of sampled trajectories during RL (tiny preset, CPU)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"rl_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
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


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    body = readme.read_text()
    block = f"<!-- results:start -->\n{text}\n<!-- results:end -->"
    if "<!-- results:start -->" in body:
        body = re.sub(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, body, flags=re.S)
    else:
        body = body.replace("## Results\n", "## Results\n\n" + block + "\n", 1)
    readme.write_text(body)


def main() -> int:
    ap = argparse.ArgumentParser(description="the CPU demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--eval_limit", type=int, default=40, help="held-out questions per family")
    ap.add_argument("--pretrain_steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    ap.add_argument("--rl_steps", type=int, default=RL_STEPS)
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    args = ap.parse_args()
    out = Path(args.out)
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
        "code SFT": evaluate(start, True, args.eval_limit),
        "+GRPO": evaluate(latest(grpo), True, args.eval_limit),
        "+PPO": evaluate(latest(ppo), True, args.eval_limit),
    }
    times["evaluation"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    plots = [p.relative_to(ROOT) for p in plot({"GRPO": grpo, "PPO": ppo}, docs)]
    total = time.time() - t_start
    tbl = table(results)
    print(f"\nHeld-out accuracy (%), built-in test split, temperature {EVAL_TEMPERATURE}, {EVAL_SAMPLES} samples "
          "per question (greedy average below it):\n" + tbl)
    print("\ntimes: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    if args.readme:
        n = args.eval_limit
        text_block = (f"`make demo` on this repository's CPU machine (2 cores), seeds fixed, {n} held-out "
                      f"questions per family, {EVAL_SAMPLES} samples each at temperature {EVAL_TEMPERATURE} (the "
                      f"paper's evaluation temperature), plus the greedy average; total {total / 60:.1f} min "
                      f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())}).\n\n{tbl}\n\n"
                      + " ".join(f"![{p.stem}]({p.as_posix()})" for p in plots))
        update_readme(text_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
