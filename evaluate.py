"""Evaluate a checkpoint on tasks, with or without the code interpreter.

    python evaluate.py --model PATH --tasks SPEC [--data DIR] [--limit N] [--n K] [--no-interpreter]
        [--temperature T] [--max_new_tokens M] [--out FILE.json]
    python evaluate.py --compare A.json B.json

Prints a per-task table (accuracy, pass@k, code-use rate, mean code calls, mean response tokens,
truncations) and the average over tasks; `--out` writes JSON with `tasks: {name: {...}}` and
`average`. Temperature defaults to 0.6, the paper's evaluation setting; questions come from the
test split.
"""
import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--tasks", default="builtin:all")
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="test", choices=["train", "test", "all"])
    ap.add_argument("--limit", type=int, default=None, help="questions per task")
    ap.add_argument("--n", type=int, default=1, help="samples per question (pass@k uses k = n)")
    ap.add_argument("--no-interpreter", dest="use_code", action="store_false")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--max_code_calls", type=int, default=8)
    ap.add_argument("--exec_timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    from minir1ci.evaluation import format_comparison, format_table

    if args.compare:
        runs = []
        for path in args.compare:
            try:
                with open(path) as f:
                    runs.append(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                sys.exit(f"error: cannot read {path}: {e}")
        print(format_comparison(runs[0], runs[1], os.path.basename(args.compare[0]), os.path.basename(args.compare[1])))
        return 0
    if not args.model:
        ap.error("--model is required (or use --compare A.json B.json)")

    from minir1ci.cli import ProgressBar, load_examples_model_params
    from minir1ci.evaluation import evaluate_examples
    from minir1ci.sandbox import Sandbox

    examples, model, tokenizer, params = load_examples_model_params(args)
    with Sandbox(timeout=args.exec_timeout) as sandbox:
        summary, _ = evaluate_examples(model, tokenizer, sandbox, examples, args.n, params,
                                       progress=ProgressBar("evaluate", "traj"))
    summary.update(model=args.model, use_code=args.use_code, temperature=args.temperature, tasks_spec=args.tasks)
    mode = "with interpreter" if args.use_code else "text only"
    print(format_table(summary, f"{args.model} ({mode}, n={args.n}, T={args.temperature})"))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
