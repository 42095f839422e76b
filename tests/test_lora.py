"""LoRA: exactness at init, merging, frozen base, PEFT's layout both ways, disabling, bad input."""
import json

import pytest
import torch
from safetensors import safe_open

from minir1ci.inference import checkpoint
from minir1ci.inference.checkpoint import load_model, load_pretrained, save_pretrained
from minir1ci.inference.lora import (TARGETS, LoRALinear, adapters_disabled, apply_lora, lora_layers, merge_lora,
                                     save_adapter)
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
    assert not any(p.requires_grad for p in merged.parameters())


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
    ours, _ = load_pretrained(tmp_path / "adapter")
    assert sorted(name.rpartition(".")[2] for name in lora_layers(ours)) == sorted(["down_proj", "k_proj", "o_proj"] * 2)
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=1e-5)


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
    loaded, tokenizer = load_pretrained(tmp_path / "run" / "adapter")
    assert tokenizer is None and torch.equal(logits(loaded), logits(model))
    assert checkpoint.check_checkpoint(tmp_path / "run" / "adapter", need_tokenizer=False) == model.config
    # A base path relative to the adapter directory, as a hand-moved run would have it; saving again replaces.
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../../base"
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load_pretrained(tmp_path / "run" / "adapter")[0]), logits(model))
    save_adapter(model, tmp_path / "run" / "adapter", tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter"]  # no temporary directory left


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_rank_and_targets_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match=r"rank must be at least 1, got 0"):
        apply_lora(base_model(), rank=0, alpha=1)
    # k_proj is [num_kv_heads * head_dim, hidden] = [32, 64]: rank 33 does not fit
    with pytest.raises(ValueError, match=r"rank 33 exceeds min\(in, out\) = 32 of model\.layers\.0\.self_attn\.k_proj"):
        apply_lora(base_model(), rank=33, alpha=1)
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv_proj'\]; valid targets: q_proj, k_proj"):
        apply_lora(base_model(), rank=2, alpha=1, targets=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(apply_lora(base_model(), rank=2, alpha=1), rank=2, alpha=1)


def test_adapter_without_its_base_names_the_missing_path(tmp_path):
    model = apply_lora(base_model(), rank=2, alpha=1)
    save_adapter(model, tmp_path / "adapter", tmp_path / "gone")
    expected = f"base model of adapter .*adapter is missing: no config.json at {tmp_path / 'gone'}"
    with pytest.raises(FileNotFoundError, match=expected):
        load_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=expected):
        checkpoint.check_checkpoint(tmp_path / "adapter")


def test_unsupported_peft_options_are_refused(tmp_path):
    model = apply_lora(saved_base(tmp_path), rank=2, alpha=1)
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    file = tmp_path / "adapter" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "use_rslora": True}))
    with pytest.raises(ValueError, match=r"only plain LoRA .* \{'use_rslora': True\}"):
        load_pretrained(tmp_path / "adapter")


def test_adapter_file_that_does_not_match_its_config_is_refused(tmp_path):
    model = apply_lora(saved_base(tmp_path), rank=2, alpha=1, targets=["q_proj"])
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    file = tmp_path / "adapter" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not match .*v_proj\.lora_A"):
        load_pretrained(tmp_path / "adapter")
