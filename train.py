"""Train with the code interpreter: `python train.py --stage pretrain|sft|grpo|ppo [--key=value ...]`.

With no other argument, `--stage sft` trains the tiny preset on the built-in tasks' oracle
trajectories (CPU, minutes), from the newest checkpoint under runs/pretrain if there is one, else
from scratch; `--stage pretrain` (tiny preset only, ~3 min) first teaches the from-scratch model to
copy text, the stand-in for a pretrained checkpoint; `--stage grpo` and `--stage ppo` continue from
the newest checkpoint under runs/sft. (With `--out DIR`, those are DIR's siblings.) With
`--model PATH` (a Qwen-2.5 checkpoint in HF format) the paper's settings are the defaults. Every
field of minir1ci.config.TrainConfig can be overridden as `--field=value`; unknown keys are
refused. Runs under `torchrun --nproc_per_node N train.py ...`.

Every input is checked before anything is written; a run directory that holds a run is refused
without `--resume`, and one that another training is writing to is refused outright. Ctrl-C stops
with the step reached and the checkpoint `--resume` continues from.
"""
import sys


def main(argv: list[str]) -> int:
    """Exit status 0, 1 for a bad input or a failed run (one stderr line), 2 for a bad option, 130
    for Ctrl-C (one line: where it stopped, the last checkpoint, how to resume)."""
    try:
        from minir1ci.training import progress
        progress.catch_interrupts()
        return run(argv)
    except KeyboardInterrupt:
        from minir1ci.training import distributed as dist, progress
        if dist.is_main():
            print(progress.interrupted_message(), file=sys.stderr)
        return 130


def run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from dataclasses import fields
        from minir1ci.config import TrainConfig
        print("options: " + " ".join(f"--{f.name}" for f in fields(TrainConfig)))
        return 0
    from minir1ci.training import runs
    from minir1ci.cli import one_line
    from minir1ci.config import resolve

    try:
        cfg = resolve(argv)
    except ValueError as e:
        print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    if cfg.stage in ("pretrain", "sft"):
        from minir1ci.training.sft import train_sft as train
    else:
        from minir1ci.training.rl import train_rl as train
    try:
        train(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        runs.release_run_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
