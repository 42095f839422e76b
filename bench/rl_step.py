"""One RL step of the tiny preset on a CPU: ours against TRL's GRPOTrainer, by phase, against the floor,
and against an earlier revision of this repository.

(a) single-turn GRPO (no interpreter) against TRL's `GRPOTrainer` (extra `minir1ci[bench]`) on the same
    work: trajectories per second of each side's optimizer step, and their ratio;
(b) our multi-turn GRPO step (the interpreter in the loop) split into its phases: rollouts, the no-grad
    log-prob passes, the update;
(c) the floor of (b): the time of the step's matrix products alone (every linear layer over the step's
    tokens, forward for each pass, forward and backward for the update), at the shapes the step had;
--against REV: the multi-turn step of REV (checked out in a temporary worktree), alternating with ours.

Both sides of (a) start from the same checkpoint (`--model`, default the demo's teacher SFT when it is
there, else the tiny preset's random weights) and take the same prompts (the tiny tasks' training
questions under the text-only system prompt, rendered by our chat template into one string that both
tokenize the same way), `--prompts` prompts x `--group` samples per step, the same response budget
(`--budget` tokens), temperature 1, KL coefficient (`--kl`, k3 against the starting weights on both
sides), learning rate, Adam betas and micro-batch size (TRL's per-device batch, with gradient
accumulation to the whole step: one generation and one optimizer step per step, as ours; each revision
of ours runs its own preset's micro-batch), the same
reward (correct +1, format +-0.1: our reward function, called by TRL on its completions), fp32, and
`--threads` threads. What differs, and why it is still the same work: TRL samples with HF `generate`
(the whole batch padded until its longest completion ends) where we run our continuous-batching
sampler, and it stops at the end-of-turn token where ours also stops at a closed <<<answer>>> (the
model ends its turn there); TRL normalises its loss per token over the step ("dapo", our token-mean).
Each side times its own optimizer steps: ours from `step_s` in metrics.jsonl, TRL's between its
callbacks' step begin and end (its generation is inside). The first step of each round is a warm-up.

    python bench/rl_step.py [--rounds 3 --steps 3] [--against REV] [--skip trl,floor]

Prints a table per part and a final JSON line with every figure, the ratios last.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model() -> str:
    latest = ROOT / "runs/demo/sft-teacher/latest"
    return str(latest.parent / latest.read_text().strip()) if latest.exists() else ""


def our_args(args, out: Path, steps: int, use_code: bool) -> list[str]:
    model = args.model or str(random_start(out.parent))
    return ["--stage=grpo", "--preset=tiny", f"--model={model}", f"--out={out}", f"--steps={steps}",
            f"--prompts_per_step={args.prompts}", f"--n_samples={args.group}", f"--batch_size={args.prompts * args.group}",
            f"--max_new_tokens={args.budget}", f"--kl_coef={args.kl}",
            f"--lr={args.lr}", "--curriculum=false", f"--save_every={steps}", "--device=cpu",
            f"--use_code={'true' if use_code else 'false'}", "--seed=0"]


def random_start(where: Path) -> Path:
    """The tiny preset's random weights, saved once (when no trained checkpoint is given)."""
    path = where / "tiny-random"
    if not path.exists():
        from minir1ci.inference.checkpoint import init_from_config, save_pretrained
        from minir1ci.presets import tiny_dir
        model, tok = init_from_config(tiny_dir(), seed=0)
        save_pretrained(model, tok, path)
    return path


