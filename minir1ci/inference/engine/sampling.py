"""Turning one step's logits into tokens and log-probs: pure functions, vectorised over the batch.

Each token comes with its raw log-prob (temperature 1, what a trainer recomputes as pi_old) and its
log-prob under the processed distribution it was drawn from (fp32 logits / temperature as in
logprobs.py, then top-k, then top-p). Seeded rows draw from their own generator.

Simplified against vLLM/HF: no repetition penalties, min_p, typical-p or logit bias.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minir1ci.inference.engine.sequence import SamplingParams


def mask_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's top_k largest logits (ties at the k-th value kept, as HF does); 0 = all.
    logits [B, V], top_k [B] long."""
    k = top_k.clamp(0, logits.shape[-1])
    kmax = int(k.max())
    kth = logits.topk(kmax, dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [B, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p: token i (in
    descending order) stays when the mass strictly before it is < top_p, so the top token always
    stays. logits [B, V], top_p [B]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs                                # [B, V]
    drop_sorted = mass_before >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def processed_logits(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """fp32 logits / temperature, then top-k and top-p masks, each applied only when some row
    uses it. Greedy rows (temperature 0) are scaled by 1; their result is not used."""
    out = logits
    temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temps):
        out = out / torch.tensor(temps, device=logits.device, dtype=logits.dtype)[:, None]
    if any(p.top_k > 0 for p in params):
        out = mask_top_k(out, torch.tensor([p.top_k for p in params], device=logits.device))
    if any(p.top_p < 1.0 for p in params):
        out = mask_top_p(out, torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype))
    return out


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None], rows: list[int],
                      default: torch.Generator | None, device: torch.device) -> Tensor:
    """E ~ Exp(1) of `shape` [B, V]; rows in `rows` are drawn, seeded rows from their own generator."""
    noise = torch.ones(shape, device=device)
    shared = [i for i in rows if generators[i] is None]
    if len(shared) == shape[0]:
        noise.exponential_(generator=default)
    elif shared:
        idx = torch.tensor(shared, device=device)
        noise[idx] = torch.empty(len(shared), shape[1], device=device).exponential_(generator=default)
    for i in rows:
        if generators[i] is not None:
            noise[i].exponential_(generator=generators[i])
    # Exp(1) is > 0 almost surely; the clamp only guards p / E against a 0 from a coarse RNG.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


_CDF_BLOCK = 512  # tokens per block of the two-level inverse CDF


def inverse_cdf(probs: Tensor, generators: list[torch.Generator | None], rows: list[int],
                default: torch.Generator | None) -> Tensor:
    """Token [B] of each row: the first whose cumulative probability exceeds u * total, u ~ U[0, 1)
    (rows not in `rows` get u = 0; their token is replaced). `probs` [B, V] may be unnormalised.

    Two levels over a large vocabulary (a [32, 151936] cumsum cost 12 ms a step): block masses of
    _CDF_BLOCK tokens find the block, a cumsum inside it the token. Block sums are fp32 (fp64 cost
    20x more), cumulated in fp64. A zero-probability token is never picked; a target rounded past
    the last cumulative sum steps back to the last block (token) with mass."""
    B, V = probs.shape
    u = torch.zeros(B, dtype=torch.float64)
    shared = [i for i in rows if generators[i] is None]
    if shared:
        u[shared] = torch.rand(len(shared), generator=default, dtype=torch.float64)
    for i in rows:
        if generators[i] is not None:
            u[i] = torch.rand(1, generator=generators[i], dtype=torch.float64)
    if V <= 8 * _CDF_BLOCK:  # a small vocabulary: one cumulative sum costs fewer ops than two levels
        cdf = probs.double().cumsum(-1)                                                  # [B, V]
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        over = (tokens >= V).nonzero()[:, 0]
        if len(over):
            tokens[over] = (probs[over] > 0).long().cumsum(-1).argmax(-1)
        return tokens
    S = _CDF_BLOCK
    full = V // S * S
    sums = probs[:, :full].reshape(B, full // S, S).sum(-1)                              # [B, V // S]
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], 1)                # [B, NB]
    cdf = sums.double().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]                                                   # [B, 1]
    block = torch.searchsorted(cdf, target, right=True)[:, 0]                            # [B]
    past = block >= cdf.shape[1]
    if bool(past.any()):
        block = torch.where(past, (sums > 0).long().cumsum(-1).argmax(-1), block)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    cols = block[:, None] * S + torch.arange(S)                                          # [B, S]
    inside = probs.gather(1, cols.clamp(max=V - 1)).double().masked_fill_(cols >= V, 0.0)
    offset = torch.searchsorted(before[:, None] + inside.cumsum(-1), target, right=True)[:, 0]
    over = (offset >= S).nonzero()[:, 0]
    if len(over):
        offset[over] = (inside[over] > 0).long().cumsum(-1).argmax(-1)
    return block * S + offset


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, V] -> (tokens [B] long, raw log-probs [B], sampling log-probs [B]), all in fp32.
    Log-probs are the chosen logit minus the row's logsumexp: no [B, V] log-softmax is made."""
    logits = logits.float()
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:  # all greedy: the point mass has log-prob 0
        tokens = logits.argmax(-1)
        return tokens, _pick(logits, tokens) - logits.logsumexp(-1), torch.zeros(len(params), device=logits.device)

    proc = processed_logits(logits, params)
    top = proc.amax(-1, keepdim=True)                                      # [B, 1]
    probs = (proc - top).exp_()                                            # [B, V] unnormalised
    proc_lse = top[:, 0] + probs.sum(-1).log()                             # [B], the logsumexp
    lse = proc_lse if proc is logits else logits.logsumexp(-1)
    # Both draws pick token i with probability p_i, but not the same tokens. On a CPU, B x V exponentials
    # cost more than a tiny model's step; on a GPU the exponential race argmax(p / E), E ~ Exp(1)
    # (Gumbel-max in another form), needs no cumulative sum and no host sync.
    if logits.device.type == "cpu":
        tokens = inverse_cdf(probs, generators, sampled_rows, default_generator)
    else:
        noise = exponential_noise(tuple(logits.shape), generators, sampled_rows, default_generator, logits.device)
        tokens = (probs / noise).argmax(-1)                                # [B]
    sampling_logp = _pick(proc, tokens) - proc_lse
    if len(sampled_rows) < len(params):
        greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
        sampling_logp = sampling_logp.masked_fill(greedy, 0.0)
    return tokens, _pick(logits, tokens) - lse, sampling_logp


def _pick(x: Tensor, tokens: Tensor) -> Tensor:
    """x[i, tokens[i]] for each row: [B, V], [B] -> [B]."""
    return x.gather(1, tokens[:, None])[:, 0]
