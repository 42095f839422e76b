"""Token log-probabilities and entropy through the LM head, a chunk at a time.

Full logits would be held three times (bf16, fp32, saved log-softmax): about 6 GB per 4,096 tokens
with Qwen's 151,936-token vocabulary. Here one autograd Function walks `chunk_size` rows at a time,
saving one log-sum-exp (and entropy) per token and recomputing each chunk's logits in backward.
`targets[b, t]` is the token predicted from `hidden[b, t]`; logits in the input dtype, upcast to fp32,
then / temperature, as the sampler scales them. With a `mask`, only masked-in tokens are projected
(targets elsewhere may be anything, e.g. -100).

Simplified: chunks run over tokens, not the vocabulary; no double backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024  # rows per chunk: 1024 x 151936 fp32 is 0.6 GB of transient logits


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: at least fp32 (fp64 stays fp64, which gradcheck needs)."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The lm_head matmul dtype: autocast's when it is on (as nn.Linear would get), else the inputs'.
    Fixed in forward and reused in backward (outside autocast), so recomputed logits match bit for bit."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """[c, H] x [V, H] (both in the compute dtype) -> logits / temperature in >= fp32, [c, V], a fresh tensor."""
    z = hidden @ weight.t()  # [c, V] in the compute dtype, as lm_head computes it
    z = z.to(_acc_dtype(z.dtype))  # upcast for the log-softmax (no copy when already fp32)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedLinearLogProb(torch.autograd.Function):
    """logp[n] = log_softmax(hidden[n] @ weight.T / temperature)[targets[n]], optionally entropy[n].
    hidden [N, H], weight [V, H], targets [N] int64 -> [N] in fp32 (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                chunk_size: int, with_entropy: bool):
        cdtype = _compute_dtype(hidden, weight)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=_acc_dtype(cdtype), device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)  # [V, H]; a copy only under autocast with an fp32 weight
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = _chunk_logits(hidden[s:e].to(cdtype), w, temperature)  # [c, V]
                lse_c = torch.logsumexp(z, dim=-1)  # [c]
                lse[s:e] = lse_c
                logp[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse_c
                if with_entropy:
                    p = torch.exp(z - lse_c[:, None])  # [c, V] softmax
                    ent[s:e] = lse_c - p.mul_(z).sum(-1)
                del z
        # saved: hidden [N, H], weight, targets [N], lse [N], ent [N] -- nothing of size N*V
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.cdtype = temperature, chunk_size, cdtype
        ctx.set_materialize_grads(False)  # an unused output arrives as None, not a zero tensor
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor | None, grad_ent: Tensor | None = None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        temperature, chunk_size, cdtype = ctx.temperature, ctx.chunk_size, ctx.cdtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype  # fp32 (fp64 for fp64 inputs)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight gradient is summed over chunks in fp32, cast to the weight's dtype at the end
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc)
        w = weight.to(cdtype)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h_c, gl = hidden[s:e].to(cdtype), grad_logp[s:e, None]  # [c, H], [c, 1]
            z = _chunk_logits(h_c, w, temperature)  # [c, V], recomputed
            z.sub_(lse[s:e, None])  # log p
            p = torch.exp(z)  # [c, V]
            # d logp_target / dz = onehot - p;   d H / dz = -p * (log p + H)
            if grad_ent is not None:
                ge = grad_ent[s:e, None].to(acc)
                g = z.add_(ent[s:e, None]).mul_(ge).add_(gl).mul_(p).neg_()  # -p*(gl + ge*(logp+H))
                del p
            else:
                del z
                g = p.mul_(-gl)  # -p * gl
            g.scatter_add_(1, targets[s:e, None], gl)  # + gl * onehot
            if temperature != 1.0:
                g.div_(temperature)  # z = logits / temperature
            g = g.to(cdtype)  # [c, V] gradient of the lm_head output
            if need_h:
                grad_h[s:e] = g @ w  # [c, H]
            if need_w:
                if cdtype == acc:
                    grad_w.addmm_(g.t(), h_c)
                else:
                    grad_w.add_(g.t() @ h_c)  # [V, H] product in bf16, summed in fp32
            del g
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, with_entropy: bool = False,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """hidden [B, T, H] (final normed), weight [V, H] (lm_head.weight), targets [B, T], mask [B, T] | None
    -> (logp [B, T], entropy [B, T] | None) in fp32, differentiable in hidden and weight; 0 where mask is 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    B, T, H = hidden.shape
    flat_h = hidden.reshape(B * T, H)  # [N, H]
    flat_t = targets.reshape(B * T).long()  # [N]
    idx = None
    if mask is not None:
        idx = mask.reshape(B * T).nonzero().squeeze(1)  # [n] positions that are computed
        flat_h, flat_t = flat_h.index_select(0, idx), flat_t.index_select(0, idx)
    out = _ChunkedLinearLogProb.apply(flat_h, weight, flat_t, float(temperature), int(chunk_size), bool(with_entropy))
    logp, ent = out if with_entropy else (out, None)
    if idx is not None:  # scatter the computed rows back; index_copy is differentiable in its source
        logp = logp.new_zeros(B * T).index_copy(0, idx, logp)
        ent = ent.new_zeros(B * T).index_copy(0, idx, ent) if ent is not None else None
    return logp.view(B, T), (ent.view(B, T) if ent is not None else None)