def step_times(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return rows[1:]   # the first step warms up


def run_ours(args, work: Path, tag: str) -> list[dict]:
    """Our single-turn GRPO steps, in this process (train.py's code path), in a fresh run directory."""
    from minir1ci.config import resolve
    from minir1ci.training.rl import train_rl

    out = work / tag
    train_rl(resolve(our_args(args, out, args.steps, use_code=False)))
    return step_times(out)


def run_revision(args, work: Path, tree: Path, tag: str) -> list[dict]:
    """Multi-turn GRPO steps of the checkout at `tree` (this one, or --against's), as its own train.py."""
    out = work / tag
    cmd = [sys.executable, str(tree / "train.py"), *our_args(args, out, args.steps, True)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    return step_times(out)


def run_trl(args, work: Path, tag: str) -> list[float]:
    """TRL's GRPOTrainer on the same prompts, reward and settings; seconds per optimizer step."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from minir1ci.env.interpreter import prompt_ids
    from minir1ci.env.rewards import compute_reward
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.tokenizer import Tokenizer
    from minir1ci.config import TINY_TASKS

    model_dir = args.model or str(random_start(work))
    ours_tok = Tokenizer.from_pretrained(model_dir)
    examples = load_tasks(TINY_TASKS, split="train", limit=100, seed=0)
    prompts = [ours_tok.decode(p) for p in prompt_ids(ours_tok, examples, use_code=False)]
    data = Dataset.from_dict({"prompt": prompts, "idx": list(range(len(examples)))})

    def reward(prompts, completions, idx, **kw):
        return [compute_reward(examples[i].score(c), [c]) for c, i in zip(completions, idx)]

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=str(work / tag), per_device_train_batch_size=args.micro,
                     gradient_accumulation_steps=args.prompts * args.group // args.micro, num_generations=args.group,
                     max_completion_length=args.budget, temperature=1.0, top_p=1.0, beta=args.kl,
                     learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
                     warmup_steps=0, max_steps=args.steps, logging_steps=10_000, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0, loss_type="dapo",
                     gradient_checkpointing=False,   # TRL's default is on; our tiny preset's is off
                     dataloader_num_workers=0, disable_tqdm=True)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[clock])
    trainer.train()
    return clock.times[1:]


def floor_seconds(args, rows: list[dict]) -> float:
    """The matrix products alone of one multi-turn step: every linear layer (LM head included) over
    the step's tokens, forward in the two no-grad passes, forward and backward (2 more products) in
    the update, as fp32 `F.linear` calls at the tiny preset's shapes, timed here."""
    import torch
    import torch.nn.functional as F

    from minir1ci.inference.model import ModelConfig
    from minir1ci.presets import tiny_dir

    from minir1ci.config import TINY_TASKS
    from minir1ci.env.interpreter import prompt_ids
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.tokenizer import Tokenizer

    c = ModelConfig.from_json(tiny_dir())
    prompts = prompt_ids(Tokenizer.from_pretrained(tiny_dir()), load_tasks(TINY_TASKS, split="train", seed=0), True)
    prompt_len = sum(map(len, prompts)) / len(prompts)   # the mean prompt (system prompt and question) in tokens
    tokens = int((mean([r["response_len"] for r in rows]) + prompt_len) * args.prompts * args.group)
    shapes = [(c.hidden_size, c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim),
              (c.num_attention_heads * c.head_dim, c.hidden_size), (c.hidden_size, 2 * c.intermediate_size),
              (c.intermediate_size, c.hidden_size)] * c.num_hidden_layers + [(c.hidden_size, c.vocab_size)]
    x = {k: torch.randn(tokens, k) for k in {s[0] for s in shapes}}
    w = [torch.randn(n, k) for k, n in shapes]
    t0 = time.perf_counter()
    for _ in range(2 + 3):   # two no-grad passes; the update's forward, and its backward's two products
        for (k, n), wi in zip(shapes, w):
            F.linear(x[k], wi)
    return time.perf_counter() - t0


def mean(xs):
    return sum(xs) / max(len(xs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model(), help="tiny-preset checkpoint both sides start from")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side")
    ap.add_argument("--steps", type=int, default=3, help="steps per round (the first is a warm-up)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--budget", type=int, default=160, help="response tokens")
    ap.add_argument("--micro", type=int, default=None, help="TRL's per-device batch (default: our tiny preset's "
                    "micro-batch); each revision of ours runs its own preset's")
    ap.add_argument("--kl", type=float, default=0.001)
    ap.add_argument("--lr", type=float, default=4e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", default=None, help="a git revision whose multi-turn step to compare with")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: trl, multi, floor")
    args = ap.parse_args()
    from minir1ci.config import tiny
    args.micro = args.micro or tiny("grpo").micro_batch_size
    import torch
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    caps = {k: v for k, v in torch.cpu.get_capabilities().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    res = {"model": args.model or "tiny preset, random weights", "cpu": caps, "threads": args.threads}
    n = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        work, tree = Path(tmp), None
        if args.against:
            tree = work / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against],
                           check=True, capture_output=True)
        try:
            ours1, trl, multi, theirs = [], [], [], []
            per_round = []   # (our multi-turn step, theirs) of each round: the machine drifts between rounds
            for r in range(args.rounds):
                if "trl" not in skip:
                    ours1 += [x["step_s"] for x in run_ours(args, work, f"single-{r}")]
                    trl += run_trl(args, work, f"trl-{r}")
                if "multi" not in skip:
                    multi += run_revision(args, work, ROOT, f"multi-{r}")
                if tree is not None:
                    theirs += [x["step_s"] for x in run_revision(args, work, tree, f"against-{r}")]
                    if multi:
                        per_round.append((mean([x["step_s"] for x in multi[-(args.steps - 1):]]),
                                          mean(theirs[-(args.steps - 1):])))
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        if trl:
            res.update(ours_single_traj_s=n / mean(ours1), trl_traj_s=n / mean(trl),
                       ours_single_step_s=mean(ours1), trl_step_s=mean(trl))
            print(f"(a) single-turn GRPO, {args.prompts} prompts x {args.group}, {args.budget} tokens: "
                  f"ours {res['ours_single_traj_s']:.1f} traj/s ({mean(ours1):.2f} s/step), TRL {res['trl_traj_s']:.1f} "
                  f"traj/s ({mean(trl):.2f} s/step)")
        if multi:
            phases = {k: mean([x[k] for x in multi]) for k in ("step_s", "rollout_s", "passes_s", "update_s")}
            res.update({f"multi_{k}": v for k, v in phases.items()})
            print("(b) multi-turn GRPO step: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
                  + f"; response {mean([x['response_len'] for x in multi]):.0f} tokens, "
                    f"{mean([x['code_calls'] for x in multi]):.2f} code calls")
            if "floor" not in skip:
                res["floor_s"] = floor_seconds(args, multi)
                print(f"(c) its matrix products alone: {res['floor_s']:.2f} s")
        if theirs:
            res.update(against=args.against, against_step_s=mean(theirs))
            print(f"--against {args.against}: {mean(theirs):.2f} s per multi-turn step")
    if trl:
        res["traj_s_ratio_vs_trl"] = res["ours_single_traj_s"] / res["trl_traj_s"]
    if theirs and multi:
        res["step_time_ratio_per_round"] = [round(a / b, 3) for a, b in per_round]
        res["step_time_ratio_vs_against"] = res["multi_step_s"] / res["against_step_s"]
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
