"""Advantages, per-token RL losses and their aggregation: pure functions on tensors.

Tensors are [B, T], aligned with the response tokens, with one loss mask m [B, T]: 1 on tokens the
model sampled, 0 on prompt, interpreter output and padding. The same mask goes into every masked
quantity (policy loss, KL, entropy, value loss, GAE, whitening). Per-token losses are returned
unaggregated; `aggregate` divides a micro-batch's masked sum by a denominator counted over the
whole optimizer step (`step_denominator`, summed over ranks), so the micro-batch losses of every
rank add up to the global-batch loss (a mean of per-micro-batch means would not):

    mode                     global loss                          denom (whole step)
    token-mean               sum m*l / sum m                      valid tokens
    seq-mean-token-mean      mean_i (sum_t m*l / sum_t m)         sequences
    seq-mean-token-sum       mean_i sum_t m*l                     sequences
    seq-mean-token-sum-norm  sum m*l / (n_seq * C)  (Dr. GRPO)    sequences * C

"Sequences" counts rows with at least one loss token. Conventions (veRL/TRL/OpenRLHF, REFERENCE.md
section 3): GRPO std unbiased with eps 1e-6, a group of one has mean 0 and std 1; log-ratio clamped
to +-20 before exp; dual clip c = 3 for A < 0; k3 clamped to [-10, 10]; value loss 0.5 * max of
clipped and unclipped squared errors; whitening with unbiased variance and eps 1e-8.

Simplified: whitening is over the tensor given (one rank's batch, no cross-rank statistics).
"""
from __future__ import annotations

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


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over mask-1 entries, unbiased variance; [B, T] -> [B, T], 0 off the mask."""
    m = mask.bool()
    n = m.sum()
    mean = masked_sum(x, m) / n.clamp(min=1)
    var = masked_sum((x - mean) ** 2, m) / (n - 1).clamp(min=1)
    return torch.where(m, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


# ----------------------------------------------------------------------------- advantages

def grpo_advantages(scores: Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = (s_i - mean_g) / (std_g + eps), or s_i - mean_g (Dr. GRPO): scores [N], consecutive groups of
    `group_size` -> [N]. A group of one gets mean 0 and std 1, so its advantage is its score (as veRL)."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    s = scores.float().view(-1, group_size)  # [G, n]
    if group_size == 1:
        return (s / (1.0 + eps) if norm_std else s).view(-1)
    # equal rewards carry no signal: exactly 0, not the mean's rounding divided by a tiny std
    flat = (s.amax(dim=1) == s.amin(dim=1))[:, None]  # [G, 1]
    dev = torch.where(flat, torch.zeros_like(s), s - s.mean(dim=1, keepdim=True))
    if not norm_std:
        return dev.view(-1)
    std = (dev.pow(2).sum(dim=1, keepdim=True) / (group_size - 1)).sqrt()  # unbiased
    return (dev / (std + eps)).view(-1)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE skipping mask-0 tokens: rewards, values, mask [B, T] -> (advantages, returns) [B, T], 0 off the mask.

    delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next; V_next and A_next move only
    where m_t = 1, so interpreter output between two turns is invisible (the token before it
    bootstraps from the token after it; put rewards on mask-1 tokens). returns = A + V, unwhitened."""
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
    adv = torch.where(m, adv, 0.0)
    return adv, torch.where(m, adv + v, 0.0)


# ----------------------------------------------------------------------------- per-token losses

