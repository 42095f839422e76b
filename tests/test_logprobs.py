"""Chunked LM-head log-probs / cross-entropy against the plain full-logits computation.

The reference everywhere is the obvious code: logits = hidden @ weight.T, log_softmax over the
whole vocabulary, gather; gradients from autograd through it. The chunked Function must match
it in values and in gradients w.r.t. hidden and weight, and must not save [N, V] activations.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from minir1ci.inference.logprobs import token_logprobs


def _cross_entropy(hidden, weight, targets, mask, chunk_size):
    """Masked next-token cross-entropy per token, [B, T] (0 where mask is 0), as the trainers form it."""
    return -token_logprobs(hidden, weight, targets, 1.0, chunk_size, False, mask)[0]


def _inputs(B=2, T=7, H=8, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


def _reference(hidden, weight, targets, temperature=1.0):
    """Full logits -> fp32 log-softmax -> gather; entropy from the full distribution."""
    z = (hidden @ weight.t()).float() / temperature  # [B, T, V]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_full_logits_with_gradients(chunk_size, temperature):
    hidden, weight, targets = _inputs()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)  # arbitrary upstream grads

    logp, ent = token_logprobs(hidden, weight, targets, temperature, chunk_size, with_entropy=True)
    (a * logp + b * ent).sum().backward()
    got = (logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    ref_logp, ref_ent = _reference(hidden, weight, targets, temperature)
    (a * ref_logp + b * ref_ent).sum().backward()
    want = (ref_logp.detach(), ref_ent.detach(), hidden.grad, weight.grad)

    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_logprobs_without_entropy_match_full_logits_with_gradients():
    hidden, weight, targets = _inputs(seed=3)
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=4)
    assert ent is None
    logp.sum().backward()
    got = (logp.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref_logp, _ = _reference(hidden, weight, targets)
    ref_logp.sum().backward()
    for x, y in zip(got, (ref_logp.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_masked_cross_entropy_matches_torch_cross_entropy_with_ignore_index():
    hidden, weight, targets = _inputs(B=3, T=6, seed=5)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    targets = torch.where(mask.bool(), targets, torch.full_like(targets, -100))  # junk where masked

    loss = _cross_entropy(hidden, weight, targets, mask, chunk_size=2).sum()
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t()).float()
    ref = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    for x, y in zip(got, (ref.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)

    per_tok = _cross_entropy(hidden, weight, targets, mask, chunk_size=2)
    ref_tok = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction="none")
    torch.testing.assert_close(per_tok.detach(), ref_tok.detach().view(3, 6), atol=1e-5, rtol=1e-5)


def test_masked_positions_are_zero_and_receive_no_gradient():
    hidden, weight, targets = _inputs(seed=7)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 6] = True
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=2, with_entropy=True, mask=mask)
    assert torch.all(logp[~mask] == 0) and torch.all(ent[~mask] == 0)
    ref_logp, ref_ent = _reference(hidden, weight, targets)
    torch.testing.assert_close(logp[mask], ref_logp[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[mask], ref_ent[mask], atol=1e-5, rtol=1e-5)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[~mask] == 0)
    assert hidden.grad[mask].abs().sum() > 0


def test_gradcheck_in_float64_with_temperature_and_entropy():
    hidden, weight, targets = _inputs(B=1, T=5, H=4, V=9, dtype=torch.float64, seed=11)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(1, 5, generator=g, dtype=torch.float64)

    def f(h, w):
        logp, ent = token_logprobs(h, w, targets, temperature=0.6, chunk_size=2, with_entropy=True)
        return logp + b * ent

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_frozen_weight_and_no_grad_reference_pass():
    hidden, weight, targets = _inputs(seed=13)
    weight.requires_grad_(False)
    logp, _ = token_logprobs(hidden, weight, targets, chunk_size=3)
    logp.sum().backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():  # the frozen reference model's pass
        ref_logp, _ = token_logprobs(hidden, weight, targets, chunk_size=3)
    assert not ref_logp.requires_grad
    torch.testing.assert_close(ref_logp, _reference(hidden, weight, targets)[0].detach(), atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_match_upcast_full_logits():
    # HF computes lm_head in bf16, then upcasts the logits to fp32 for the loss: same here.
    hidden, weight, targets = _inputs(B=2, T=9, H=32, V=300, dtype=torch.bfloat16, seed=17)
    logp, _ = token_logprobs(hidden, weight, targets, chunk_size=4)
    logp.sum().backward()
    got = (logp.detach(), hidden.grad.float(), weight.grad.float())
    hidden.grad = weight.grad = None
    ref_logp, _ = _reference(hidden, weight, targets)
    ref_logp.sum().backward()
    assert logp.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref_logp.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], hidden.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2], weight.grad.float(), atol=2e-2, rtol=2e-2)


def _saved_numels(fn):
    """numel of every tensor autograd saves for backward while `fn()` builds its graph."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sizes, out


