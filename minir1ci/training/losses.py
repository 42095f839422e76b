"""Advantages, per-token RL losses and their aggregation, as pure functions on tensors.

Everything here works on [B, T] tensors aligned with the response tokens, plus one loss mask
m [B, T]: 1 on tokens the model sampled, 0 on prompt, interpreter output and padding. The
*same* mask goes into every masked quantity (policy loss, KL, entropy, value loss, GAE,
whitening); a quantity masked differently from the others is a classic bug.

Per-token losses (`policy_loss`, `kl_penalty`, `value_loss`, the entropy from
`logprobs.token_logprobs`) are returned unaggregated; `aggregate` reduces them with the mask
and an explicit denominator. The denominator belongs to the whole optimizer step, not to a
micro-batch: a mean of per-micro-batch means is not the batch mean. A trainer does

    denom = all_reduce_sum(step_denominator([mb.mask for mb in step], mode, max_len))   # distributed.py
    for mb in step:                                  # every micro-batch on this rank
        loss = aggregate(loss_tok(mb), mb.mask, mode, denom)
        loss.backward()                              # gradients add up across micro-batches
    # then all-reduce the gradients with SUM across ranks (DDP/FSDP average them: multiply
    # the loss by the world size, or divide denom by it, to turn their mean into a sum)

and the sum over micro-batches and ranks equals the loss of the global batch:

    mode                     global loss                          denom (whole step)
    token-mean               sum m*l / sum m                      valid tokens
    seq-mean-token-mean      mean_i (sum_t m*l / sum_t m)         sequences
    seq-mean-token-sum       mean_i sum_t m*l                     sequences
    seq-mean-token-sum-norm  sum m*l / (n_seq * C)  (Dr. GRPO)    sequences * C

Each is a sum of per-token (or per-sequence) terms over one fixed denominator, so it splits
into micro-batches exactly. "Sequences" counts rows with at least one loss token: a row that
is all mask 0 (an empty response, a padding row) contributes nothing and is not counted.

Conventions (veRL/TRL/OpenRLHF, see REFERENCE.md section 3): GRPO std unbiased with eps 1e-6
and a group of one taken as mean 0, std 1; log-ratio clamped to +-20 before exp; dual clip
c = 3 for A < 0; k3 clamped to [-10, 10]; value loss 0.5 * max of clipped and unclipped
squared errors; whitening with unbiased variance and eps 1e-8; GAE skips masked tokens.

Simplified: advantage whitening is over the tensor it is given (call it on the whole rollout
batch of one rank; no cross-rank statistics); metrics are per-call token means for logging.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: finite in fp32, so ratios never overflow
KL_CLAMP = 10.0


# ----------------------------------------------------------------------------- masked statistics

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask is 1. `where`, not `x * mask`: a NaN/inf at a masked spot stays out."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over mask-1 entries (0 when there are none)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over mask-1 entries; unbiased variance (n - 1). [B, T] -> [B, T].

    With shift_mean=False the mean is added back (only the scale changes). Masked entries are 0.
    """
    m = mask.bool()
    n = m.sum()
    mean = masked_sum(x, m) / n.clamp(min=1)
    var = masked_sum((x - mean) ** 2, m) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- advantages

