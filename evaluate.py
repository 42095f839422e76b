"""Evaluate a checkpoint on tasks, with or without the code interpreter.

    python evaluate.py --model PATH --tasks SPEC [--data DIR] [--limit N] [--n K] [--no-interpreter]
        [--temperature T] [--max_new_tokens M] [--out FILE.json]
    python evaluate.py --compare A.json B.json

Prints a per-task table (accuracy, pass@k, code-use rate, mean code calls, mean response tokens,
truncations) and the average over tasks; `--out` writes JSON with `tasks: {name: {...}}` and
`average`. Temperature defaults to 0.6, the paper's evaluation setting; questions come from the
test split.
"""
import json
import os
import sys

from minir1ci.cli import ArgumentParser, add_rollout_args, fail

PROG = "evaluate.py"


def main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF-format checkpoint or LoRA adapter directory")
    ap.add_argument("--tasks", default="builtin:all",
                    help="task spec, e.g. builtin:all or symbench:game24,bbh:navigate")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two summaries side by side")
    add_rollout_args(ap, n=1, temperature=0.6)
    args = ap.parse_args(argv)

    from minir1ci.env.evaluation import check_summary, format_comparison, format_table

    if args.compare:
        runs = []
        for path in args.compare:
            try:
                with open(path) as f:
                    runs.append(check_summary(json.load(f), path))
            except (OSError, ValueError) as e:   # JSONDecodeError is a ValueError
                fail(PROG, f"cannot read {path}: {e}")
        print(format_comparison(runs[0], runs[1], os.path.basename(args.compare[0]), os.path.basename(args.compare[1])))
        return 0
    if not args.model:
        ap.error("--model is required (or use --compare A.json B.json)")

    from minir1ci.cli import ProgressBar, load_inputs
    from minir1ci.env.evaluation import evaluate_examples
    from minir1ci.env.interpreter import rollout_params
    from minir1ci.env.sandbox import Sandbox

    examples, model, tokenizer = load_inputs(PROG, args.model, args.tasks, args.data, args.split, args.limit,
                                             args.seed, args.device, args.dtype, args.out)
    params = rollout_params(args, seed=args.seed)
    with Sandbox(timeout=params.exec_timeout) as sandbox:
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