def test_saved_activations_scale_with_tokens_and_hidden_not_vocab():
    N, H, V = 64, 16, 2000  # N*V = 128,000 >> V*H = 32,000 (the weight itself)
    hidden, weight, targets = _inputs(B=1, T=N, H=H, V=V, seed=19)

    chunked, _ = _saved_numels(lambda: token_logprobs(hidden, weight, targets, chunk_size=8, with_entropy=True))
    plain, _ = _saved_numels(lambda: _reference(hidden, weight, targets))

    # Plain autograd keeps [N, V] tensors (logits / log-softmax / softmax) for backward.
    assert max(plain) >= N * V
    # Chunked keeps hidden [N, H], the weight [V, H] (a reference to the parameter) and O(N)
    # vectors; nothing grows with N * V.
    assert max(chunked) <= V * H
    assert sum(chunked) <= N * H + V * H + 8 * N


def test_entropy_hand_values():
    # an identity LM head makes the hidden states the logits
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
                            [0.0, math.log(3.0), -1e4, -1e4]]])  # p = (1/4, 3/4, 0, 0) in fp32
    want = torch.tensor([[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    _, ent = token_logprobs(logits, torch.eye(4), torch.zeros(1, 2, dtype=torch.long), with_entropy=True)
    torch.testing.assert_close(ent, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_at_qwen_vocabulary_is_far_below_full_logits():
    """Real vocabulary (151,936), Qwen2.5-0.5B hidden 896, 8,192 tokens, bf16: forward + backward."""
    dev = torch.device("cuda")
    N, H, V = 8192, 896, 151936
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, H, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(V, H, device=dev, dtype=torch.bfloat16, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    mask = torch.ones(1, N, dtype=torch.bool, device=dev)

    def plain():  # the HF loop: bf16 logits, upcast, cross-entropy
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def chunked():
        return _cross_entropy(hidden[None], weight, targets[None], mask, chunk_size=1024).sum()

    results = {}
    for name, fn in (("plain", plain), ("chunked", chunked), ("plain", plain), ("chunked", chunked)):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base  # includes the grads of hidden and weight
        results[name] = (peak, time.perf_counter() - t0, loss.detach().float(), hidden.grad.float(), weight.grad.float())
    (p_peak, p_time, p_loss, p_gh, p_gw), (c_peak, c_time, c_loss, c_gh, c_gw) = results["plain"], results["chunked"]
    print(f"\npeak above inputs: plain {p_peak / 2**30:.2f} GiB, chunked {c_peak / 2**30:.2f} GiB "
          f"({c_peak / p_peak:.3f}x); time plain {p_time * 1e3:.0f} ms, chunked {c_time * 1e3:.0f} ms")
    torch.testing.assert_close(c_loss, p_loss, rtol=1e-4, atol=1e-2)
    # both gradients are bf16-rounded (the weight's from a sum over chunks): compare as tensors
    for got, want in ((c_gh, p_gh), (c_gw, p_gw)):
        assert (got - want).norm() <= 1e-2 * want.norm()
    assert c_peak <= 0.6 * p_peak
