"""LoRA: exactness at init, merging, frozen base, PEFT's layout both ways, disabling, bad input; then in
training (train.py on the tiny preset): only adapters train, the KL reference is the base, the sampler's copy is
the merged policy, resume is exact, a run's adapter loads in PEFT and merged in transformers."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from minir1ci.inference import checkpoint
from minir1ci.inference.checkpoint import load_model, load_pretrained, save_pretrained
from minir1ci.inference.lora import (TARGETS, LoRALinear, adapters_disabled, apply_lora, load_adapter, lora_layers,
                                     merge_lora, save_adapter)
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-6)
IDS = torch.randint(0, BASE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))


def base_model(seed: int = 0, tied: bool = True) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(ModelConfig(**BASE, tie_word_embeddings=tied))
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # init zeroes biases and sets norms to one: random values make a mix-up visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def perturb_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """B is zero after apply_lora: give it (and A) values so the adapters change the output. By name, so
    it works on PEFT's models too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "logits", out)


def saved_base(tmp_path, seed: int = 0) -> Qwen2ForCausalLM:
    """A base checkpoint at tmp_path/base, loaded back as ours."""
    save_pretrained(base_model(seed), None, tmp_path / "base")
    return load_model(tmp_path / "base")


# ---- the adapted model --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(dtype):
    model = base_model().to(dtype)
    before = logits(model)
    base_names = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(logits(model), before)
    adapter_names = set(model.state_dict()) - base_names
    assert len(adapter_names) == 2 * len(TARGETS) * BASE["num_hidden_layers"]  # the base names are all kept
    A = model.model.layers[1].mlp.down_proj.lora_A.weight
    B = model.get_parameter("model.layers.1.mlp.down_proj.lora_B.weight")
    assert A.shape == (4, BASE["intermediate_size"]) and B.shape == (BASE["hidden_size"], 4)
    assert A.dtype == B.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == dtype
    bound = 1 / BASE["intermediate_size"] ** 0.5  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert 0.5 * bound < A.abs().max() <= bound and not B.any()
    assert not isinstance(model.lm_head, LoRALinear) and model.lm_head.weight is model.model.embed_tokens.weight


def test_only_adapters_get_gradients_and_optimizer_state():
    model = apply_lora(base_model(), rank=2, alpha=4, targets=["q_proj", "up_proj"]).train()
    perturb_adapters(model)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" not in name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model(IDS).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    opt.step()
    assert len(trainable) == 2 * 2 * BASE["num_hidden_layers"]
    assert {id(p) for p in opt.state} == {id(p) for p in trainable}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_merged_model_matches_the_adapted_one_and_shares_the_rest(tied):
    model = apply_lora(base_model(tied=tied), rank=4, alpha=16)
    perturb_adapters(model)
    merged = merge_lora(model)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)
    assert type(merged) is Qwen2ForCausalLM and not lora_layers(merged) and lora_layers(model)
    assert set(merged.state_dict()) == set(base_model(tied=tied).state_dict())
    assert merged.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied


def test_disabled_adapters_give_the_base_logits_exactly():
    base = base_model()
    model = apply_lora(base_model(), rank=4, alpha=8)
    perturb_adapters(model)
    adapted = logits(model)
    assert not torch.equal(adapted, logits(base))
    with adapters_disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)


# ---- PEFT's layout ------------------------------------------------------------------------------

def test_peft_loads_our_adapter_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_lora(saved_base(tmp_path), rank=4, alpha=8)
    perturb_adapters(model)
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        A = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        assert A.shape == (4, BASE["hidden_size"]) and A.dtype == torch.float32
        assert len(f.keys()) == 2 * len(TARGETS) * BASE["num_hidden_layers"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=1e-5)


