"""Run directories: input checks, the run's start, the directory and its lock, checkpoints, `latest`,
resume, and per-step seeds.

Layout of `cfg.run_dir()`: config.json (the resolved TrainConfig, `model` the start checkpoint), .lock
(flock'ed by the training writing here, its pid inside), metrics.jsonl (progress.py), step-000100/ (an
HF checkpoint + trainer_state.pt), latest (names the newest complete step directory).

`start_run` checks every input, resolves the start once and writes nothing; `open_run_dir` then
creates and locks the directory, deletes what a killed save left and saves the config, so a bad input
leaves no run directory. Under torchrun rank 0 checks and writes; the others raise rank 0's error. A
step is complete once `latest` (replaced atomically after the weights and the trainer state) names it.
Resuming is exact: every random choice derives from (seed, step) and the optimizer state is restored.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import random
import shutil
from pathlib import Path

import torch

from minir1ci.inference import checkpoint, lora
from minir1ci.inference.devices import pick_device, train_autocast_dtype
from minir1ci.inference.model import Qwen2ForCausalLM
from minir1ci.inference.model_config import read_json
from minir1ci.training import distributed as dist

LOCK_FILE = ".lock"
_LOCKS: dict[Path, object] = {}   # resolved run dir -> the open lock file this process holds


def start_run(cfg):
    """Process group, device and seed, every input checked and the start resolved (on rank 0, once):
    (cfg with `model` set to the run's start checkpoint, "" for the tiny preset from scratch; the
    device; the checkpoint to resume from or None). Nothing is written."""
    dist.init(cfg.device)
    device = pick_device(cfg.device, dist.local_rank())
    start, resumed = _on_main(check_inputs, cfg)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return dataclasses.replace(cfg, model=start), device, resumed


def open_run_dir(cfg) -> Path:
    """Create the run directory, lock it for this process's life, clean it, save the config."""
    run_dir = cfg.run_dir()
    _on_main(_open_locked, run_dir, cfg)
    return run_dir


