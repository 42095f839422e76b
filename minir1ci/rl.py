"""Pure pieces shared by the GRPO and PPO loops: rollouts to tensors, log-probs, rewards, curriculum.

Alignment used throughout: a trajectory is `ids = prompt_ids + response_ids`; position t
predicts ids[t+1], so response token k (at index P+k) is scored at position P+k-1. Every
per-token tensor here ([B, T], T = longest ids in the batch) is indexed by *position*, and the
loss mask at position P+k-1 is the rollout's loss_mask[k]: 1 for tokens the model sampled, 0 for
inserted interpreter output, the prompt and padding. Trainers never see text.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from . import distributed as dist
from .data import pad_batch
from .interpreter import RolloutParams, prompt_ids, run_rollouts
from .rewards import RewardConfig, compute_reward
from .trainutil import step_seed


@dataclass
class RLBatch:
    """One optimizer step's trajectories as padded tensors (CPU), position-aligned."""
    ids: torch.Tensor          # [B, T] prompt + response, right-padded
    attn: torch.Tensor         # [B, T] 1 on real tokens
    targets: torch.Tensor      # [B, T] ids[t+1] (0 past the end)
    mask: torch.Tensor         # [B, T] loss mask by position (sampled response tokens only)
    sampler_logp: torch.Tensor  # [B, T] the sampler's log-prob of each sampled token (0 elsewhere)
    scores: torch.Tensor       # [B] sequence rewards
    groups: torch.Tensor       # [B] prompt index of each trajectory

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, idx: slice | list[int]) -> "RLBatch":
        pick = (lambda t: t[idx]) if isinstance(idx, slice) else (lambda t: t[torch.as_tensor(idx)])
        return RLBatch(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def to_batch(trajs, scores: list[float], groups: list[int]) -> RLBatch:
    seqs, masks, logps = [], [], []
    for tr in trajs:
        P = len(tr.prompt_ids)
        ids = list(tr.prompt_ids) + list(tr.response_ids)
        mask = [0] * len(ids)
        logp = [0.0] * len(ids)
        for k, (m, lp) in enumerate(zip(tr.loss_mask, tr.logprobs)):
            mask[P + k - 1] = int(m)
            logp[P + k - 1] = float(lp) if m else 0.0
        seqs.append(ids), masks.append(mask), logps.append(logp)
    ids, attn, mask = pad_batch(seqs, 0, masks)
    sampler_logp = torch.zeros(ids.shape, dtype=torch.float32)
    for i, lp in enumerate(logps):
        sampler_logp[i, :len(lp)] = torch.tensor(lp)
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    return RLBatch(ids, attn, targets, mask, sampler_logp, torch.tensor(scores, dtype=torch.float32),
                   torch.tensor(groups, dtype=torch.long))


def sample_rollouts(model, tokenizer, sandbox, prompts: list[list[int]], n: int, params: RolloutParams):
    """run_rollouts on the policy in eval mode; an FSDP2-sharded policy is first gathered into a
    whole copy on every rank (all ranks must call this), freed when this returns."""
    sampling = dist.unsharded_copy(model)
    was_training = model.training
    model.eval()
    try:
        return run_rollouts(sampling, tokenizer, sandbox, prompts, n, params)
    finally:
        model.train(was_training)


def collect(model, tokenizer, sandbox, examples, cfg, step: int, rank: int, pools=None):
    """One step's rollouts on this rank: pick its share of prompts (deterministic in seed and step),
    sample `n_samples` trajectories each with the interpreter, score them.

    Returns (trajectories, rewards, correctness, RLBatch)."""
    idx = dist.shard(pick_prompts(len(examples), cfg.prompts_per_step, step, cfg.seed, cfg.steps, pools))
    exs = [examples[i] for i in idx]
    trajs = sample_rollouts(model, tokenizer, sandbox, prompt_ids(tokenizer, exs, cfg.use_code), cfg.n_samples,
                            rollout_params(cfg, seed=step_seed(cfg.seed, step, rank)))
    rewards, correct = score_trajectories(exs, trajs, cfg.n_samples, cfg)
    batch = to_batch(trajs, rewards, [i // cfg.n_samples for i in range(len(trajs))])
    return trajs, rewards, correct, batch


def rollout_params(cfg, seed: int, temperature: float | None = None) -> RolloutParams:
    return RolloutParams(temperature=cfg.temperature if temperature is None else temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, max_code_calls=cfg.max_code_calls,
                         use_code=cfg.use_code, seed=seed)


def score_trajectories(examples, trajs, n: int, cfg) -> tuple[list[float], list[float]]:
    """(rewards, correctness) for trajectories grouped n per example, in order."""
    rcfg = RewardConfig(plain=cfg.reward_plain)
    rewards, correct = [], []
    for i, tr in enumerate(trajs):
        s = examples[i // n].score(tr.text)
        correct.append(s)
        rewards.append(compute_reward(s, tr.turns, rcfg))
    return rewards, correct


@torch.no_grad()
def batch_logprobs(model, batch: RLBatch, micro: int, device, amp, temperature: float,
                   chunk_size: int) -> torch.Tensor:
    """Log-probs [B, T] of every sampled token under `model` (no grad), temperature-scaled."""
    out = torch.zeros(batch.ids.shape, dtype=torch.float32)
    was_training = model.training
    model.eval()
    for i in range(0, len(batch), micro):
        mb = batch.rows(slice(i, i + micro))
        with amp:
            logp, _ = model(mb.ids.to(device), attention_mask=mb.attn.to(device), targets=mb.targets.to(device),
                            target_mask=mb.mask.to(device), temperature=temperature, chunk_size=chunk_size)
        out[i:i + micro] = logp.float().cpu()
    model.train(was_training)
    return out


def minibatches(num_rows: int, cfg, seed: int):
    """Row indices of each mini-batch over `ppo_epochs` passes (shuffled unless one on-policy pass).

    Every rank draws the same permutation of its own rows, so ranks step the optimizer together.
    """
    mini = cfg.mini_batch_size or num_rows
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.ppo_epochs):
        shuffle = cfg.ppo_epochs > 1 or mini < num_rows
        order = torch.randperm(num_rows, generator=g).tolist() if shuffle else list(range(num_rows))
        for s in range(0, num_rows, mini):
            yield order[s:s + mini]


def rollout_stats(trajs, rewards: list[float], correct: list[float]) -> dict:
    n = max(len(trajs), 1)
    return {
        "reward": sum(rewards) / n,
        "accuracy": sum(correct) / n,
        "code_calls": sum(t.num_code_calls for t in trajs) / n,
        "code_use": sum(t.num_code_calls > 0 for t in trajs) / n,
        "response_len": sum(len(t.response_ids) for t in trajs) / n,
        "truncated": sum(t.finish_reason == "length" for t in trajs) / n,
    }


# ----------------------------------------------------------------------------- curriculum (paper v2)

CURRICULUM_STAGES = ((0.64, 1.0), (0.48, 0.64), (0.32, 0.48), (0.0, 0.32))


def potential(p: float) -> float:
    """Pi = 4p(1-p): 1 for questions solved half the time, 0 for always or never solved."""
    return 4.0 * p * (1.0 - p)


def curriculum_pools(success: list[float]) -> list[list[int]]:
    """Question indices per stage, highest-potential stage first (REFERENCE.md, curriculum)."""
    pools, placed = [], set()
    for lo, hi in CURRICULUM_STAGES:          # a boundary value goes to the earlier stage
        pool = [i for i, p in enumerate(success) if lo <= potential(p) <= hi and i not in placed]
        placed.update(pool)
        pools.append(pool)
    return pools


def pick_prompts(num_examples: int, k: int, step: int, seed: int, steps: int,
                 pools: list[list[int]] | None = None) -> list[int]:
    """k example indices for `step`, deterministic in (seed, step); staged when `pools` is given."""
    rng = random.Random(seed * 1_000_003 + step)
    candidates = list(range(num_examples))
    if pools:
        stage = min(step * len(pools) // max(steps, 1), len(pools) - 1)
        for s in range(stage, -1, -1):     # fall back to an easier stage when one is empty
            if pools[s]:
                candidates = pools[s]
                break
    if k <= len(candidates):
        return rng.sample(candidates, k)
    return [rng.choice(candidates) for _ in range(k)]


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