def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 0.2,
                eps_high: float = 0.2, dual_clip_c: float | None = 3.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate per token (PPO/GRPO): [B, T] inputs -> (loss_tok [B, T], metrics).

    l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), then min(l, -c A) where A < 0 (dual
    clip, off with dual_clip_c=None); eps_high = 0.28 is DAPO's clip-higher. clipfrac: the share of
    mask-1 tokens whose ratio was clipped."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        bound = -dual_clip_c * advantages
        loss = torch.where((advantages < 0) & (loss > bound), bound, loss)
    with torch.no_grad():
        return loss, {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 3e-4,
              eps_high: float = 4e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: one ratio per row, s_i = exp(masked mean of log(pi / pi_old)); [B, T] -> [B, T] holding
    l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) on every mask-1 token of row i
    (A_i the row's mean advantage; seq-mean-token-mean gives the paper's mean over sequences)."""
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
    The weight is detached, so a clipped token keeps its gradient (clipped PPO gives it none)."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    loss = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages * logp
    frac = masked_mean(((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).float(), mask)
    return loss, {"clipfrac": frac}


def policy_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg) -> tuple[Tensor, dict]:
    """The per-token policy loss `cfg.policy_loss` names, with its clip settings; [B, T] -> [B, T]."""
    if cfg.policy_loss == "gspo":
        return gspo_loss(logp, old_logp, advantages, mask, cfg.gspo_clip_low, cfg.gspo_clip_high)
    if cfg.policy_loss == "cispo":
        return cispo_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high)
    return policy_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate, [B, T] -> [B, T]. delta = logp - ref_logp; k1 = delta (PPO's
    reward), k2 = delta^2 / 2, k3 = exp(-delta) + delta - 1 (GRPO's loss; delta clamped so exp is finite)."""
    delta = logp - ref_logp
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta**2
    delta = torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)   # k3 (config.py refuses other names)
    return torch.clamp(torch.exp(-delta) + delta - 1.0, -KL_CLAMP, KL_CLAMP)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float,
               mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2): [B, T] -> (loss_tok [B, T], metrics).
    vf_clipfrac: share of (mask-1) tokens where the clipped term is the larger."""
    v_clipped = torch.clamp(values, old_values - clip, old_values + clip)  # V itself: old + (V - old) != V in fp32
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(err, err_clipped)
    with torch.no_grad():
        return loss, {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask)}


# ----------------------------------------------------------------------------- sampler/trainer mismatch
# mu = the sampler's probability of the sampled token, pi_old the trainer's (REFERENCE.md 3b).

def tis_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level TIS weights min(pi_old / mu, cap), [B, T] -> [B, T], detached, 0 off the mask."""
    w = torch.exp(torch.clamp(old_logp - sampler_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
    return torch.where(mask.bool(), w, torch.zeros_like(w)).detach()


def sequence_in_bounds(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """Sequence-level MIS, [B, T] -> [B] bool: exp(mean_t log(pi_old / mu)) lies in [low, high] (0 = open)."""
    rho = torch.exp(masked_mean(old_logp - sampler_logp, mask, dim=-1))  # [B]; 1 for an empty row
    return (rho >= low) & ((rho <= high) if high > 0 else True)


def mismatch_sums(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """[B, T] -> float64 sums over mask-1 tokens, to add over ranks and divide by `mismatch_tokens`:
    k3 of KL(mu || pi_old), |log pi_old - log mu|, and the ratios outside [0.5, 2]."""
    m = mask.bool()
    d = old_logp - sampler_logp
    ratio = torch.exp(torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    k3 = kl_penalty(sampler_logp, old_logp, "k3")  # samples come from mu: k3 = r - 1 - log r, r = pi_old / mu
    sums = {"mismatch_kl": masked_sum(k3, m), "mismatch_abs": masked_sum(d.abs(), m),
            "mismatch_frac_out": masked_sum(((ratio < 0.5) | (ratio > 2.0)).float(), m), "mismatch_tokens": m.sum()}
    return {k: v.double() for k, v in sums.items()}


# ----------------------------------------------------------------------------- aggregation

def step_denominator(mask: Tensor, mode: str, max_len: int = 0) -> Tensor:
    """This rank's share of one step's loss denominator (module docstring): the mask [B, T] of its whole
    mini-batch -> float32 scalar; sum it over ranks before use. C = max_len (seq-mean-token-sum-norm) is
    a constant such as the response budget, never a micro-batch's padded length."""
    if mode == "token-mean":
        return mask.bool().sum().float()
    seqs = mask.bool().any(dim=-1).sum().float()
    return seqs * max_len if mode == "seq-mean-token-sum-norm" else seqs


def aggregate(loss_tok: Tensor, mask: Tensor, mode: str, denom: Tensor) -> Tensor:
    """One micro-batch's share of the step loss: loss_tok, mask [B, T] -> scalar masked sum / denom."""
    if mode == "seq-mean-token-mean":
        m = mask.bool()
        numer = (masked_sum(loss_tok, m, dim=-1) / m.sum(-1).clamp(min=1)).sum()  # [B] token means, summed
    else:
        numer = masked_sum(loss_tok, mask)
    # Any positive denominator as given (a count divided by the world size may be < 1); a zero one
    # (no loss token anywhere) leaves the loss 0, as its numerator is 0 too.
    return numer / denom.to(numer.device, numer.dtype).clamp(min=torch.finfo(numer.dtype).tiny)