def _on_main(fn, *args):
    """fn(*args) on rank 0 alone, its result on every rank; an error it raises is raised on every
    rank (the others would hang)."""
    result, error = None, None
    if dist.is_main():
        try:
            result = fn(*args)
        except (OSError, ValueError) as e:
            error = e
    result, message = dist.broadcast_object((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    return result


def check_inputs(cfg) -> tuple[str, Path | None]:
    """What a run reads, checked before it writes: run directory, start checkpoint, data, tasks.
    Returns `start_source`'s answer."""
    from minir1ci.env.tasks import task_names

    check_run_dir(cfg.run_dir(), cfg.resume)
    start, resumed = start_source(cfg)
    if resumed is not None:
        checkpoint.check_checkpoint(resumed)
    if start and (resumed is None or (cfg.stage in ("grpo", "ppo") and cfg.kl_coef > 0)):   # weights or KL reference
        checkpoint.check_checkpoint(start)
    if cfg.lora_rank:   # the start's shapes against the rank (LoRA keeps the start as its base)
        if not start:
            raise ValueError("--lora_rank adapts a start checkpoint: pass --model PATH (or train the stage before)")
        with torch.device("meta"):
            model = Qwen2ForCausalLM(checkpoint.check_checkpoint(start))
        lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list())
    if cfg.stage == "sft" and cfg.sft_data:
        if not Path(cfg.sft_data).is_file():
            raise FileNotFoundError(f"SFT data file not found: {cfg.sft_data}")
    elif cfg.stage != "pretrain":
        task_names(cfg.tasks, cfg.data or None, split="train")
    return start, resumed


def start_source(cfg) -> tuple[str, Path | None]:
    """(the run's start checkpoint, "" = the tiny preset from scratch; the checkpoint to resume from).

    --model names a checkpoint or a run directory (its newest checkpoint). Without it: pretrain starts
    from scratch; SFT from the newest checkpoint of the pretrain run beside its own (runs/pretrain for
    runs/sft), else from scratch; GRPO and PPO from the SFT run beside theirs. The start is recorded as
    `model` in the run's config.json: a resumed run keeps it (RL's KL reference) even when the run it
    came from has moved on since."""
    run_dir, model = cfg.run_dir(), cfg.model
    if model and (Path(model) / "latest").is_file():   # a run directory: its newest checkpoint
        model = str(latest_checkpoint(model) or "")
        if not model:
            raise FileNotFoundError(f"--model {cfg.model} is a run directory without a complete checkpoint")
    resumed = latest_checkpoint(run_dir) if cfg.resume else None
    if resumed is not None:
        config = read_json(run_dir / "config.json")
        recorded = config.get("model", "")
        # what the saved adapters and optimizer hold, and the seed of the run's steps
        for key in ("lora_rank", "lora_alpha", "lora_targets", "seed"):
            was = config.get(key, getattr(type(cfg), key))
            if was != getattr(cfg, key):
                raise ValueError(f"{run_dir} was trained with --{key}={was}: resume it with the same")
        # the questions it drew (its curriculum's indices point into them), by TrainConfig's own rule
        was = dataclasses.replace(cfg, data_seed=config.get("data_seed", -1)).questions_seed()
        if was != cfg.questions_seed():
            raise ValueError(f"{run_dir} was trained on the questions of --data_seed={was}: resume it with the same")
        if model and (not recorded or Path(model).resolve() != Path(recorded).resolve()):
            raise ValueError(f"{run_dir} started from {recorded or 'scratch'}, not --model {model}: drop "
                             "--model to resume it, or pass a new --out")
        return recorded, resumed
    if model:
        return model, None
    found = latest_checkpoint(run_dir.parent / ("sft" if cfg.stage in ("grpo", "ppo") else "pretrain"))
    if found is None and cfg.stage in ("grpo", "ppo"):
        raise FileNotFoundError(f"no sft checkpoint under {run_dir.parent / 'sft'}; run `python train.py --stage "
                                "sft` first or pass --model PATH")
    return (str(found) if found and cfg.stage != "pretrain" else ""), None


def load_start_model(cfg, device: torch.device, resumed: Path | None):
    """(model, tokenizer, where it came from): the resumed checkpoint, else the start (`start_run`'s
    cfg.model), else the tiny preset from scratch. Every rank loads the same."""
    from minir1ci import presets

    source = resumed or cfg.model
    # LoRA: the frozen base in the compute dtype (bf16 on CUDA: frozen weights need no fp32 master copy)
    dtype = (train_autocast_dtype(cfg.dtype, device) if cfg.lora_rank else None) or torch.float32
    if source:   # a LoRA run resumes its adapters (on its start); an adapter dir to start from is merged
        load = lora.load_adapter if cfg.lora_rank and resumed else checkpoint.load_pretrained
        model, tokenizer = load(source, dtype, device)
        if cfg.lora_rank and not resumed:
            lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list())
        return model, tokenizer, str(source)
    if cfg.stage == "sft" and dist.is_main():
        print(f"sft: no checkpoint under {cfg.run_dir().parent / 'pretrain'}, so the tiny preset starts from "
              "scratch; `python train.py --stage pretrain` first teaches it to copy, which the tasks need")
    model, tokenizer = checkpoint.init_from_config(presets.tiny_dir(), seed=cfg.seed, device=device)
    return model, tokenizer, "tiny preset (from scratch)"


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


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A deterministic seed for everything random at one optimizer step."""
    return (seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**31 - 1)


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def save_run_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizers: dict, extra: dict | None = None,
                        keep: int = 2, base: str = "") -> Path:
    """HF weights (LoRA: the adapters, on `base`) + trainer state for `step`, then point `latest` at it. Every
    rank calls this: rank 0 writes the (gathered) weights; each rank of a sharded run its own optimizer shard."""
    name = f"step-{step:06d}"
    target = run_dir / name
    adapted = hasattr(model, "lora_spec")
    state_dict = dist.full_state_dict(model, trained_only=adapted)
    if dist.is_main() and adapted:
        lora.save_adapter(model, target, base, state_dict)
    elif dist.is_main():
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

