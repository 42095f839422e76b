"""One RL step's experience: the policy's rollouts on this rank's prompts, scored, as position-aligned
tensors; the filters that drop trajectories from the loss; the paper's curriculum.

Alignment: `ids = prompt_ids + response_ids` and position t predicts ids[t+1], so every [B, T]
tensor is indexed by position: response token k (index P+k) is scored at P+k-1, where the loss mask
holds the rollout's loss_mask[k] (1 for sampled tokens, 0 for interpreter output, prompt, padding).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from minir1ci.env.interpreter import prompt_ids, rollout_params, run_rollouts
from minir1ci.env.prompts import extract_answer, pending_code
from minir1ci.env.rewards import RewardConfig, compute_reward
from minir1ci.training import distributed as dist
from minir1ci.training.data import next_token_targets, pad_batch
from minir1ci.training.runs import step_seed


@dataclass
class RLBatch:
    """One optimizer step's trajectories as padded tensors (CPU), position-aligned, and what the step
    computes for each row before the update (None where the step needs none)."""
    ids: torch.Tensor           # [B, T] prompt + response, right-padded
    attn: torch.Tensor          # [B, T] 1 on real tokens
    targets: torch.Tensor       # [B, T] ids[t+1] (0 past the end)
    mask: torch.Tensor          # [B, T] loss mask by position (sampled response tokens only)
    sampler_logp: torch.Tensor  # [B, T] the sampler's log-prob of each sampled token (0 elsewhere)
    scores: torch.Tensor        # [B] rewards
    correct: torch.Tensor       # [B] task scores (the accuracy)
    keep: torch.Tensor          # [B] bool, the trajectories the loss keeps (`loss_filter`; all at first)
    old_logp: torch.Tensor | None = None    # [B, T] pi_old
    ref_logp: torch.Tensor | None = None    # [B, T] the KL reference
    tis_w: torch.Tensor | None = None       # [B, T] TIS weights
    adv: torch.Tensor | None = None         # [B, T] advantages
    returns: torch.Tensor | None = None     # [B, T] PPO: GAE returns
    old_values: torch.Tensor | None = None  # [B, T] PPO: the critic's values before the update

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, idx: slice | list[int], device: torch.device | str = "cpu") -> "RLBatch":
        """The rows `idx`, every tensor on `device`, cut to the longest of them (rows are right-padded)."""
        idx = idx if isinstance(idx, slice) else torch.as_tensor(idx)
        T = max(int(self.attn[idx].sum(dim=1).max()), 1) if len(self) else 0
        return RLBatch(**{f.name: None if (x := getattr(self, f.name)) is None else
                          (x[idx, :T] if x.dim() == 2 else x[idx]).to(device) for f in fields(self)})

    def micro_batches(self, rows: list[int], micro: int) -> list[list[int]]:
        """`rows` in micro-batches of `micro`: a question's samples together, as they share its prompt
        (which the model then runs once per micro-batch: `model.shared_prefix`), longest first; each
        is cut to its own longest row. Losses divide by the whole step's denominator (losses.py), so
        the grouping changes no loss."""
        lengths, prompt_lens = self.attn.sum(dim=1), (self.mask.cumsum(dim=1) == 0).sum(dim=1)
        rows = sorted(rows, key=lambda i: (self.ids[i, :prompt_lens[i]].tolist(), -int(lengths[i])))
        return [rows[i:i + micro] for i in range(0, len(rows), micro)]


@torch.no_grad()
def no_grad_pass(fn, batch: RLBatch, micro: int, device, amp) -> torch.Tensor:
    """fn(micro-batch on `device`) -> [b, t] for the micro-batches of `batch`, as one [B, T]
    fp32 tensor on the CPU (pi_old, the KL reference's log-probs, the critic's values)."""
    out = torch.zeros(batch.ids.shape)
    for idx in batch.micro_batches(list(range(len(batch))), micro):
        x = batch.rows(idx, device)
        with amp:
            out[idx, :x.ids.shape[1]] = fn(x).float().cpu()
    return out


def to_batch(trajs, scores: list[float], correct: list[float], mask_tool_output: bool = True) -> RLBatch:
    """Trajectories as position-aligned tensors (mask and sampler log-probs shift left with the ids).
    With `mask_tool_output` False (an ablation) interpreter tokens are in `mask` too, with NaN in
    `sampler_logp` (they were not sampled) until train_rl fills in pi_old."""
    seqs = [list(t.prompt_ids) + list(t.response_ids) for t in trajs]
    masks = [[0] * len(t.prompt_ids) + [int(m or not mask_tool_output) for m in t.loss_mask] for t in trajs]
    ids, attn, mask = pad_batch(seqs, masks)
    logp = torch.zeros(ids.shape, dtype=torch.float32)
    for i, t in enumerate(trajs):
        lp = torch.tensor(t.logprobs, dtype=torch.float32)
        if not mask_tool_output:
            lp = lp.masked_fill(~torch.tensor(t.loss_mask, dtype=torch.bool), math.nan)
        logp[i, len(t.prompt_ids):len(t.prompt_ids) + len(lp)] = lp
    targets, mask, sampler_logp = next_token_targets(ids, mask, logp * mask)
    return RLBatch(ids, attn, targets, mask, sampler_logp, torch.tensor(scores, dtype=torch.float32),
                   torch.tensor(correct, dtype=torch.float32), torch.ones(len(trajs), dtype=torch.bool))


def collect(sampling, tokenizer, sandbox, examples, cfg, step: int, pools=None):
    """This rank's share of `prompts_per_step` prompts (deterministic in seed and step), `n_samples`
    scored trajectories each, sampled from `sampling` (the policy or its sampling copy; every rank
    calls this): (trajectories, RLBatch, {"ds_dropped_groups", "ds_extra_rounds"}).

    With `dynamic_sampling`, groups of equal rewards are set aside and up to `dynamic_sampling_rounds`
    more rounds sampled (every rank takes part in each) until this rank's share is full; if the
    rounds run out, set-aside groups fill it (their GRPO advantage is exactly 0)."""
    n, rounds = cfg.n_samples, (cfg.dynamic_sampling_rounds if cfg.dynamic_sampling else 0)
    want = len(dist.shard(range(cfg.prompts_per_step)))   # groups on this rank
    kept, flat, extra, rcfg = [], [], 0, RewardConfig(plain=cfg.reward_plain)
    for r in range(1 + rounds):
        if r and not dist.all_reduce_sum(torch.tensor([want - min(len(kept), want)])).item():
            break                                   # every rank is full
        extra += r > 0
        idx = dist.shard(pick_prompts(len(examples), cfg.prompts_per_step, step, cfg.seed + 7919 * r, cfg.steps, pools))
        exs = [examples[i] for i in idx]
        params = rollout_params(cfg, seed=step_seed(cfg.seed, step, dist.rank() + 1000 * r))
        trajs = run_rollouts(sampling, tokenizer, sandbox, prompt_ids(tokenizer, exs, cfg.use_code), n, params)
        correct = [exs[i // n].score(t.model_text) for i, t in enumerate(trajs)]
        rewards = [compute_reward(s, t.turns, rcfg) for s, t in zip(correct, trajs)]
        for g in range(len(exs)):
            group = [(trajs[k], rewards[k], correct[k]) for k in range(g * n, (g + 1) * n)]
            (flat if cfg.dynamic_sampling and len(set(rewards[g * n:(g + 1) * n])) == 1 else kept).append(group)
    dropped = len(kept) + len(flat) - want if len(kept) < want else len(flat)
    trajs, rewards, correct = zip(*[row for group in (kept + flat)[:want] for row in group])
    batch = to_batch(trajs, rewards, correct, cfg.mask_tool_output)
    return list(trajs), batch, {"ds_dropped_groups": dropped, "ds_extra_rounds": extra}


def measure_success(sampling, tokenizer, sandbox, examples, cfg) -> list[float]:
    """Success rate of each question over `curriculum_samples` samples (for the curriculum)."""
    prompts = prompt_ids(tokenizer, examples, cfg.use_code)
    k = cfg.curriculum_samples
    trajs = run_rollouts(sampling, tokenizer, sandbox, prompts, k, success_params(cfg))
    return [sum(examples[i].score(t.model_text) for t in trajs[i * k:(i + 1) * k]) / k for i in range(len(examples))]


def success_params(cfg):
    """The rollout settings of the curriculum's measurement: a seed of its own, apart from the steps', drawn
    from the questions' seed, so runs over the same questions from one start (seeds sharing a `data_seed`)
    share the measurement."""
    return rollout_params(cfg, seed=cfg.questions_seed() + 17)


def cached_success(sampling, tokenizer, sandbox, examples, cfg) -> list[float]:
    """`measure_success`, kept in the directory `cfg.curriculum_cache` ("" = not kept) under a key of all
    it depends on, so runs from one start and seed (GRPO and PPO, the rows of an ablation) measure once: the
    sampling copy's weights (their bytes: a rewritten checkpoint is measured again), the model config,
    the questions and their prompt ids, the rollout settings and seed, `curriculum_samples`, the device
    and the torch version. Rank 0 reads and writes (atomically) under a lock of that key, so a run that
    starts while another measures the same key waits for its result; every rank gets the list."""
    if not cfg.curriculum_cache:
        return measure_success(sampling, tokenizer, sandbox, examples, cfg)
    path = Path(cfg.curriculum_cache) / f"curriculum-{success_key(sampling, tokenizer, examples, cfg)}.json"
    found, lock = None, None
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)   # released by close, or by the kernel if this process dies
        try:
            found = json.loads(path.read_text())["success"] if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            pass   # unreadable: measured again and rewritten
        if not (isinstance(found, list) and len(found) == len(examples)):
            found = None
    try:
        found = dist.broadcast_object(found)
        if found is not None:
            return [float(p) for p in found]
        success = measure_success(sampling, tokenizer, sandbox, examples, cfg)
        if dist.is_main():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"success": success, "questions": [ex.id for ex in examples]}))
            os.replace(tmp, path)
        return success
    finally:
        if lock is not None:
            lock.close()


def success_key(sampling, tokenizer, examples, cfg) -> str:
    """The hex digest `cached_success` files a measurement under (see there)."""
    h = hashlib.sha256()
    for name, t in sorted(sampling.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    device = next(sampling.parameters()).device.type
    check = lambda ex: f"{getattr(ex.check, '__module__', '')}.{getattr(ex.check, '__qualname__', '')}"
    questions = [(ex.id, ex.task, ex.prompt, ex.answer, ex.metadata, check(ex)) for ex in examples]
    h.update(json.dumps({"config": repr(sampling.config), "questions": questions,
                         "prompt_ids": prompt_ids(tokenizer, examples, cfg.use_code), "k": cfg.curriculum_samples,
                         "params": dataclasses.asdict(success_params(cfg)), "device": device,
                         "torch": torch.__version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def has_void_turn(turns: list[str]) -> bool:
    """A model turn that holds neither a closed python block nor an answer (SimpleTIR's void turn)."""
    return any(pending_code(t) is None and extract_answer(t) is None for t in turns)


def loss_filter(trajs, cfg) -> tuple[torch.Tensor, dict[str, int]]:
    """[B] bool, the trajectories kept in the loss, and how many each filter dropped (one may count in
    both): void turns, truncation. (Sequence-level mismatch masking is `rl.correct_mismatch`.)"""
    void = torch.tensor([cfg.filter_void_turns and has_void_turn(t.turns) for t in trajs])
    cut = torch.tensor([cfg.mask_truncated and t.finish_reason == "length" for t in trajs])
    return ~(void | cut), {"void_dropped": int(void.sum()), "truncated_dropped": int(cut.sum())}


def rollout_stats(trajs, batch: RLBatch) -> dict:
    """This rank's means over its trajectories."""
    n = max(len(trajs), 1)
    return {
        "reward": float(batch.scores.mean()),
        "accuracy": float(batch.correct.mean()),
        "code_calls": sum(t.num_code_calls for t in trajs) / n,
        "code_use": sum(t.num_code_calls > 0 for t in trajs) / n,
        "response_len": sum(len(t.response_ids) for t in trajs) / n,
        "truncated": sum(t.finish_reason == "length" for t in trajs) / n,
    }


# ----------------------------------------------------------------------------- curriculum (paper v2)

CURRICULUM_STAGES = ((0.64, 1.0), (0.48, 0.64), (0.32, 0.48), (0.0, 0.32))


def curriculum_pools(success: list[float]) -> list[list[int]]:
    """Question indices per stage, highest-potential stage first (REFERENCE.md, curriculum). The
    potential 4p(1-p) is 1 for a question solved half the time, 0 for one always or never solved."""
    pools, placed = [], set()
    for lo, hi in CURRICULUM_STAGES:          # a boundary value goes to the earlier stage
        pool = [i for i, p in enumerate(success) if lo <= 4.0 * p * (1.0 - p) <= hi and i not in placed]
        placed.update(pool)
        pools.append(pool)
    return pools


def pick_prompts(num_examples: int, k: int, step: int, seed: int, steps: int,
                 pools: list[list[int]] | None = None) -> list[int]:
    """k example indices for `step`, deterministic in (seed, step); staged when `pools` is given."""
    rng = random.Random(seed * 1_000_003 + step)
    candidates = list(range(num_examples))
    if pools:   # this step's stage, or the nearest easier one that is not empty
        stage = min(step * len(pools) // max(steps, 1), len(pools) - 1)
        candidates = next((pools[s] for s in range(stage, -1, -1) if pools[s]), candidates)
    return rng.sample(candidates, k) if k <= len(candidates) else [rng.choice(candidates) for _ in range(k)]
