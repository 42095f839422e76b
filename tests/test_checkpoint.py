"""HF checkpoint directories: round trips against transformers, bad input, atomic saves, public API."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minir1ci
from minir1ci.inference import checkpoint
from minir1ci.inference.checkpoint import init_from_config, load_model, load_pretrained, parse_size, save_pretrained
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
from minir1ci.presets import tiny_dir
from minir1ci.inference.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-6)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Init zeroes biases and sets norms to one; random values make a mix-up visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def our_model(tied: bool, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(ModelConfig(**{**BASE, **overrides}, tie_word_embeddings=tied))
    model.init_weights(seed)
    perturb(model, seed)
    return model.eval()


def hf_model(tied: bool, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**BASE, **overrides}, tie_word_embeddings=tied, use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    perturb(model, seed)
    return model


def assert_same_weights(ours: Qwen2ForCausalLM, reference: dict[str, torch.Tensor]) -> None:
    mine = ours.state_dict()
    assert set(mine) == set(reference)
    for name, tensor in reference.items():
        assert mine[name].dtype == tensor.dtype, name
        assert torch.equal(mine[name], tensor), name


def assert_same_logits(ours: Qwen2ForCausalLM, hf) -> None:
    ids = torch.randint(0, BASE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours(ids)
        ref = hf(input_ids=ids).logits
    assert out.shape == (2, 13, BASE["vocab_size"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def tensor_names(directory) -> list[str]:
    names = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names += list(f.keys())
    return names


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_our_checkpoint_loads_in_transformers_with_identical_tensors_and_logits(tmp_path, tied, sharded):
    ours = our_model(tied)
    limit = 50_000 if sharded else "2GB"
    save_pretrained(ours, None, tmp_path / "ckpt", max_shard_size=limit)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    if sharded:
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert set(index["weight_map"].values()) == set(files)
        sizes = {f: 0 for f in files}
        for name, f in index["weight_map"].items():
            sizes[f] += ours.state_dict()[name].numel() * 4
        assert all(size <= limit for size in sizes.values())
        assert index["metadata"]["total_size"] == sum(sizes.values())
    else:
        assert files == ["model.safetensors"]
    assert ("lm_head.weight" in tensor_names(tmp_path / "ckpt")) == (not tied)  # HF omits a tied head
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert_same_weights(ours, hf.state_dict())
    assert_same_logits(ours, hf)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_checkpoint_loads_with_identical_tensors_and_logits(tmp_path, tied, sharded):
    hf = hf_model(tied, seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "2GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ours = load_model(tmp_path)
    assert_same_weights(ours, hf.state_dict())
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=0)
    assert_same_logits(ours, hf)


@pytest.mark.parametrize("disk", [torch.bfloat16, torch.float16, torch.float32])
def test_load_keeps_the_disk_dtype_or_casts_to_the_requested_one(tmp_path, disk):
    hf = hf_model(tied=False, seed=2).to(disk)
    hf.save_pretrained(tmp_path)
    reference = hf.state_dict()
    kept = load_model(tmp_path)
    assert_same_weights(kept, reference)
    upcast = load_model(tmp_path, dtype="float32")
    assert_same_weights(upcast, {n: t.float() for n, t in reference.items()})
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert_same_weights(half, {n: t.to(torch.bfloat16) for n, t in reference.items()})
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # the rotary table is never rounded


def test_save_casts_to_the_requested_dtype_and_records_it(tmp_path):
    ours = our_model(tied=True, seed=3)
    save_pretrained(ours, None, tmp_path / "ckpt", dtype="bfloat16")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = {n: t.to(torch.bfloat16) for n, t in ours.state_dict().items()}
    assert_same_weights(load_model(tmp_path / "ckpt"), expected)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_load_pretrained_returns_the_saved_tokenizer_and_stop_tokens(tmp_path):
    model, tokenizer = init_from_config(tiny_dir(), seed=0)
    assert isinstance(tokenizer, Tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "ckpt")
    loaded, loaded_tok = load_pretrained(tmp_path / "ckpt")
    text = "Hello world <|im_end|> 12"
    assert loaded_tok.encode(text) == tokenizer.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert hf_tok("Hello world").input_ids == tokenizer.encode("Hello world")
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.im_end_id, tokenizer.token_to_id("<|endoftext|>")]
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_load_pretrained_without_tokenizer_files_returns_none(tmp_path):
    hf_model(tied=True).save_pretrained(tmp_path)
    _, tokenizer = load_pretrained(tmp_path)
    assert tokenizer is None


def test_init_from_config_is_seeded_and_casts_only_parameters():
    a, _ = init_from_config(tiny_dir(), seed=5)
    b, _ = init_from_config(tiny_dir(), seed=5, dtype="bf16")
    c, _ = init_from_config(tiny_dir(), seed=6)
    config = ModelConfig.from_json(tiny_dir())
    assert a.config == config and a.num_params() == b.num_params()
    assert_same_weights(b, {n: t.to(torch.bfloat16) for n, t in a.state_dict().items()})
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert b.model.rotary_emb.inv_freq.dtype == torch.float32
    assert b.lm_head.weight is b.model.embed_tokens.weight  # the tiny preset is tied


def test_save_writes_a_given_state_dict_instead_of_the_models(tmp_path):
    gathered = our_model(tied=False, seed=9).state_dict()  # as a distributed trainer would gather it
    save_pretrained(our_model(tied=False, seed=10), None, tmp_path / "ckpt", state_dict=gathered)
    assert_same_weights(load_model(tmp_path / "ckpt"), gathered)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda_in_bf16_matches_the_fp32_cpu_model(tmp_path):
    ours = our_model(tied=False, seed=11)
    save_pretrained(ours, None, tmp_path / "ckpt")
    gpu = load_model(tmp_path / "ckpt", dtype="bfloat16", device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in gpu.parameters())
    assert gpu.model.rotary_emb.inv_freq.device.type == "cuda"
    assert_same_weights(gpu.cpu(), {n: t.to(torch.bfloat16) for n, t in ours.state_dict().items()})
    ids = torch.randint(0, BASE["vocab_size"], (2, 13))
    with torch.no_grad():
        out = gpu.cuda()(ids.cuda()).float().cpu()
        ref = ours(ids)
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


# ---- bad input --------------------------------------------------------------------------------

def test_wrong_path_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_config_without_weights_says_how_to_init_from_scratch():
    with pytest.raises(FileNotFoundError, match=r"no weights(.|\n)*init_from_config"):
        load_pretrained(tiny_dir())


def test_missing_shard_is_named(tmp_path):
    hf_model(tied=False).save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(tmp_path)


def test_corrupt_safetensors_header_is_a_value_error_naming_the_file(tmp_path):
    hf_model(tied=True).save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)  # the 8-byte header length and the start of the JSON header
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)


def test_unsupported_config_is_refused(tmp_path):
    hf_model(tied=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 64}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_model(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    hf_model(tied=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    expected = r"model\.layers\.0\.mlp\.gate_proj\.weight: checkpoint \[96, 64\] vs model \[128, 64\]"
    with pytest.raises(ValueError, match=expected):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    hf_model(tied=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): lm_head\.weight"):
        load_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    both = r"missing tensors \(1\): model\.norm\.weight(.|\n)*unexpected tensors \(1\): model\.extra\.weight"
    with pytest.raises(ValueError, match=both):
        load_model(tmp_path)


def test_tied_checkpoint_accepts_an_identical_head_and_refuses_a_different_one(tmp_path):
    hf = hf_model(tied=False, seed=4)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)


# ---- atomic saves -----------------------------------------------------------------------------

def fail_after_first_shard(monkeypatch):
    real = checkpoint._write_shard
    calls = []

    def flaky(*args):
        if calls:
            raise RuntimeError("disk full")
        calls.append(args)
        real(*args)
    monkeypatch.setattr(checkpoint, "_write_shard", flaky)


def test_interrupted_save_leaves_nothing_at_the_target(tmp_path, monkeypatch):
    fail_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(our_model(tied=False), None, tmp_path / "ckpt", max_shard_size=50_000)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory


def test_interrupted_save_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    old = our_model(tied=False, seed=7)
    save_pretrained(old, None, tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    fail_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(our_model(tied=False, seed=8), None, tmp_path / "ckpt", max_shard_size=50_000)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert_same_weights(load_model(tmp_path / "ckpt"), old.state_dict())


def test_save_replaces_an_existing_checkpoint_completely(tmp_path):
    save_pretrained(our_model(tied=False, seed=1), None, tmp_path / "ckpt", max_shard_size=50_000)
    new = our_model(tied=False, seed=2)
    save_pretrained(new, None, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old one was moved aside, then deleted
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert_same_weights(load_model(tmp_path / "ckpt"), new.state_dict())


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="config.json"):
        save_pretrained(our_model(tied=True), None, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---- public API -------------------------------------------------------------------------------

def test_package_root_exports_the_checkpoint_api():
    assert minir1ci.load_pretrained is checkpoint.load_pretrained
    assert minir1ci.save_pretrained is checkpoint.save_pretrained
    assert minir1ci.load_model is checkpoint.load_model and minir1ci.init_from_config is init_from_config
    assert minir1ci.Qwen2ForCausalLM is Qwen2ForCausalLM and minir1ci.Tokenizer is Tokenizer
    assert set(minir1ci.__all__) <= set(dir(minir1ci))
    with pytest.raises(AttributeError):
        minir1ci.no_such_name


def test_importing_the_package_does_not_import_torch():
    code = "import sys, minir1ci; assert 'torch' not in sys.modules; print(len(minir1ci.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_sizes_parse_as_transformers_counts_them():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(12345) == 12345
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("two gigs")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_checkpoint_directory_follows_the_umask(tmp_path, umask):
    """mkdtemp makes 0700 directories; a checkpoint gets what mkdir would have made."""
    model, tok = init_from_config(tiny_dir(), seed=0)
    old = os.umask(umask)
    try:
        path = save_pretrained(model, tok, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((path / "config.json").stat().st_mode) == 0o666 & ~umask
