"""What a run reports as it goes: the metrics log, where it stands when Ctrl-C stops it, and the stop
at a non-finite loss. `metrics.jsonl` (in the run directory) holds one JSON object per logged step."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from minir1ci.training import distributed as dist
from minir1ci.training.runs import latest_checkpoint


# Where this process's run stands, for train.py's report when it is interrupted: its directory, the last
# completed step (-1: none), whether SIGINT was seen (see catch_interrupts).
RUN = SimpleNamespace(run_dir=None, last_step=-1, interrupted=False)


def catch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python drops an exception
    raised while a finalizer or callback runs, so `MetricsLog.log` raises it again at the step's end."""
    def on_sigint(signum, frame):
        RUN.interrupted = True
        raise KeyboardInterrupt
    RUN.run_dir, RUN.last_step, RUN.interrupted = None, -1, False   # a new command: no run yet
    signal.signal(signal.SIGINT, on_sigint)


def interrupted_message() -> str:
    """train.py's one line for Ctrl-C: where the run stopped and what to resume from."""
    if RUN.run_dir is None:
        return "interrupted before training started; nothing was written"
    last = latest_checkpoint(RUN.run_dir)
    return (f"interrupted at step {RUN.last_step + 1}; last checkpoint {last.name if last else 'none'}; "
            "resume with --resume")


def check_finite(value: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite loss ({value}) at step {step}; stopping. The last good checkpoint is "
            f"{latest_checkpoint(run_dir) or '(none saved yet)'}; lower the learning rate or resume from it.")


class MetricsLog:
    """Append metrics to `metrics.jsonl` and print a one-line progress report (rank 0 only). Made as
    soon as the run directory is open: from then on Ctrl-C reports the run's step and checkpoint."""

    def __init__(self, run_dir: Path, total_steps: int, resume: bool, every: int = 1):
        self.enabled = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.total, self.every = total_steps, every
        self.t0 = time.time()
        RUN.run_dir, RUN.last_step = run_dir, -1
        if resume:   # lines after the checkpoint resumed from belong to the interrupted part: dropped
            last = latest_checkpoint(run_dir)
            RUN.last_step = int(last.name.removeprefix("step-")) if last else -1
            if self.enabled and self.path.exists():
                lines = [l for l in self.path.read_text().splitlines() if l.strip()]
                self.path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= RUN.last_step))

    def log(self, step: int, metrics: dict) -> None:
        """Record `step` as completed; write it every `every` steps and at the last."""
        if RUN.interrupted:   # a Ctrl-C whose KeyboardInterrupt was swallowed on its way up
            raise KeyboardInterrupt
        RUN.last_step = step
        if not self.enabled or (step % self.every and step != self.total - 1):
            return
        # 6 significant digits, not 6 decimals: a bf16 sampler's mismatch KL with CPU bf16 units is ~1e-7
        rec = {"step": step, **{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        elapsed = time.time() - self.t0
        bar_len = 20
        done = int(bar_len * (step + 1) / self.total)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if k in ("loss", "lr", "reward", "accuracy", "kl", "value_loss", "grad_norm", "tok_s"))
        print(f"[{'#' * done}{'.' * (bar_len - done)}] step {step + 1}/{self.total} {shown} ({elapsed:.0f}s)",
              file=sys.stderr, flush=True)
