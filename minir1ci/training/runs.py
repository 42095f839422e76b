"""Run directories: input checks, the directory and its lock, checkpoints, `latest`, resume, the
metrics log, and which model a stage starts from.

Layout of `cfg.run_dir()`: config.json (the resolved TrainConfig), .lock (flock'ed by the training
writing here, its pid inside), metrics.jsonl (one JSON object per logged step), step-000100/ (an HF
checkpoint + trainer_state.pt), latest (names the newest complete step directory).

`start_run` checks every input and writes nothing; `open_run_dir` then creates and locks the
directory, deletes what a killed save left and saves the config, so a bad input leaves no run
directory. Under torchrun rank 0 checks and writes; the others raise rank 0's error. A step is
complete once `latest` (replaced atomically after the weights and the trainer state) names it.
Resuming is exact: every random choice derives from (seed, step) and the optimizer state is restored.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minir1ci.inference import checkpoint
from minir1ci.inference.devices import pick_device, train_autocast_dtype
from minir1ci.training import distributed as dist

LOCK_FILE = ".lock"


@dataclass
class RunState:
    """Where this process's run stands, for train.py's report when it is interrupted."""
    run_dir: Path | None = None
    last_step: int = -1        # the last completed step (-1: none)
    interrupted: bool = False  # SIGINT seen (see catch_interrupts)


RUN = RunState()
_LOCKS: dict[Path, object] = {}   # resolved run dir -> the open lock file this process holds


def start_run(cfg) -> torch.device:
    """Process group, device and seed, and every input checked; nothing is written."""
    global RUN
    RUN = RunState()
    dist.init(cfg.device)
    share = "prompts_per_step" if cfg.stage in ("grpo", "ppo") else "batch_size"
    dist.check_equal_shares(share, getattr(cfg, share))
    device = pick_device(cfg.device, dist.local_rank())
    _on_main(check_inputs, cfg, device)
    torch.manual_seed(cfg.seed)
    return device


def open_run_dir(cfg) -> Path:
    """Create the run directory, lock it for this process's life, clean it, save the config."""
    run_dir = cfg.run_dir()
    _on_main(_open_locked, run_dir, cfg)
    RUN.run_dir = run_dir
    return run_dir


def _on_main(fn, *args) -> None:
    """fn(*args) on rank 0 alone; an error it raises is raised on every rank (others would hang)."""
    error = None
    if dist.is_main():
        try:
            fn(*args)
        except (OSError, ValueError) as e:
            error = e
    message = dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)


def check_inputs(cfg, device: torch.device) -> None:
    """What a run reads, checked before it writes: dtype, run directory, start checkpoint, tasks."""
    from minir1ci.env.tasks import task_names

    train_autocast_dtype(cfg.dtype, device)      # an unknown dtype name raises here
    check_run_dir(cfg.run_dir(), cfg.resume)
    source, _ = start_source(cfg, latest_checkpoint)
    if source is not None:
        checkpoint.check_checkpoint(source)
    if cfg.stage == "sft" and cfg.sft_data:
        if not Path(cfg.sft_data).is_file():
            raise FileNotFoundError(f"SFT data file not found: {cfg.sft_data}")
    elif cfg.stage != "pretrain":
        task_names(cfg.tasks, cfg.data or None, split="train")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run directory in use by another training, one that holds a run (unless `resume`),
    a path that is not a directory, or one that cannot be created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} exists and is not a directory")
    if run_dir.is_dir():
        holder = _lock_holder(run_dir)
        if holder is not None:
            raise ValueError(f"another training (pid {holder}) is writing to {run_dir}; wait for it to end "
                             "or pass a new --out")
        if not resume and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or a new --out "
                                  "(nothing was changed)")
    existing = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create or write the run directory {run_dir}: {existing} is not writable")


