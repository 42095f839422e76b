"""Evaluation as the paper reports it: per-task metrics of n samples per question, and their average.

Per task: accuracy (mean score = pass@1), pass@k (unbiased, k = n), code use (share of trajectories
with a code call), mean code calls, mean response tokens, truncated (share stopped by the token
budget). The average is the unweighted mean over tasks, as in the paper's tables.
"""
from __future__ import annotations

import math
from collections import defaultdict

from minir1ci.env.interpreter import RolloutParams, prompt_ids, run_rollouts

COLUMNS = ("accuracy", "pass@k", "code_use", "code_calls", "response_tokens", "truncated")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(examples, trajs, n: int) -> dict:
    """{"tasks": {name: metrics}, "average": {...}} for trajectories grouped n per example."""
    per_task: dict[str, list] = defaultdict(list)
    for i, ex in enumerate(examples):
        group = trajs[i * n:(i + 1) * n]
        scores = [ex.score(t.model_text) for t in group]   # the model's own words only
        per_task[ex.task].append((scores, group))
    tasks = {}
    for name, items in sorted(per_task.items()):
        all_scores = [s for scores, _ in items for s in scores]
        all_trajs = [t for _, group in items for t in group]
        m = len(all_trajs)
        tasks[name] = {
            "questions": len(items),
            "samples": m,
            "accuracy": sum(all_scores) / m,
            "pass@k": sum(pass_at_k(n, sum(s >= 1.0 for s in scores), n) for scores, _ in items) / len(items),
            "code_use": sum(t.num_code_calls > 0 for t in all_trajs) / m,
            "code_calls": sum(t.num_code_calls for t in all_trajs) / m,
            "response_tokens": sum(len(t.response_ids) for t in all_trajs) / m,
            "truncated": sum(t.finish_reason == "length" for t in all_trajs) / m,
        }
    average = {c: sum(t[c] for t in tasks.values()) / max(len(tasks), 1) for c in COLUMNS}
    return {"n": n, "tasks": tasks, "average": average}


def evaluate_examples(model, tokenizer, sandbox, examples, n: int = 1, params: RolloutParams | None = None,
                      progress=None) -> tuple[dict, list]:
    """Run rollouts on `examples` and summarise. Returns (summary, trajectories)."""
    params = params or RolloutParams(temperature=0.6)
    prompts = prompt_ids(tokenizer, examples, params.use_code)
    trajs = run_rollouts(model, tokenizer, sandbox, prompts, n, params, progress=progress)
    return summarize(examples, trajs, n), trajs


def check_summary(obj, name: str) -> dict:
    """`obj` if it has the shape `summarize` writes; else ValueError naming the first bad field."""
    if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), dict):
        raise ValueError(f"{name}: not an evaluate.py summary (expected an object with 'tasks' and 'average')")
    rows = [(f"tasks[{task!r}]", row) for task, row in obj["tasks"].items()] + [("average", obj.get("average"))]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{name}: {where} must be an object of metrics")
        for c in COLUMNS:
            if not isinstance(row.get(c), (int, float)) or isinstance(row.get(c), bool):
                raise ValueError(f"{name}: {where}.{c} must be a number, got {row.get(c)!r}")
    return obj


def format_table(summary: dict, title: str = "") -> str:
    head = f"{'task':32s} " + " ".join(f"{c:>15s}" for c in COLUMNS)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    rows = list(summary["tasks"].items()) + [("AVERAGE", summary["average"])]
    lines += [f"{name[:32]:32s} " + " ".join(f"{m[c]:15.3f}" for c in COLUMNS) for name, m in rows]
    return "\n".join(lines)


def format_comparison(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Two summaries side by side: accuracy and code use per task, and the difference."""
    names = sorted(set(a["tasks"]) | set(b["tasks"]))
    head = f"{'task':32s} {name_a[:14]:>14s} {name_b[:14]:>14s} {'delta':>8s} {'code A':>8s} {'code B':>8s}"
    lines = [head, "-" * len(head)]
    missing = dict.fromkeys(COLUMNS, float("nan"))   # a task only one of the runs has
    for name in names + ["AVERAGE"]:
        ma = a["average"] if name == "AVERAGE" else a["tasks"].get(name, missing)
        mb = b["average"] if name == "AVERAGE" else b["tasks"].get(name, missing)
        lines.append(f"{name[:32]:32s} {ma['accuracy']:14.3f} {mb['accuracy']:14.3f} "
                     f"{mb['accuracy'] - ma['accuracy']:+8.3f} {ma['code_use']:8.3f} {mb['code_use']:8.3f}")
    return "\n".join(lines)
