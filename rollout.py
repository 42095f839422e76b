"""Sample code-interpreter trajectories and write them as JSONL.

    python rollout.py --model PATH --tasks SPEC [--data DIR] --n 5 --limit N --out FILE.jsonl \
        [--temperature T] [--top_p P] [--max_new_tokens M] [--max_code_calls K] [--no-interpreter]
        [--reward_plain]

One JSON line per trajectory: prompt_ids, response_ids, loss_mask (1 = sampled by the model, 0 =
inserted interpreter output), logprobs (the sampler's, 0 on inserted tokens), reward, score, task,
id, num_code_calls, finish_reason, text, and code_blocks (each block's code and result). The lines
feed `train.py --stage sft --sft_data FILE.jsonl --sft_min_reward 1` (rejection sampling: the
trajectories whose reward reaches 1). Each line is written as its trajectory finishes, so a crash
keeps the finished ones; at the end the file is rewritten grouped by question (n lines per
question, in task order). A closing summary gives tokens/s, executions/s, the code-call histogram
and accuracy.
"""
import json
import os
import sys
import time
from collections import Counter

from minir1ci.cli import ArgumentParser, add_rollout_args

PROG = "rollout.py"


def main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF-format checkpoint or LoRA adapter directory")
    ap.add_argument("--tasks", required=True, help="task spec, e.g. builtin:all or symbench:game24,bbh:navigate")
    ap.add_argument("--out", required=True, help="output JSONL file")
    add_rollout_args(ap, n=5, temperature=1.0)
    ap.add_argument("--reward_plain", action="store_true", help="reward = correctness alone (no format or turn terms)")
    args = ap.parse_args(argv)

    from minir1ci.cli import ProgressBar, load_inputs
    from minir1ci.env.interpreter import prompt_ids, rollout_params, run_rollouts
    from minir1ci.env.rewards import RewardConfig, compute_reward
    from minir1ci.env.sandbox import Sandbox

    examples, model, tokenizer = load_inputs(PROG, args.model, args.tasks, args.data, args.split, args.limit,
                                             args.seed, args.device, args.dtype, args.out)
    params = rollout_params(args, seed=args.seed)
    prompts = prompt_ids(tokenizer, examples, params.use_code)
    rcfg = RewardConfig(plain=args.reward_plain)
    records: dict[int, str] = {}   # trajectory index -> its JSON line
    scores: dict[int, float] = {}

    def write(k: int, tr, f) -> None:
        """Score one finished trajectory and append its line at once, so a crash keeps it."""
        ex = examples[k // args.n]
        score = scores[k] = ex.score(tr.model_text)
        rec = {"task": ex.task, "id": ex.id, "prompt_ids": tr.prompt_ids, "response_ids": tr.response_ids,
               "loss_mask": tr.loss_mask, "logprobs": tr.logprobs, "reward": compute_reward(score, tr.turns, rcfg),
               "score": score, "num_code_calls": tr.num_code_calls, "finish_reason": tr.finish_reason,
               "text": tr.text, "code_blocks": tr.code_blocks}
        records[k] = json.dumps(rec) + "\n"
        f.write(records[k])
        f.flush()

    t0 = time.time()
    with open(args.out, "w") as f, Sandbox(timeout=params.exec_timeout) as sandbox:
        trajs = run_rollouts(model, tokenizer, sandbox, prompts, args.n, params,
                             progress=ProgressBar("rollout", "traj"), on_finish=lambda k, tr: write(k, tr, f))
    elapsed = time.time() - t0
    # Lines went out in finishing order; the finished file lists them grouped by question.
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(records[k] for k in range(len(trajs)))
    os.replace(tmp, args.out)
    correct = list(scores.values())
    sampled = sum(sum(t.loss_mask) for t in trajs)
    execs = sum(t.num_code_calls for t in trajs)
    hist = Counter(t.num_code_calls for t in trajs)
    print(f"wrote {len(trajs)} trajectories to {args.out} in {elapsed:.1f}s")
    print(f"  sampled tokens/s {sampled / elapsed:.1f}   executions/s {execs / elapsed:.1f}")
    print("  code calls: " + "  ".join(f"{k}:{hist[k]}" for k in sorted(hist)))
    print(f"  accuracy {sum(correct) / max(len(correct), 1):.3f}   finish: "
          + " ".join(f"{k}={v}" for k, v in Counter(t.finish_reason for t in trajs).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