def _lock_holder(run_dir: Path) -> str | None:
    """The pid written in the lock of a run directory that another process holds, else None."""
    path = run_dir / LOCK_FILE
    if run_dir.resolve() in _LOCKS or not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _open_locked(run_dir: Path, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key not in _LOCKS:
        f = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the kernel drops it when the process dies
        except BlockingIOError:
            f.close()
            raise ValueError(f"another training is writing to {run_dir}; wait for it to end or pass a new --out")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _LOCKS[key] = f
    # A save killed mid-way leaves its temporary directory (and maybe latest.tmp): never complete.
    for stale in [*run_dir.glob(".step-*.tmp-*"), run_dir / "latest.tmp"]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists():
            stale.unlink()
    cfg.save(run_dir / "config.json")


def release_run_dir(run_dir: Path | None = None) -> None:
    """Unlock `run_dir` (every run directory this process holds when None)."""
    keys = list(_LOCKS) if run_dir is None else [Path(run_dir).resolve()]
    for key in keys:
        f = _LOCKS.pop(key, None)
        if f is not None:
            f.close()   # closing the last descriptor releases the flock


def catch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python drops an exception
    raised while a finalizer or callback runs, so `MetricsLog.log` raises it again at the step's end."""
    def on_sigint(signum, frame):
        RUN.interrupted = True
        raise KeyboardInterrupt
    RUN.interrupted = False
    signal.signal(signal.SIGINT, on_sigint)


def interrupted_message() -> str:
    """train.py's one line for Ctrl-C: where the run stopped and what to resume from."""
    if RUN.run_dir is None:
        return "interrupted before training started; nothing was written"
    last = latest_checkpoint(RUN.run_dir)
    return (f"interrupted at step {RUN.last_step + 1}; last checkpoint {last.name if last else 'none'}; "
            "resume with --resume")


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A deterministic seed for everything random at one optimizer step."""
    return (seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**31 - 1)


def check_finite(value: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(value):
        last = latest_checkpoint(run_dir)
        raise FloatingPointError(
            f"non-finite loss ({value}) at step {step}; stopping. The last good checkpoint is "
            f"{last if last else '(none saved yet)'}; lower the learning rate or resume from it.")


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def save_run_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizers: dict, extra: dict | None = None,
                        keep: int = 2) -> Path:
    """HF weights + trainer state for `step`, then point `latest` at it. Every rank calls this: rank 0
    writes the (gathered) weights; each rank of a sharded run writes its own optimizer shard."""
    name = f"step-{step:06d}"
    target = run_dir / name
    state_dict = dist.full_state_dict(model)
    if dist.is_main():
        checkpoint.save_pretrained(model, tokenizer, target, state_dict=state_dict)
    if dist.is_initialized():
        torch.distributed.barrier()
    if dist.is_main() or dist.is_sharded(model):
        state = {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "extra": extra or {}}
        fname = "trainer_state.pt" if dist.is_main() else f"trainer_state.rank{dist.rank()}.pt"
        tmp = target / (fname + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target / fname)
    if dist.is_initialized():
        torch.distributed.barrier()
    if dist.is_main():
        pointer_tmp = run_dir / "latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, run_dir / "latest")
        old = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name != name)
        for p in (old[:-(keep - 1)] if keep > 1 else old):
            shutil.rmtree(p, ignore_errors=True)
    return target


def load_trainer_state(ckpt_dir: Path, sharded: bool = False) -> dict:
    """This rank's trainer state; rank 0's (the one with `extra`) unless `sharded`. Memory-mapped."""
    fname = "trainer_state.pt" if (dist.is_main() or not sharded) else f"trainer_state.rank{dist.rank()}.pt"
    return torch.load(Path(ckpt_dir) / fname, map_location="cpu", weights_only=False, mmap=True)


def resume(ckpt_dir: Path | None, model, optimizers: dict) -> tuple[int, dict]:
    """Restore the optimizers and RNG state saved in `ckpt_dir`: (first step to run, the saved `extra`);
    (0, {}) for a fresh run (`ckpt_dir` None)."""
    if ckpt_dir is None:
        return 0, {}
    state = load_trainer_state(ckpt_dir, dist.is_sharded(model))
    for k, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][k])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"] + 1, state["extra"]


def shared_latest(run_dir: str | Path) -> Path | None:
    """`latest_checkpoint` as rank 0 sees it, on every rank (a run may save while ranks look)."""
    return dist.broadcast_object(latest_checkpoint(run_dir) if dist.is_main() else None)


def find_latest_run_checkpoint(stage: str = "sft", root: str | Path = "runs", latest=None) -> Path:
    """The newest complete checkpoint of `<root>/<stage>` (how RL stages find their SFT start)."""
    found = (latest or shared_latest)(Path(root) / stage)
    if found is None:
        raise FileNotFoundError(f"no {stage} checkpoint under {Path(root) / stage}; run "
                                f"`python train.py --stage {stage}` first or pass --model PATH")
    return found


# ----------------------------------------------------------------------------- metrics

class MetricsLog:
    """Append metrics to `metrics.jsonl` and print a one-line progress report (rank 0 only)."""

    def __init__(self, run_dir: Path, total_steps: int, resume: bool, every: int = 1):
        self.enabled = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.total, self.every = total_steps, every
        self.t0 = time.time()
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
        rec = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        elapsed = time.time() - self.t0
        bar_len = 20
        done = int(bar_len * (step + 1) / self.total)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if k in ("loss", "lr", "reward", "accuracy", "kl", "value_loss", "grad_norm", "tok_s"))
        print(f"[{'#' * done}{'.' * (bar_len - done)}] step {step + 1}/{self.total} {shown} ({elapsed:.0f}s)",
              file=sys.stderr, flush=True)


def start_source(cfg, latest=latest_checkpoint) -> tuple[Path | None, Path | None]:
    """(checkpoint to load, the resumed one or None); (None, None) for the tiny preset from scratch.

    Without --resume or --model: pretrain starts from scratch; SFT from the newest checkpoint of the
    pretrain run beside its own (runs/pretrain for runs/sft), else from scratch; GRPO and PPO from the
    SFT run beside theirs. `latest` finds a run's newest checkpoint (`shared_latest` on every rank)."""
    runs = cfg.run_dir().parent  # stages find each other as siblings: runs/pretrain, runs/sft
    resumed = latest(cfg.run_dir()) if cfg.resume else None
    if resumed is not None:
        return resumed, resumed
    if cfg.model:
        return Path(cfg.model), None
    if cfg.stage in ("grpo", "ppo"):
        return find_latest_run_checkpoint("sft", runs, latest), None
    if cfg.stage == "sft":
        return latest(runs / "pretrain"), None
    return None, None


def load_start_model(cfg, device: torch.device):
    """(model, tokenizer, source, resume_dir) to train from (see `start_source`); rank 0 picks, every
    rank loads the same. `resume_dir` is the checkpoint whose trainer state to restore."""
    from minir1ci import presets

    source, resumed = start_source(cfg, shared_latest)
    if source is None:  # pretrain, or SFT with no pretrain run beside it
        if cfg.stage == "sft" and dist.is_main():
            print(f"sft: no checkpoint under {cfg.run_dir().parent / 'pretrain'}, so the tiny preset starts from "
                  "scratch; `python train.py --stage pretrain` first teaches it to copy, which the tasks need")
        model, tokenizer = checkpoint.init_from_config(presets.tiny_dir(), seed=cfg.seed, device=device)
        return model, tokenizer, "tiny preset (from scratch)", None
    model, tokenizer = checkpoint.load_pretrained(source, dtype=torch.float32, device=device)
    return model, tokenizer, str(source), resumed
