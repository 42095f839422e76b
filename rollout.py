"""Sample code-interpreter trajectories and write them as JSONL.

    python rollout.py --model PATH --tasks SPEC [--data DIR] --n 5 --limit N --out FILE.jsonl \
        [--temperature T] [--top_p P] [--max_new_tokens M] [--max_code_calls K] [--no-interpreter]

One JSON line per trajectory: prompt_ids, response_ids, loss_mask (1 = sampled by the model, 0 =
inserted interpreter output), logprobs (the sampler's, 0 on inserted tokens), reward, task, id,
num_code_calls, finish_reason, text, and code_blocks (each block's code and result). The lines can
be fed back to `train.py --stage sft --sft_data FILE.jsonl` (rejection sampling). A closing
summary gives tokens/s, executions/s, the code-call histogram and accuracy.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF-format checkpoint directory")
    ap.add_argument("--tasks", required=True, help="task spec, e.g. builtin:all or symbench:game24,bbh:navigate")
    ap.add_argument("--data", default=None, help="root holding symbench/ and bbh/")
    ap.add_argument("--split", default="test", choices=["train", "test", "all"])
    ap.add_argument("--n", type=int, default=5, help="samples per question")
    ap.add_argument("--limit", type=int, default=None, help="questions per task")
    ap.add_argument("--out", required=True, help="output JSONL file")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--max_code_calls", type=int, default=8)
    ap.add_argument("--exec_timeout", type=float, default=10.0)
    ap.add_argument("--no-interpreter", dest="use_code", action="store_false", help="text-only rollouts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    from minir1ci.cli import ProgressBar, load_examples_model_params
    from minir1ci.interpreter import prompt_ids, run_rollouts
    from minir1ci.rewards import RewardConfig, compute_reward
    from minir1ci.sandbox import Sandbox

    examples, model, tokenizer, params = load_examples_model_params(args)
    prompts = prompt_ids(tokenizer, examples, args.use_code)
    t0 = time.time()
    with Sandbox(timeout=args.exec_timeout) as sandbox:
        trajs = run_rollouts(model, tokenizer, sandbox, prompts, args.n, params,
                             progress=ProgressBar("rollout", "traj"))
    elapsed = time.time() - t0
    tmp = args.out + ".tmp"
    rcfg = RewardConfig()
    correct = []
    with open(tmp, "w") as f:
        for i, tr in enumerate(trajs):
            ex = examples[i // args.n]
            score = ex.score(tr.text)
            correct.append(score)
            rec = {"task": ex.task, "id": ex.id, "prompt_ids": tr.prompt_ids, "response_ids": tr.response_ids,
                   "loss_mask": tr.loss_mask, "logprobs": tr.logprobs, "reward": compute_reward(score, tr.turns, rcfg),
                   "score": score, "num_code_calls": tr.num_code_calls, "finish_reason": tr.finish_reason,
                   "text": tr.text, "code_blocks": tr.code_blocks}
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, args.out)
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
