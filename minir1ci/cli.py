"""Small helpers shared by the command-line scripts (rollout.py, evaluate.py): a progress bar,
loading a model with clear errors, and the device choice made once, at the edge."""
from __future__ import annotations

import sys
import time

import torch


class ProgressBar:
    """`bar(done, total)` redraws one stderr line: count, percentage, rate, elapsed time."""

    def __init__(self, desc: str, unit: str = "traj"):
        self.desc, self.unit, self.t0 = desc, unit, time.time()
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if not (done == total or now - self.last_print > (0.2 if self.tty else 5.0)):
            return
        self.last_print = now
        elapsed = now - self.t0
        width = 24
        filled = int(width * done / max(total, 1))
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"{done / max(elapsed, 1e-9):.1f} {self.unit}/s {elapsed:.0f}s")
        print(("\r" + line) if self.tty else line, end="\n" if (done == total or not self.tty) else "",
              file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    from .devices import resolve_device
    return resolve_device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA and on CPUs with bf16 matrix units, fp32 otherwise (devices.py)."""
    from .devices import inference_dtype
    return inference_dtype(name, device)


def load_examples_model_params(args):
    """What rollout.py and evaluate.py both start from: the tasks of `--tasks/--split/--limit`, the
    model and tokenizer of `--model`, and the RolloutParams of the sampling flags. A bad task spec
    or model path exits with its error message."""
    from .interpreter import RolloutParams
    from .tasks import load_tasks

    try:
        examples = load_tasks(args.tasks, data_dir=args.data, split=None if args.split == "all" else args.split,
                              limit=args.limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    params = RolloutParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           max_code_calls=args.max_code_calls, use_code=args.use_code, seed=args.seed)
    return examples, model, tokenizer, params


def load_for_inference(path: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode; a bad path or checkpoint exits with its error message."""
    from .checkpoint import load_pretrained

    dev = pick_device(device)
    try:
        model, tokenizer = load_pretrained(path, dtype=pick_dtype(dtype, dev), device=dev)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: cannot load model from {path}: {e}")
    return model.eval(), tokenizer