def test_peft_saved_adapter_loads_in_ours_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    saved_base(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    perturb_adapters(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours, _ = load_adapter(tmp_path / "adapter")
    adapted = sorted(name.rpartition(".")[2] for name in lora_layers(ours))
    assert adapted == sorted(["down_proj", "k_proj", "o_proj"] * 2)
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=1e-5)
    merged, _ = load_pretrained(tmp_path / "adapter")             # load_pretrained merges an adapter
    assert not lora_layers(merged)
    torch.testing.assert_close(logits(merged), logits(theirs), atol=1e-5, rtol=1e-5)


def test_merged_model_saved_loads_in_transformers_with_the_same_logits(tmp_path):
    model = apply_lora(base_model(tied=False), rank=4, alpha=8)
    perturb_adapters(model)
    save_pretrained(merge_lora(model), None, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(hf), logits(model), atol=1e-5, rtol=1e-5)


def test_load_pretrained_and_check_checkpoint_accept_an_adapter_dir(tmp_path):
    model = apply_lora(saved_base(tmp_path), rank=2, alpha=2, targets=["v_proj", "gate_proj"])
    perturb_adapters(model)
    save_adapter(model, tmp_path / "run" / "adapter", tmp_path / "base")
    loaded, tokenizer = load_adapter(tmp_path / "run" / "adapter")
    assert tokenizer is None and torch.equal(logits(loaded), logits(model))
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "run" / "adapter")[0]), logits(model))
    assert checkpoint.check_checkpoint(tmp_path / "run" / "adapter", need_tokenizer=False) == model.config
    # A base path relative to the adapter directory, as a hand-moved run would have it; saving again replaces.
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../../base"
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load_adapter(tmp_path / "run" / "adapter")[0]), logits(model))
    save_adapter(model, tmp_path / "run" / "adapter", tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter"]  # no temporary directory left


# ---- bad input ----------------------------------------------------------------------------------

def test_a_rank_larger_than_a_layer_is_refused_naming_it_and_changes_nothing():
    # k_proj is [num_kv_heads * head_dim, hidden] = [32, 64]: rank 33 does not fit
    model = base_model()
    with pytest.raises(ValueError, match=r"rank 33 exceeds min\(in, out\) = 32 of model\.layers\.0\.self_attn\.k_proj"):
        apply_lora(model, rank=33, alpha=1)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_adapter_without_its_base_names_the_missing_path(tmp_path):
    model = apply_lora(base_model(), rank=2, alpha=1)
    save_adapter(model, tmp_path / "adapter", tmp_path / "gone")
    expected = f"base model of adapter .*adapter is missing: no config.json at {tmp_path / 'gone'}"
    with pytest.raises(FileNotFoundError, match=expected):
        load_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=expected):
        checkpoint.check_checkpoint(tmp_path / "adapter")


# ---- in training: train.py's GRPO, SFT and PPO with --lora_rank on the tiny preset --------------

RL = ["--preset=tiny", "--lora_rank=4", "--lr=1e-3", "--prompts_per_step=2", "--n_samples=2", "--batch_size=4",
      "--micro_batch_size=2", "--max_new_tokens=24", "--save_every=2", "--exec_timeout=2", "--num_train_examples=8",
      "--tasks=builtin:mul,builtin:letters"]
