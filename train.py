"""Train with the code interpreter: `python train.py --stage pretrain|sft|grpo|ppo [--key=value ...]`.

With no other argument, `--stage sft` trains the tiny preset on the built-in tasks' oracle
trajectories (CPU, minutes), from the newest checkpoint under runs/pretrain if there is one, else
from scratch; `--stage pretrain` (tiny preset only, ~3 min) first teaches the from-scratch model to
copy text, the stand-in for a pretrained checkpoint; `--stage grpo` and `--stage ppo` continue from
the newest checkpoint under runs/sft. (With `--out DIR`, those are DIR's siblings.) With
`--model PATH` (a Qwen-2.5 checkpoint in HF format) the paper's settings are the defaults. Every
field of minir1ci.config.TrainConfig can be overridden as `--field=value`; unknown keys are
refused. Runs under `torchrun --nproc_per_node N train.py ...`.
"""
import sys


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from dataclasses import fields
        from minir1ci.config import TrainConfig
        print("options: " + " ".join(f"--{f.name}" for f in fields(TrainConfig)))
        return 0
    from minir1ci.config import resolve

    try:
        cfg = resolve(argv)
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if cfg.stage in ("pretrain", "sft"):
        from minir1ci.sft import train_sft as run
    else:
        from minir1ci.rl import train_rl as run
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
