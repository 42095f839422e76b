"""The model against HF transformers' Qwen2ForCausalLM on the same random weights (fp32)."""
import pytest
import torch

from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-6)


def make_pair(tied: bool, seed: int = 0):
    """An HF model with random weights and ours loaded from its state dict, strictly."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(**BASE, tie_word_embeddings=tied, use_sliding_window=False)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the test see them
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Qwen2ForCausalLM(ModelConfig(**BASE, tie_word_embeddings=tied)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    return hf, ours


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_hf_unpadded(tied):
    hf, ours = make_pair(tied)
    ids = torch.randint(0, BASE["vocab_size"], (3, 17))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours(ids)
    assert out.shape == (3, 17, BASE["vocab_size"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_rows_sharing_a_prefix_run_it_once_and_match_hf_logits_and_gradients(gradient_checkpointing):
    """Rows that begin with the same 24 tokens (a system prompt) and are right-padded: the prefix runs
    once (Qwen2Model._forward_shared_prefix) and logits and gradients equal HF's plain forward."""
    import minir1ci.inference.model as model_module

    hf, ours = make_pair(tied=True, seed=2)
    ours.gradient_checkpointing = gradient_checkpointing
    ours.train()
    ids = torch.randint(1, BASE["vocab_size"], (4, 40))
    ids[:, :24] = ids[0, :24]
    ids[1, 24] = ids[0, 24]                        # rows 0 and 1 share one token more: still 24 for all
    ids[2, 31:] = 0                                # right padding
    assert model_module.shared_prefix(ids) == 24 >= model_module.MIN_SHARED_PREFIX
    calls = []
    real = model_module.Qwen2Model._forward_shared_prefix
    model_module.Qwen2Model._forward_shared_prefix = lambda self, x, P: calls.append(P) or real(self, x, P)
    try:
        out = ours(ids)
    finally:
        model_module.Qwen2Model._forward_shared_prefix = real
    ref = hf(input_ids=ids).logits
    assert calls == [24]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_hf_padded(tied, side):
    hf, ours = make_pair(tied, seed=1)
    lens = [11, 5, 8]
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(1, BASE["vocab_size"], (n,))
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, attention_mask=mask)  # positions derived from the mask by default
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    # Each sequence alone, unpadded, gives the same logits as inside the padded batch.
    for i, n in enumerate(lens):
        with torch.no_grad():
            alone = ours(ids[i][real[i]][None])[0]
        torch.testing.assert_close(out[i][real[i]], alone, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_keeps_gradients():
    _, ours = make_pair(tied=False, seed=2)
    ours.train()
    ids = torch.randint(0, BASE["vocab_size"], (2, 9))

    def grads():
        ours.zero_grad()
        ours(ids).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.gradient_checkpointing = True
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json({**BASE, "model_type": "qwen2", **override})


def test_config_reads_hf_saved_config(tmp_path):
    hf_cfg = transformers.Qwen2Config(**BASE, tie_word_embeddings=True)
    hf_cfg.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.rope_theta == BASE["rope_theta"] and cfg.tie_word_embeddings
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_in_fp32_is_a_bf16_gemm_rounded_once(monkeypatch, bias):
    """`linear` on bf16 CPU tensors where BF16_IN_FP32 (a CPU without bf16 units): the fp64 product of
    the same bf16 values rounded once to bf16, within one bf16 step (fp32 sums), as torch's own bf16
    kernel is; off, it is torch's kernel itself. fp32 inputs take F.linear either way, bit for bit."""
    import torch.nn.functional as F

    import minir1ci.inference.model as model_module

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 96, generator=g).bfloat16(), torch.randn(160, 96, generator=g).bfloat16()
    b = torch.randn(160, generator=g).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())          # [37, 160]
    step = exact.abs().clamp(min=1e-30).log2().floor().exp2() / 128                      # one bf16 step
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(model_module, "BF16_IN_FP32", on)
        outs[on] = model_module.linear(x, w, b)
        assert outs[on].dtype == torch.bfloat16
        assert ((outs[on].double() - exact).abs() <= step * 1.01).all()
        x32, w32 = x.float(), w.float()
        assert torch.equal(model_module.linear(x32, w32), F.linear(x32, w32))
    assert torch.equal(outs[False], F.linear(x, w, b))
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()
    assert torch.equal(outs[True], ref)


def test_bf16_model_logits_with_products_in_fp32_match_torchs_bf16_kernels(monkeypatch):
    """The whole model in bf16, products in fp32 (BF16_IN_FP32) against torch's bf16 kernels: the same
    logits but for summation order, and both as close to the fp32 model's as bf16 gets."""
    import minir1ci.inference.model as model_module

    _, ours = make_pair(tied=True, seed=3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 21))
    real, dtypes = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: dtypes.append(x.dtype) or real(x, *a))
    with torch.no_grad():
        ref = ours(ids)
        bf = ours.bfloat16()
        logits = {}
        for on in (True, False):
            monkeypatch.setattr(model_module, "BF16_IN_FP32", on)
            dtypes.clear()
            logits[on] = bf(ids).float()
            # every product of the model (7 per layer, the LM head) in the dtype the switch names
            assert dtypes == [torch.float32 if on else torch.bfloat16] * (7 * BASE["num_hidden_layers"] + 1)
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.02)
    for out in logits.values():
        torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