IDS_TINY = torch.randint(0, 1000, (2, 21), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random tiny-preset checkpoint with its tokenizer: the runs' start, and their LoRA base."""
    from minir1ci.presets import tiny_dir
    model, tok = checkpoint.init_from_config(tiny_dir(), seed=0)
    return save_pretrained(model, tok, tmp_path_factory.mktemp("lora") / "base")


def moving_advantages(mp):
    """A random model scores every rollout alike, so GRPO's advantages (and gradients) would be 0: fixed ones
    of both signs make the adapters move."""
    from minir1ci.training import rl
    mp.setattr(rl, "grpo_advantages", lambda scores, n, norm_std=True: torch.linspace(-1, 1, len(scores)))


def recording(mp, seen: dict):
    """Record, in a real run, the parameters holding a gradient at each clip, every optimizer, the first step's
    batch, and each sampling copy's logits beside the policy's."""
    from minir1ci.training import distributed as dist, rl
    real_clip, real_opt, real_update, real_copy = dist.clip_grad_norm, rl.make_optimizer, rl.update, dist.unsharded_copy

    def clip(model, max_norm):
        seen.setdefault("grads", set()).update(n for n, p in model.named_parameters() if p.grad is not None)
        return real_clip(model, max_norm)

    def optimizer(params, cfg, **kw):
        seen.setdefault("opts", []).append(real_opt(params, cfg, **kw))
        return seen["opts"][-1]

    def update(model, critic, opts, batch, cfg, device, amp, step):
        seen["batch"] = (batch, cfg, model)   # the last step's, once the adapters have moved
        seen["policy_logp"] = rl.no_grad_pass(lambda x: rl.token_logp(model, x, cfg)[0], batch,
                                              cfg.micro_batch_size, device, amp)
        return real_update(model, critic, opts, batch, cfg, device, amp, step)

    def unsharded_copy(model, dtype=None):
        copy = real_copy(model, dtype)
        seen.setdefault("copies", []).append((logits(model, IDS_TINY), logits(copy, IDS_TINY), lora_layers(copy)))
        return copy

    mp.setattr(dist, "clip_grad_norm", clip)
    mp.setattr(rl, "make_optimizer", optimizer)
    mp.setattr(rl, "update", update)
    mp.setattr(dist, "unsharded_copy", unsharded_copy)


@pytest.fixture(scope="module")
def lora_grpo(tiny_base, tmp_path_factory):
    """A 4-step LoRA GRPO run (rank 4, every target), with what `recording` saw."""
    from minir1ci.config import resolve
    from minir1ci.training import rl
    out, seen = tmp_path_factory.mktemp("lora") / "grpo", {}
    with pytest.MonkeyPatch.context() as mp:
        moving_advantages(mp)
        recording(mp, seen)
        rl.train_rl(resolve(["--stage=grpo", "--steps=4", f"--model={tiny_base}", f"--out={out}", *RL]))
    return out, seen


def adapter_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_lora_grpo_trains_only_the_adapters(lora_grpo):
    _, seen = lora_grpo
    _, _, model = seen["batch"]
    assert seen["grads"] == adapter_names(model) and len(seen["grads"]) == 2 * 7 * 4   # A, B x 7 targets x 4 layers
    [opt] = seen["opts"]
    adapters = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == adapters == {id(p) for p in opt.state}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


def test_lora_kl_reference_is_the_base_model_exactly(lora_grpo, tiny_base):
    from contextlib import nullcontext
    from minir1ci.training import rl
    _, seen = lora_grpo
    batch, cfg, _ = seen["batch"]
    base = load_model(tiny_base)
    want = rl.no_grad_pass(lambda x: rl.token_logp(base, x, cfg)[0], batch, cfg.micro_batch_size, "cpu", nullcontext())
    assert batch.ref_logp is not None and torch.equal(batch.ref_logp, want)
    assert (seen["policy_logp"] - want).abs().max() > 1e-3     # the policy itself is elsewhere by then


def test_lora_sampling_copy_is_the_merged_policy(lora_grpo, tiny_base):
    _, seen = lora_grpo
    base = logits(load_model(tiny_base), IDS_TINY)
    assert len(seen["copies"]) == 1 + 4                   # the curriculum's measurement, then one per step
    for policy, copy, copy_adapters in seen["copies"]:
        assert not copy_adapters
        torch.testing.assert_close(copy, policy, atol=1e-5, rtol=1e-5)
    assert (seen["copies"][-1][0] - base).abs().max() > 1e-3   # the adapters have moved the policy by then


def test_lora_grpo_resume_is_exact(lora_grpo, tiny_base, tmp_path, monkeypatch, capsys):
    import train as train_script
    from minir1ci.config import resolve
    from minir1ci.training import rl, runs
    full, _ = lora_grpo
    cfg = resolve(["--stage=grpo", "--steps=4", f"--model={tiny_base}", f"--out={tmp_path / 'cut'}", *RL])
    moving_advantages(monkeypatch)
    real = runs.save_run_checkpoint

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(rl, "save_run_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        rl.train_rl(cfg)
    monkeypatch.setattr(rl, "save_run_checkpoint", real)
    runs.release_run_dir()
    assert runs.latest_checkpoint(tmp_path / "cut").name == "step-000001"
    rl.train_rl(dataclasses.replace(cfg, resume=True))
    rows = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, tmp_path / "cut")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [0, 1, 2, 3]
    # A resume keeps the run's adapters: other LoRA options are refused before anything is written.
    assert train_script.main(["--stage=grpo", "--resume", f"--out={tmp_path / 'cut'}", *RL, "--lora_rank=8"]) == 1
    assert "was trained with --lora_rank=4: resume it with the same" in capsys.readouterr().err


def test_lora_grpo_adapter_loads_in_peft_and_merged_in_transformers(lora_grpo, tiny_base, tmp_path):
    peft = pytest.importorskip("peft")
    import train as train_script
    from minir1ci.training import runs
    step = runs.latest_checkpoint(lora_grpo[0])
    config = json.loads((step / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 4
    ours = logits(load_adapter(step)[0], IDS_TINY)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
    base = logits(hf, IDS_TINY)
    theirs = logits(peft.PeftModel.from_pretrained(hf, step).eval(), IDS_TINY)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - base).abs().max() > 1e-3
    assert train_script.main(["--merge_lora", str(step), "--out", str(tmp_path / "merged")]) == 0
    merged = logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), IDS_TINY)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-5)


def test_evaluate_takes_an_adapter_directory(lora_grpo, capsys):
    import evaluate as evaluate_script
    from minir1ci.training import runs
    step = runs.latest_checkpoint(lora_grpo[0])
    assert evaluate_script.main(["--model", str(step), "--tasks", "builtin:mul", "--limit", "1", "--max_new_tokens",
                                 "8", "--device", "cpu", "--dtype", "float32"]) == 0
    assert "builtin:mul" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_lora_sft_and_ppo_train_only_adapters_and_the_critics_score_head(stage, tiny_base, tmp_path):
    from minir1ci.config import resolve
    from minir1ci.training import rl, sft
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        recording(mp, seen)
        mp.setattr(sft, "make_optimizer", rl.make_optimizer)   # the recording one
        args = [f"--stage={stage}", "--steps=2", f"--model={tiny_base}", f"--out={tmp_path / stage}", *RL]
        if stage == "sft":
            sft.train_sft(resolve(args))
        else:   # the critic is LoRA too; both train from the first step
            rl.train_rl(resolve(args + ["--critic_lr=1e-3", "--critic_warmup_steps=0"]))
    assert all(".lora_" in n or n == "score.weight" for n in seen["grads"]), seen["grads"]
    assert len(seen["grads"]) == 2 * 7 * 4 + (stage == "ppo")   # policy and critic adapters share names
    assert [len(o.state) for o in seen["opts"]] == ([2 * 7 * 4] if stage == "sft" else [2 * 7 * 4, 2 * 7 * 4 + 1])
    for opt in seen["opts"]:
        params = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in params} == {id(p) for p in opt.state} and all(p.dtype == torch.float32 for p in params)
