"""Train with the code interpreter: `python train.py --stage pretrain|sft|grpo|ppo [--key=value ...]`.

With no other argument, `--stage sft` trains the tiny preset on the built-in tasks' oracle
trajectories (CPU, minutes), from the newest checkpoint under runs/pretrain if there is one, else
from scratch; `--stage pretrain` (tiny preset only, ~3 min) first teaches the from-scratch model to
copy text, the stand-in for a pretrained checkpoint; `--stage grpo` and `--stage ppo` continue from
the newest checkpoint under runs/sft. (With `--out DIR`, those are DIR's siblings.) With
`--model PATH` (a Qwen-2.5 checkpoint in HF format) the paper's settings are the defaults. Every
field of minir1ci.config.TrainConfig can be overridden as `--field=value`; unknown keys are
refused. Runs under `torchrun --nproc_per_node N train.py ...`.

`python train.py --merge_lora RUN/step-N --out DIR` writes a LoRA run's adapter merged into its base as a
plain HF checkpoint (transformers and vLLM load it; evaluate.py and rollout.py also take the adapter itself).

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
    from minir1ci.config import parse_overrides, resolve

    try:
        if any(a.startswith("--merge_lora") for a in argv):
            return merge_lora(parse_overrides(argv))
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


def merge_lora(args: dict[str, str]) -> int:
    """`--merge_lora ADAPTER_DIR --out DIR`: the adapter merged into its base, saved as a HF checkpoint."""
    from minir1ci.cli import one_line
    from minir1ci.inference import checkpoint, lora

    if sorted(args) != ["merge_lora", "out"]:
        raise ValueError("--merge_lora takes exactly --merge_lora ADAPTER_DIR --out DIR")
    try:
        if not lora.is_adapter_dir(args["merge_lora"]):
            raise FileNotFoundError(f"--merge_lora {args['merge_lora']} is not a LoRA adapter directory "
                                    f"(no {lora.ADAPTER_CONFIG})")
        checkpoint.check_checkpoint(args["merge_lora"], need_tokenizer=False)
        model, tokenizer = checkpoint.load_pretrained(args["merge_lora"])   # merged into its base
        print(f"wrote {checkpoint.save_pretrained(model, tokenizer, args['out'])}")
    except (OSError, ValueError) as e:
        print(f"train.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