def grpo_advantages(scores: Tensor, groups: Tensor | int, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: A_i = (s_i - mean_g) / (std_g + eps), or s_i - mean_g (Dr. GRPO).

    scores [N] (one scalar per response); groups: [N] ids of the prompt each response answers,
    or an int G meaning consecutive groups of G. std is unbiased (n - 1); a group of one gets
    mean 0 and std 1, so its advantage is its score (as veRL). Returns [N]; broadcast it over the
    response tokens with `adv[:, None]` and the loss mask.
    """
    s = scores.float()
    n = s.shape[0]
    if isinstance(groups, int):
        if n % groups:
            raise ValueError(f"{n} scores do not split into groups of {groups}")
        ids = torch.arange(n, device=s.device) // groups
    else:
        if groups.shape != scores.shape:
            raise ValueError(f"groups {tuple(groups.shape)} must match scores {tuple(scores.shape)}")
        ids = torch.unique(groups, return_inverse=True)[1]  # [N] in 0..num_groups-1
    num = int(ids.max()) + 1 if n else 0
    count = torch.zeros(num, device=s.device).index_add_(0, ids, torch.ones_like(s))  # [G]
    mean = torch.zeros(num, device=s.device).index_add_(0, ids, s) / count  # [G]
    lo = torch.full((num,), math.inf, device=s.device).scatter_reduce(0, ids, s, "amin")  # [G]
    hi = torch.full((num,), -math.inf, device=s.device).scatter_reduce(0, ids, s, "amax")
    # equal rewards carry no signal: exactly 0, not the mean's rounding divided by a tiny std
    dev = torch.where((lo == hi)[ids], torch.zeros_like(s), s - mean[ids])  # [N]
    var = torch.zeros(num, device=s.device).index_add_(0, ids, dev**2) / (count - 1).clamp(min=1)
    single = count[ids] == 1  # [N]
    centred = torch.where(single, s, dev)  # group of one: mean 0
    if not norm_std:
        return centred
    std = torch.where(single, torch.ones_like(s), var.sqrt()[ids])  # group of one: std 1
    return centred / (std + eps)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation that skips mask-0 tokens. Returns (advantages, returns), [B, T].

    rewards, values, mask [B, T]. Scanning t = T-1 .. 0:
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next
    and only when m_t = 1 do V_next <- V_t and A_next <- A_t. Interpreter output between two
    model turns is thus invisible: the model token before it bootstraps from the model token
    after it, one gamma step away, and the values and rewards at masked positions never enter.
    Put the sequence reward (and any per-token KL penalty) on mask-1 tokens only.
    returns = A + V, before any whitening (whiten A afterwards with `masked_whiten`).
    Both outputs are 0 where mask is 0.
    """
    r, v, m = rewards.float(), values.float(), mask.bool()
    B, T = r.shape
    adv = torch.zeros_like(v)  # [B, T]
    v_next = torch.zeros(B, dtype=v.dtype, device=v.device)  # [B]
    a_next = torch.zeros_like(v_next)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * v_next - v[:, t]
        a_t = delta + gamma * lam * a_next
        v_next = torch.where(m[:, t], v[:, t], v_next)
        a_next = torch.where(m[:, t], a_t, a_next)
        adv[:, t] = a_t
    zero = torch.zeros_like(adv)
    adv = torch.where(m, adv, zero)
    returns = torch.where(m, adv + v, zero)
    return adv, returns


# ----------------------------------------------------------------------------- per-token losses

def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate per token (PPO/GRPO), with clip-higher and dual clip. Returns (loss_tok [B, T], metrics).

    logp, old_logp, advantages, mask [B, T]. rho = exp(clamp(logp - old_logp, +-20)).
        l = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))
        l = min(l, -c * A)  where A < 0 (dual clip: bounds the loss when rho is huge)
    eps_high = 0.28 is DAPO's clip-higher; dual_clip_c=None turns dual clip off (else c > 1).
    Metrics (detached token means over the mask): clipfrac (the clipped branch is taken),
    dual_clipfrac (the dual bound is taken), ppo_kl (mean of old_logp - logp).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    dual_taken = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip_c is not None:
        bound = -dual_clip_c * advantages
        dual_taken = (advantages < 0) & (loss > bound)
        loss = torch.where(dual_taken, bound, loss)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "dual_clipfrac": masked_mean(dual_taken.float(), mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
        }
    return loss, metrics


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 3e-4,
              eps_high: float = 4e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: one ratio per sequence, s_i = exp(mean over its mask-1 tokens of log(pi / pi_old)), and
    l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)), A_i the row's mean advantage.

    [B, T] inputs; returns l_i on every mask-1 token of row i ([B, T]; seq-mean-token-mean
    aggregation gives the paper's mean over sequences) and clipfrac (tokens of clipped rows).
    """
    m = mask.bool()
    s = torch.exp(masked_mean(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), m, dim=-1))  # [B]
    adv = masked_mean(advantages, m, dim=-1)  # [B]
    unclipped, clipped = -adv * s, -adv * torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.where(m, torch.maximum(unclipped, clipped)[:, None], torch.zeros((), device=logp.device))
    with torch.no_grad():
        frac = masked_mean((clipped > unclipped)[:, None].expand_as(m).float(), m)
    return loss, {"clipfrac": frac}


def cispo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 0.2,
               eps_high: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: l_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi_t, [B, T] -> [B, T].

    The clipped weight is detached, so every token keeps the gradient -w_t A_t grad log pi_t
    (the clipped PPO loss gives a clipped token none). clipfrac: tokens whose rho is clipped.
    """
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    loss = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages * logp
    frac = masked_mean(((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).float(), mask)
    return loss, {"clipfrac": frac}


# ----------------------------------------------------------------------------- sampler/trainer mismatch
# mu = the sampler's probability of the sampled token, pi_old the trainer's (REFERENCE.md 3b).

def policy_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """The per-token policy loss `cfg.policy_loss` names, with its clip settings from `cfg`."""
    if cfg.policy_loss == "gspo":
        return gspo_loss(logp, old_logp, advantages, mask, cfg.gspo_clip_low, cfg.gspo_clip_high)
    if cfg.policy_loss == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high)
    return policy_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


def tis_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(pi_old / mu, cap) per token, [B, T], detached; 0 off the
    mask. Multiply the per-token policy loss by them (token-level TIS)."""
    w = torch.exp(torch.clamp(old_logp - sampler_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
    return torch.where(mask.bool(), w, torch.zeros_like(w)).detach()


def sequence_in_bounds(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """[B] bool: the row's geometric-mean ratio exp(mean_t log(pi_old / mu)) lies in [low, high]
    (a bound of 0 leaves that side open). Rows outside are dropped from the loss (sequence-level MIS)."""
    rho = torch.exp(masked_mean(old_logp - sampler_logp, mask, dim=-1))  # [B]; 1 for an empty row
    return (rho >= low) & ((rho <= high) if high > 0 else True)


def mismatch_sums(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """[4] float64 sums over mask-1 tokens: k3 of KL(mu || pi_old), |log pi_old - log mu|, ratios
    pi_old / mu outside [0.5, 2], and the token count. Sum over ranks, then divide by the count."""
    m = mask.bool()
    d = old_logp - sampler_logp
    ratio = torch.exp(torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    out = ((ratio < 0.5) | (ratio > 2.0)).float()
    k3 = kl_penalty(sampler_logp, old_logp, "k3")  # samples come from mu: k3 = r - 1 - log r, r = pi_old / mu
    return torch.stack([masked_sum(k3, m), masked_sum(d.abs(), m), masked_sum(out, m), m.sum().float()]).double()


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens, [B, T] -> [B, T].

    delta = logp - ref_logp;  k1 = delta (PPO's KL-in-reward), k2 = delta^2 / 2,
    k3 = exp(-delta) + delta - 1 ("low_var_kl", GRPO's loss term), clamped to [-10, 10]; delta
    is clamped to +-20 first so exp never overflows and the gradient stays finite.
    """
    delta = logp - ref_logp
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        delta = torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(-delta) + delta - 1.0, -KL_CLAMP, KL_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.5, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2).

    values (current critic), old_values (critic at rollout time), returns [B, T]. Returns
    (loss_tok [B, T], metrics). vf_clipfrac is the fraction of tokens (of mask-1 tokens when a
    mask is given) where the clipped term is the larger one. Aggregate loss_tok with the mask.
    """
    v_clipped = torch.clamp(values, old_values - clip, old_values + clip)  # V itself: old + (V - old) != V in fp32
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(err, err_clipped)
    with torch.no_grad():
        taken = (err_clipped > err).float()
        frac = taken.mean() if mask is None else masked_mean(taken, mask)
    return loss, {"vf_clipfrac": frac}


# ----------------------------------------------------------------------------- aggregation

def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")


def step_denominator(masks: Tensor | Sequence[Tensor], mode: str, max_len: int | None = None) -> Tensor:
    """This rank's share of the loss denominator for one optimizer step (see the module docstring).

    masks: the loss masks [B_k, T_k] of every micro-batch of the step on this rank (or one
    mask). token-mean -> valid tokens; seq-mean-token-mean / seq-mean-token-sum -> sequences
    with a valid token; seq-mean-token-sum-norm -> those sequences * max_len (C, a constant such
    as the response budget, never the padded length of a micro-batch). Returns a float32
    scalar; sum it over ranks (`distributed.all_reduce_sum`) before use.
    """
    _check_mode(mode)
    if isinstance(masks, Tensor):
        masks = [masks]
    if not masks:
        raise ValueError("step_denominator needs at least one mask")
    if mode == "token-mean":
        total = sum(m.bool().sum() for m in masks)
    else:
        total = sum(m.bool().any(dim=-1).sum() for m in masks)
        if mode == "seq-mean-token-sum-norm":
            if max_len is None or max_len <= 0:
                raise ValueError("seq-mean-token-sum-norm needs max_len, the constant C")
            total = total * max_len
    return total.float()


def aggregate(loss_tok: Tensor, mask: Tensor, mode: str, denom: Tensor | float) -> Tensor:
    """One micro-batch's share of the step loss: a masked sum over its tokens / the step denominator.

    loss_tok, mask [B, T]; denom from step_denominator, summed over ranks. Summed over the
    step's micro-batches and ranks this gives the global-batch loss of `mode`. Scalar.
    """
    _check_mode(mode)
    if mode == "seq-mean-token-mean":
        m = mask.bool()
        per_seq = masked_sum(loss_tok, m, dim=-1) / m.sum(-1).clamp(min=1)  # [B] token means
        numer = per_seq.sum()  # empty rows add 0 and are not in denom
    else:
        numer = masked_sum(loss_tok, mask)
    # Any positive denominator as given (a count divided by the world size may be < 1); a zero
    # one (no loss token anywhere) leaves the loss 0, as its numerator is 0 too.
    tiny = torch.finfo(numer.dtype).tiny
    if isinstance(denom, Tensor):
        return numer / denom.to(numer.device, numer.dtype).clamp(min=tiny)
    return numer / max(float(denom), tiny)
