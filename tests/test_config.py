"""The command-line config: presets, typed overrides, refusal of unknown keys."""
import json

import pytest

from minir1ci.config import TrainConfig, apply_overrides, parse_overrides, resolve


def test_overrides_are_coerced_by_field_type():
    cfg = resolve(["--stage", "grpo", "--lr=3e-4", "--steps", "7", "--curriculum", "--use_code=false"])
    assert cfg.stage == "grpo" and cfg.lr == 3e-4 and cfg.steps == 7
    assert cfg.curriculum is True and cfg.use_code is False


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown option --lrr .*--lr"):
        resolve(["--lrr=1"])


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="--steps expects int"):
        resolve(["--steps=ten"])
    with pytest.raises(ValueError, match="--curriculum expects a boolean"):
        resolve(["--curriculum=maybe"])
    with pytest.raises(ValueError, match="unknown stage"):
        resolve(["--stage=dpo"])
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        resolve(["--batch_size=10", "--micro_batch_size=4"])


def test_preset_follows_the_model_argument():
    assert resolve(["--stage=grpo"]).lr == 4e-5                         # tiny preset: CPU default
    paper = resolve(["--stage=grpo", "--model=/ckpt"])                  # a real checkpoint: paper settings
    assert (paper.lr, paper.n_samples, paper.kl_coef, paper.kl_estimator) == (1e-6, 5, 0.001, "k3")
    assert resolve(["--stage=grpo", "--model=/ckpt", "--preset=tiny"]).lr == 4e-5


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg = resolve(["--stage=ppo", "--gamma=0.99"])
    cfg.save(tmp_path / "config.json")
    back = apply_overrides(TrainConfig(stage="ppo"), {k: str(v) for k, v in json.loads((tmp_path / "config.json").read_text()).items()})
    assert back == cfg


def test_parse_rejects_positional_arguments():
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["sft"])


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_tiny_rl_budget_fits_every_oracle_answer(stage):
    """The response budget counts the inserted interpreter output. A budget below the oracle's own
    answers cuts every correct code answer of that family short, the reward scores it malformed,
    and RL learns to stop using code there (this happened to sort at 96 tokens)."""
    from minir1ci.config import tiny
    from minir1ci.training.data import oracle_samples
    from minir1ci.presets import tiny_dir
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.tokenizer import Tokenizer

    cfg = tiny(stage)
    tok = Tokenizer.from_pretrained(tiny_dir())
    examples = load_tasks(cfg.tasks, split="train", limit=300, seed=0)
    longest = {}
    for ex, s in zip(examples, oracle_samples(examples, tok, use_code=True)):
        response = len(s.ids) - s.mask.index(1)            # from the first answer token to the end
        longest[ex.task] = max(longest.get(ex.task, 0), response)
    assert max(longest.values()) <= cfg.max_new_tokens, longest


def test_text_fraction_only_where_it_applies():
    assert resolve(["--stage=sft"]).text_fraction == 0.0      # the tiny preset: every answer with code (best SFT)
    assert resolve(["--stage=sft", "--text_fraction=0.4"]).text_fraction == 0.4
    assert resolve(["--stage=grpo"]).text_fraction == 0.0
    assert resolve(["--stage=sft", "--text_fraction=0.2"]).text_fraction == 0.2
    for argv in (["--stage=sft", "--use_code=false", "--text_fraction=0.2"], ["--stage=ppo", "--text_fraction=0.5"]):
        with pytest.raises(ValueError, match="text_fraction applies only"):
            resolve(argv)
    with pytest.raises(ValueError, match=r"text_fraction must lie in \[0, 1\]"):
        resolve(["--stage=sft", "--text_fraction=1.5"])


@pytest.mark.parametrize("args,message", [
    (["--stage=grpo", "--value_clip=0.2"], "--value_clip applies only to --stage ppo"),
    (["--stage=grpo", "--critic_warmup_steps=2"], "--critic_warmup_steps applies only to --stage ppo"),
    (["--stage=ppo", "--dynamic_sampling"], "--dynamic_sampling applies only to --stage grpo"),
    (["--stage=ppo", "--kl_estimator=k2"], "--kl_estimator applies only to --stage grpo"),
    (["--stage=ppo", "--norm_adv_std=false"], "--norm_adv_std applies only to --stage grpo"),
    (["--stage=sft", "--gamma=0.9"], "--gamma applies only to --stage ppo"),
    (["--stage=ppo", "--policy_loss=gspo"], "--policy_loss=gspo needs one advantage per trajectory"),
    (["--stage=grpo", "--policy_loss=dpo"], "policy_loss must be one of"),
    (["--stage=grpo", "--rollout_dtype=fp8"], "rollout_dtype must be one of"),
    (["--stage=grpo", "--loss_agg=token-sum"], "loss_agg must be one of"),
    (["--stage=sft", "--dtype=fp8"], "dtype must be one of"),
    (["--stage=grpo", "--old_logprobs=sampler", "--ppo_epochs=2"], "--old_logprobs=sampler is exact only"),
    (["--stage=ppo", "--old_logprobs=sampler", "--mini_batch_size=4"], "--old_logprobs=sampler is exact only"),
    (["--stage=grpo", "--eval_every=5"], "unknown option --eval_every"),
])
def test_rl_options_a_stage_does_not_read_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        resolve(args)


def test_options_shared_by_both_rl_stages_are_accepted():
    for stage in ("grpo", "ppo"):
        cfg = resolve([f"--stage={stage}", "--policy_loss=cispo", "--old_logprobs=sampler", "--entropy_coef=0.01",
                       "--curriculum", "--tis_cap=3", "--filter_void_turns", "--mask_truncated", "--rollout_dtype=auto"])
        assert (cfg.policy_loss, cfg.tis_cap, cfg.rollout_dtype) == ("cispo", 3.0, "auto")


@pytest.mark.parametrize("key,value,message", [
    ("lr", "nan", "lr must lie in (0, inf), got nan"),
    ("lr", "0", "lr must lie in (0, inf), got 0.0"),
    ("exec_timeout", "-5", "exec_timeout must lie in (0, inf), got -5.0"),
    ("tis_cap", "inf", "tis_cap must lie in [0, inf), got inf"),
    ("top_p", "0", "top_p must lie in (0, 1], got 0.0"),
    ("top_p", "1.5", "top_p must lie in (0, 1], got 1.5"),
    ("gamma", "1.01", "gamma must lie in [0, 1], got 1.01"),
    ("beta2", "1", "beta2 must lie in [0, 1), got 1.0"),
    ("dual_clip", "1", "dual_clip must lie in (1, inf), got 1.0"),
    ("warmup_steps", "-1", "warmup_steps must lie in [0, inf), got -1"),
    ("max_new_tokens", "0", "max_new_tokens must lie in (0, inf), got 0"),
])
def test_numeric_options_outside_their_range_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError) as err:
        resolve(["--stage=grpo", f"--{key}={value}"])
    assert str(err.value) == message


def test_every_numeric_option_has_a_range_and_the_presets_lie_inside():
    import dataclasses
    from minir1ci.config import RANGES, paper, tiny
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float")}
    assert numeric - set(RANGES) == {"seed"}
    for stage in ("pretrain", "sft", "grpo", "ppo"):
        tiny(stage)
        if stage != "pretrain":
            paper(stage)
