"""Training configuration: one frozen dataclass, presets as plain functions, `--key=value` overrides
coerced by field type (unknown keys refused with close matches); saved as each run's config.json.

Defaults follow the paper where it states them (REFERENCE.md, section 1); the `tiny` presets are
what a 1M-parameter model trained from scratch on a CPU needs (larger learning rates, short budgets).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

from minir1ci.env.interpreter import RolloutParams
from minir1ci.inference.lora import TARGETS
from minir1ci.training.losses import AGG_MODES

STAGES = ("pretrain", "sft", "grpo", "ppo")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")   # names devices.named_dtype reads
CHOICES = {"kl_estimator": ("k1", "k2", "k3"), "policy_loss": ("ppo", "gspo", "cispo"),
           "old_logprobs": ("trainer", "sampler"), "rollout_dtype": ("float32", "bfloat16", "auto"),
           "loss_agg": AGG_MODES,
           "dtype": DTYPES}
# RL options that only one of the two RL stages reads; given to another stage they are refused.
ONLY_FOR = {"grpo": ("norm_adv_std", "kl_estimator", "dynamic_sampling", "dynamic_sampling_rounds", "gspo_clip_low",
                     "gspo_clip_high"),
            "ppo": ("critic_lr", "value_clip", "gamma", "lam", "critic_warmup_steps")}

INF = float("inf")
POSITIVE, NONNEG, UNIT = (0, INF, (False, False)), (0, INF, (True, False)), (0, 1, (True, True))
# Every numeric option's valid range, (low, high, (low included, high included)).
RANGES = {
    **dict.fromkeys(("steps", "batch_size", "micro_batch_size", "max_seq_len", "num_train_examples", "lr",
                     "grad_clip", "log_every", "save_every", "loss_chunk_size", "prompts_per_step", "n_samples",
                     "max_new_tokens", "exec_timeout", "curriculum_samples", "ppo_epochs", "critic_lr",
                     "value_clip", "lora_alpha"), POSITIVE),
    **dict.fromkeys(("warmup_steps", "weight_decay", "temperature", "max_code_calls", "dynamic_sampling_rounds",
                     "tis_cap", "mis_low", "mis_high", "gspo_clip_low", "gspo_clip_high", "mini_batch_size",
                     "keep_checkpoints", "clip_low", "clip_high", "kl_coef", "entropy_coef",
                     "critic_warmup_steps", "threads", "lora_rank"), NONNEG),
    "data_seed": (-1, INF, (True, False)),
    **dict.fromkeys(("text_fraction", "min_lr_ratio", "gamma", "lam"), UNIT),
    "top_p": (0, 1, (False, True)), "beta1": (0, 1, (True, False)), "beta2": (0, 1, (True, False)),
    "dual_clip": (1, INF, (False, False)), "sft_min_reward": (-INF, INF, (True, False)),
}


def check_value(name: str, value, bounds: tuple | None = None) -> None:
    """Refuse a number outside `bounds` (default: the option's RANGES entry), naming the option; the
    scripts' flags are checked here too. nan fails every comparison, so it is refused as well."""
    lo, hi, closed = bounds or RANGES[name]
    if not ((lo <= value if closed[0] else lo < value) and (value <= hi if closed[1] else value < hi)):
        side = "[(" [not closed[0]] + f"{lo}, {hi}" + "])"[not closed[1]]
        raise ValueError(f"{name} must lie in {side}, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"
    # what to train, where to write
    model: str = ""            # start checkpoint; "" = scratch (pretrain), runs/pretrain (sft), runs/sft (rl)
    out: str = ""              # run directory; "" = runs/<stage>
    tasks: str = "builtin:all"
    data: str = ""             # root holding symbench/ and bbh/ ("" = $MINIR1CI_DATA or ../shared/data)
    sft_data: str = ""         # SFT JSONL (chat messages or rollout.py trajectories); "" = built-in oracle trajectories
    sft_min_reward: float = -INF  # with --sft_data: keep lines whose `reward` reaches this (rejection sampling)
    use_code: bool = RolloutParams.use_code  # False: text-only SFT/RL (the paper's baseline)
    text_fraction: float = 0.0  # SFT with code on built-in oracles: this share of questions gets the text-only answer
    resume: bool = False       # continue from <out>/last if present
    seed: int = 0
    data_seed: int = -1        # draws the training questions (and the curriculum's measurement); -1 = --seed
    # budget and batching
    steps: int = 300
    batch_size: int = 32       # sequences per optimizer step (RL: prompts_per_step * n_samples)
    micro_batch_size: int = 8
    max_seq_len: int = 1024
    num_train_examples: int = 500   # questions per task (built-in families generate this many); pretrain: samples
    # optimizer
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    lora_rank: int = 0         # LoRA adapters of this rank on the start checkpoint, its base frozen; 0 = full
    lora_alpha: float = 32.0   # the update is scaled by lora_alpha / lora_rank
    lora_targets: str = "all"  # all, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    # precision and memory
    device: str = "auto"       # auto: cuda if available, else cpu
    threads: int = 0           # CPU threads of torch's operators; 0 = its default (one per core)
    dtype: str = "auto"        # auto: bf16 autocast on cuda, fp32 on cpu
    grad_checkpointing: bool = False
    loss_chunk_size: int = 1024  # tokens per vocabulary chunk in the loss
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2  # RL: newest step-* dirs kept in the run directory; 0 = all (for curves)
    # RL: rollouts
    prompts_per_step: int = 8
    n_samples: int = 5
    temperature: float = RolloutParams.temperature   # rollout settings default to RolloutParams'
    top_p: float = RolloutParams.top_p
    max_new_tokens: int = RolloutParams.max_new_tokens
    max_code_calls: int = RolloutParams.max_code_calls
    exec_timeout: float = RolloutParams.exec_timeout
    stateful_code: bool = RolloutParams.stateful_code
    reward_plain: bool = False
    curriculum: bool = False
    curriculum_samples: int = 20
    curriculum_cache: str = ""  # a directory keeping measured success rates: runs from one start measure once
    rollout_dtype: str = "float32"  # float32 | bfloat16 | auto (as --dtype auto evaluates)
    dynamic_sampling: bool = False  # GRPO: groups of equal rewards are replaced by newly sampled ones (DAPO)
    dynamic_sampling_rounds: int = 3  # at most this many extra rounds of prompts per step
    filter_void_turns: bool = False  # drop trajectories with a turn holding no closed code block nor answer
    mask_truncated: bool = False     # drop trajectories cut by max_new_tokens
    mask_tool_output: bool = True    # False: the inserted interpreter output is trained on too (ablation)
    # RL: sampler/trainer mismatch
    old_logprobs: str = "trainer"  # trainer (recompute pi_old) | sampler (reuse the sampler's; one update per step)
    tis_cap: float = 2.0       # token weights min(pi_old / pi_sampler, cap); 0 = off
    mis_low: float = 0.5       # drop a trajectory whose geometric-mean pi_old / pi_sampler is outside
    mis_high: float = 2.0      # [mis_low, mis_high]; 0 leaves that side open
    # RL: policy loss
    policy_loss: str = "ppo"   # ppo (clipped) | gspo (GRPO only) | cispo
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    ppo_epochs: int = 1
    mini_batch_size: int = 0   # 0 = whole step is one mini-batch (on-policy)
    clip_low: float = 0.2
    clip_high: float = 0.2     # 0.28 = DAPO clip-higher
    dual_clip: float = 3.0
    loss_agg: str = "token-mean"
    norm_adv_std: bool = True  # False = Dr. GRPO advantages
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    # PPO
    critic_lr: float = 1e-5
    value_clip: float = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    critic_warmup_steps: int = 0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {STAGES}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        for name in RANGES:
            check_value(name, getattr(self, name))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # Every rank takes an equal share of a step: FSDP2 ranks all-gather and reduce in lockstep, so
        # a rank with one micro-batch more would wait forever.
        share = "prompts_per_step" if self.stage in ("grpo", "ppo") else "batch_size"
        n, world = getattr(self, share), int(os.environ.get("WORLD_SIZE", "1"))
        if n % world:
            raise ValueError(f"{share}={n} is not divisible by the world size {world}: every rank needs an equal "
                             f"share (try {share}={n + world - n % world})")
        unknown = sorted(set(self.lora_target_list()) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown --lora_targets {unknown}: use all or a comma list of {','.join(TARGETS)}")
        if self.lora_rank and self.stage == "pretrain":
            raise ValueError("--lora_rank adapts a trained checkpoint: use it with --stage sft, grpo or ppo")
        if self.policy_loss == "gspo" and self.stage != "grpo":
            raise ValueError("--policy_loss=gspo needs one advantage per trajectory: only --stage grpo has it")
        if not self.mask_tool_output and self.old_logprobs == "sampler":
            raise ValueError("--mask_tool_output=false needs --old_logprobs=trainer: inserted interpreter output "
                             "has no sampler log-prob to reuse")
        if self.old_logprobs == "sampler" and (self.ppo_epochs > 1 or self.mini_batch_size):
            raise ValueError("--old_logprobs=sampler is exact only with one update per step: "
                             "--ppo_epochs=1 --mini_batch_size=0")

    def questions_seed(self) -> int:
        """The seed that draws the training data: `data_seed`, or `seed` where it is -1. Runs that differ
        only in `seed` and share a `data_seed` train on the same questions, in their own order and with
        their own samples (as seeds over one fixed dataset do), and share one curriculum measurement."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def lora_target_list(self) -> tuple[str, ...]:
        return TARGETS if self.lora_targets == "all" else tuple(self.lora_targets.split(","))

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.stage}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


# ----------------------------------------------------------------------------- presets

def paper(stage: str) -> TrainConfig:
    """The paper's settings for real Qwen-2.5 checkpoints (pass --model)."""
    if stage == "pretrain":
        raise ValueError("--stage pretrain is the tiny model's stand-in for pretraining; Qwen-2.5 checkpoints "
                         "are pretrained already: start with --stage sft --model PATH")
    if stage == "sft":
        return TrainConfig(stage="sft", lr=1e-5, batch_size=32, micro_batch_size=4, steps=600,
                           max_seq_len=4096, grad_checkpointing=True, tasks="symbench:all,bbh:all")
    common = dict(lr=1e-6, n_samples=5, prompts_per_step=26, batch_size=130, micro_batch_size=2,
                  temperature=1.0, top_p=1.0, kl_coef=0.001, kl_estimator="k3", clip_low=0.2,
                  clip_high=0.2, grad_clip=1.0, max_new_tokens=4096, max_seq_len=8192,
                  grad_checkpointing=True, steps=600, exec_timeout=60.0, tasks="symbench:all,bbh:all")
    if stage == "grpo":
        return TrainConfig(stage="grpo", **common)
    return TrainConfig(stage="ppo", critic_lr=1e-5, value_clip=0.5, gamma=1.0, lam=1.0,
                       **{**common, "n_samples": 1, "prompts_per_step": 128, "batch_size": 128})


# The built-in families a 1M-parameter model can learn on a CPU in minutes (game24's oracle search
# is ~600 tokens, too long for the tiny budget; use it with real models).
TINY_TASKS = "builtin:mul,builtin:add,builtin:letters,builtin:sort,builtin:base,builtin:date"


def tiny(stage: str) -> TrainConfig:
    """The embedded CPU default: the tiny preset on the built-in tasks, minutes on 2 cores.

    pretrain (the copy corpus, constant lr) -> sft (2,000 questions per family, each seen about
    once: fewer and the model memorises answers instead of learning to copy; every answer with code,
    the best SFT set-up measured: 40% in text, as much of the paper's GPT-4o SFT set is, scored 18
    points lower) -> grpo / ppo (the paper's 4p(1-p) curriculum, success measured from 4 samples of
    100 questions per family; every checkpoint kept, every 5 steps, for the demo's curves).
    Micro-batches of 8 rows (losses are the same for any split): on a 2-core CPU the SFT step ran 16%
    and the GRPO step 22% faster than with 32 (smaller working sets; micro-batches of like lengths).
    """
    if stage == "pretrain":
        return TrainConfig(stage="pretrain", lr=1e-3, warmup_steps=20, min_lr_ratio=1.0, steps=500, batch_size=32,
                           micro_batch_size=8, max_seq_len=256, num_train_examples=16000, save_every=100)
    if stage == "sft":
        return TrainConfig(stage="sft", tasks=TINY_TASKS, lr=2e-3, warmup_steps=20, steps=400, batch_size=32,
                           micro_batch_size=8, max_seq_len=320, num_train_examples=2000, save_every=100)
    common = dict(tasks=TINY_TASKS, lr=2e-5, warmup_steps=0, steps=30, prompts_per_step=16, n_samples=4, batch_size=64,
                  micro_batch_size=8, max_new_tokens=160, max_seq_len=320, max_code_calls=2,
                  exec_timeout=5.0, save_every=5, keep_checkpoints=0, kl_coef=0.001, min_lr_ratio=1.0,
                  curriculum=True, curriculum_samples=4, num_train_examples=100)
    # max_new_tokens counts the inserted interpreter output too: sort's code answers run to 150
    # tokens. At 96 every one was cut off and scored as malformed (-0.1) while its shorter text
    # answer scored +0.1, so RL taught the model to stop using code on sort.
    # Tried from an all-code SFT checkpoint at 96 tokens (held-out greedy accuracy; notes of the
    # end-to-end issue): GRPO with 4 samples per prompt gained +0.8 at 2e-5 and lost at 5e-5 and
    # 1e-4; with 8 samples +1.3 to +3.3 at 4e-5 to 6e-5; PPO +2.0 at 2e-5, +3.7 at 4e-5. At 160
    # tokens, from the mixed (text_fraction 0.4) SFT: GRPO +8.8, PPO +10.4 greedy; +20 at T=0.6.
    if stage == "grpo":
        return TrainConfig(stage="grpo", **{**common, "lr": 4e-5, "n_samples": 8, "batch_size": 128})
    return TrainConfig(stage="ppo", critic_lr=1e-4, critic_warmup_steps=5, **{**common, "lr": 4e-5})


# ----------------------------------------------------------------------------- overrides

BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def _coerce(name: str, typ, text: str):
    if typ is bool:
        if text.lower() not in BOOLS:
            raise ValueError(f"--{name} expects a boolean, got {text!r}")
        return BOOLS[text.lower()]
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name} expects {typ.__name__}, got {text!r}") from None


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--key=value`, `--key value` and bare `--flag` (a boolean set to true) into a dict of strings."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:   # `--key value`, or a bare `--flag` before the next option
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, i = (argv[i + 1], i + 1) if has_value else ("true", i)
        out[key] = value
        i += 1
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Coerce each override by its field's type; unknown keys are refused."""
    hints = get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    changes = {}
    for key, text in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown option --{key}{hint}")
        changes[key] = _coerce(key, hints[key], text)
    return dataclasses.replace(cfg, **changes)


def resolve(argv: list[str]) -> TrainConfig:
    """The config for a `train.py` command line: `--stage` picks the preset, the rest override it.
    `--preset tiny|paper` picks the family: `tiny` without --model, else `paper` (pretrain: only tiny)."""
    overrides = parse_overrides(argv)
    stage = overrides.get("stage", "sft")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    family = overrides.pop("preset", "paper" if overrides.get("model") and stage != "pretrain" else "tiny")
    if family not in ("tiny", "paper"):
        raise ValueError(f"unknown preset {family!r}; choose tiny or paper")
    base = tiny(stage) if family == "tiny" else paper(stage)
    cfg = apply_overrides(base, overrides)
    for only, names in ONLY_FOR.items():
        for name in names:
            if name in overrides and cfg.stage != only:
                raise ValueError(f"--{name} applies only to --stage {only}")
    for name in ("curriculum_cache", "curriculum_samples"):
        if name in overrides and (cfg.stage not in ("grpo", "ppo") or not cfg.curriculum):
            raise ValueError(f"--{name} applies only to --stage grpo or ppo with --curriculum")
    if "sft_min_reward" in overrides and (cfg.stage != "sft" or not cfg.sft_data):
        raise ValueError("--sft_min_reward applies only to --stage sft with --sft_data FILE.jsonl")
    if cfg.text_fraction and (cfg.stage != "sft" or not cfg.use_code or cfg.sft_data):
        raise ValueError("--text_fraction applies only to --stage sft with code on the built-in oracle "
                         "trajectories (not with --use_code=false or --sft_data)")
    return cfg
