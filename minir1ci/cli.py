"""Helpers of rollout.py and evaluate.py: shared flags with range checks, a progress bar, and loading
the model and tasks. A bad input ends before any work with one stderr line `PROG: error: WHAT`,
exit 2 for a bad flag (argparse), 1 for a bad file, directory or device (`fail`)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def one_line(text: object) -> str:
    """A message on one line: a multi-line error's lines joined with '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(prog: str, message: object, status: int = 1):
    """Print `prog: error: message` as one stderr line and exit with `status`."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (argparse prints the usage block first)."""

    def error(self, message: str):
        fail(self.prog, message, status=2)


def checked(name: str, kind: type, bounds: tuple | None = None):
    """An argparse `type`: `kind(text)`, then the range check of config.py (the TrainConfig option
    `name`'s range, or `bounds`), so a flag and the option of the same name accept the same values."""
    from minir1ci.config import check_value

    def parse(text: str):
        try:
            value = kind(text)
            check_value(name, value, bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if "must" in str(e) else f"expects {kind.__name__}, got {text!r}")
        return value
    return parse


def add_rollout_args(ap: argparse.ArgumentParser, n: int, temperature: float) -> None:
    """The flags rollout.py and evaluate.py share; their defaults are RolloutParams' (but `temperature`)."""
    from minir1ci.config import POSITIVE
    from minir1ci.env.interpreter import RolloutParams as defaults

    ap.add_argument("--data", default=None, help="root holding symbench/ and bbh/ (default $MINIR1CI_DATA)")
    ap.add_argument("--split", default="test", choices=["train", "test", "all"], help="which questions")
    ap.add_argument("--n", type=checked("n", int, POSITIVE), default=n, help="samples per question")
    ap.add_argument("--limit", type=checked("limit", int, POSITIVE), default=None, help="questions per task")
    ap.add_argument("--temperature", type=checked("temperature", float), default=temperature, help="0 = greedy")
    ap.add_argument("--top_p", type=checked("top_p", float), default=defaults.top_p, help="nucleus sampling")
    ap.add_argument("--max_new_tokens", type=checked("max_new_tokens", int), default=defaults.max_new_tokens,
                    help="response budget, sampled and inserted tokens together")
    ap.add_argument("--max_code_calls", type=checked("max_code_calls", int), default=defaults.max_code_calls,
                    help="code blocks executed per trajectory")
    ap.add_argument("--exec_timeout", type=checked("exec_timeout", float), default=defaults.exec_timeout,
                    help="seconds per code block")
    ap.add_argument("--stateful_code", action="store_true",
                    help="a trajectory's code blocks share one interpreter session (earlier blocks replayed)")
    ap.add_argument("--no-interpreter", dest="use_code", action="store_false", help="text-only rollouts")
    ap.add_argument("--seed", type=int, default=0, help="sampling and question-subset seed")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16 or float16")


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse an output file whose directory is missing or not writable, or that is a directory."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist (for {path})")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}")


class ProgressBar:
    """`bar(done, total)` redraws one stderr line: count, percentage, rate, elapsed time."""

    def __init__(self, desc: str, unit: str = "traj"):
        self.desc, self.unit, self.t0, self.last_print = desc, unit, time.time(), 0.0
        self.tty = sys.stderr.isatty()

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


def load_inputs(prog: str, model: str, tasks: str, data: str | None, split: str, limit: int | None, seed: int,
                device: str, dtype: str, out: str | None = None):
    """(examples, model, tokenizer); every input (device, dtype, output file, checkpoint, tasks) is
    checked before the model loads, and a bad one exits through `fail`."""
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.checkpoint import check_checkpoint, load_pretrained
    from minir1ci.inference.devices import inference_dtype, pick_device

    try:
        where = pick_device(device)
        weights = inference_dtype(dtype, where)
        if out:
            check_output_file(out)
        check_checkpoint(model)
        examples = load_tasks(tasks, data_dir=data, split=None if split == "all" else split, limit=limit, seed=seed)
        loaded, tokenizer = load_pretrained(model, dtype=weights, device=where)
    except (OSError, ValueError) as e:
        fail(prog, e)
    return examples, loaded.eval(), tokenizer
