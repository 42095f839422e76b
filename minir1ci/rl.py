"""GRPO and PPO with a code interpreter, one loop; interpreter output masked out of every loss term.

Each step: pick `prompts_per_step` training questions (deterministic in seed and step; staged by
the paper's 4p(1-p) curriculum with `--curriculum`), sample `n_samples` trajectories per question
with the interpreter in the loop (`--dynamic_sampling`: groups of equal rewards are replaced by
fresh ones), score them, recompute pi_old with the trainer (or reuse the sampler's log-probs),
measure and correct the sampler/trainer mismatch (TIS weights, sequence masking), drop filtered
trajectories from the loss, then the advantages -- the one place the two differ: GRPO's are
group-relative; PPO's come from GAE on a critic's values (critic.py) with the KL in the reward --
and `ppo_epochs` passes of the policy loss (clipped PPO, GSPO or CISPO) over mini-batches.

Run: `python train.py --stage grpo|ppo` (starts from the newest runs/sft checkpoint) or with
`--model PATH` for a real Qwen-2.5 checkpoint (the paper's settings).

Alignment used throughout: a trajectory is `ids = prompt_ids + response_ids`; position t
predicts ids[t+1], so response token k (at index P+k) is scored at position P+k-1. Every
per-token tensor here ([B, T], T = longest ids in the batch) is indexed by *position*, and the
loss mask at position P+k-1 is the rollout's loss_mask[k]: 1 for tokens the model sampled, 0 for
inserted interpreter output, the prompt and padding. Trainers never see text.

Simplified against veRL (which the paper used): one process samples and trains (no separate
rollout workers, no vLLM); rollouts run on this rank's share of the prompts with the current
weights; no dynamic batch sizing; the reference model stays in memory on the same device.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from . import distributed as dist
from .critic import batch_values, make_critic, token_rewards
from .data import pad_batch
from .interpreter import RolloutParams, prompt_ids, run_rollouts
from .losses import (aggregate, cispo_loss, gae, global_denominator, grpo_advantages, gspo_loss, kl_penalty,
                     masked_mean, masked_sum, masked_whiten, mismatch_sums, policy_loss, sequence_in_bounds,
                     step_denominator, tis_weights, value_loss)
from .prompts import extract_answer, pending_code
from .rewards import RewardConfig, compute_reward
from .sandbox import Sandbox
from .tasks import load_tasks
from .trainutil import (MetricsLog, autocast_for, check_finite, frozen_reference, load_start_model, load_trainer_state,
                        lr_factor, make_optimizer, restore_optimizers, save_run_checkpoint, set_lr, setup_run,
                        step_seed)


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


def to_batch(trajs, scores: list[float], groups: list[int], mask_tool_output: bool = True) -> RLBatch:
    """With `mask_tool_output` False (an ablation) inserted interpreter tokens are in `mask` too;
    having no sampler log-prob, they carry NaN in `sampler_logp` until train_rl fills in pi_old."""
    seqs, masks, logps = [], [], []
    for tr in trajs:
        P = len(tr.prompt_ids)
        ids = list(tr.prompt_ids) + list(tr.response_ids)
        mask = [0] * len(ids)
        logp = [0.0] * len(ids)
        for k, (m, lp) in enumerate(zip(tr.loss_mask, tr.logprobs)):
            mask[P + k - 1] = int(m or not mask_tool_output)
            logp[P + k - 1] = float(lp) if m else (0.0 if mask_tool_output else math.nan)
        seqs.append(ids), masks.append(mask), logps.append(logp)
    ids, attn, mask = pad_batch(seqs, 0, masks)
    sampler_logp = torch.zeros(ids.shape, dtype=torch.float32)
    for i, lp in enumerate(logps):
        sampler_logp[i, :len(lp)] = torch.tensor(lp)
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    return RLBatch(ids, attn, targets, mask, sampler_logp, torch.tensor(scores, dtype=torch.float32),
                   torch.tensor(groups, dtype=torch.long))


def rollout_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """What `--rollout_dtype` samples in: None = the policy's own weights (float32; a sharded
    policy's gathered copy is always bf16), else a copy in that dtype; auto = bf16 on CUDA."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return None if name == "float32" else getattr(torch, name)


def sample_rollouts(model, tokenizer, sandbox, prompts: list[list[int]], n: int, params: RolloutParams,
                    dtype: torch.dtype | None = None):
    """run_rollouts on the policy in eval mode. A copy in `dtype`, or of an FSDP2-sharded policy a
    whole copy gathered on every rank (all ranks must call this), is made first, freed after."""
    sampling = dist.unsharded_copy(model, dtype)
    was_training = model.training
    model.eval()
    try:
        return run_rollouts(sampling, tokenizer, sandbox, prompts, n, params)
    finally:
        model.train(was_training)


def collect(model, tokenizer, sandbox, examples, cfg, step: int, rank: int, pools=None, dtype=None):
    """One step's rollouts on this rank: its share of `prompts_per_step` prompts (deterministic in
    seed and step), `n_samples` trajectories each with the interpreter, scored.

    With `dynamic_sampling`, a group whose rewards are all equal is set aside and up to
    `dynamic_sampling_rounds` more rounds of prompts are sampled (every rank takes part in each
    round: a sharded policy is gathered in lockstep) until this rank's share is full; if the rounds
    run out, set-aside groups fill it (their GRPO advantage is exactly 0).
    Returns (trajectories, rewards, correctness, RLBatch, [groups dropped, extra rounds])."""
    n, rounds = cfg.n_samples, (cfg.dynamic_sampling_rounds if cfg.dynamic_sampling else 0)
    want = len(dist.shard(range(cfg.prompts_per_step)))   # groups on this rank
    sampling = dist.unsharded_copy(model, dtype)    # one copy for every round of this step
    kept, flat, extra = [], [], 0
    for r in range(1 + rounds):
        if r and not dist.all_reduce_sum(torch.tensor([want - min(len(kept), want)])).item():
            break                                   # every rank is full
        extra += r > 0
        idx = dist.shard(pick_prompts(len(examples), cfg.prompts_per_step, step, cfg.seed + 7919 * r, cfg.steps, pools))
        exs = [examples[i] for i in idx]
        trajs = sample_rollouts(sampling, tokenizer, sandbox, prompt_ids(tokenizer, exs, cfg.use_code), n,
                                rollout_params(cfg, seed=step_seed(cfg.seed, step, rank + 1000 * r)))
        rewards, correct = score_trajectories(exs, trajs, n, cfg)
        for g in range(len(exs)):
            group = [(trajs[k], rewards[k], correct[k]) for k in range(g * n, (g + 1) * n)]
            (flat if cfg.dynamic_sampling and len(set(rewards[g * n:(g + 1) * n])) == 1 else kept).append(group)
    dropped = len(kept) + len(flat) - want if len(kept) < want else len(flat)
    rows = [row for group in (kept + flat)[:want] for row in group]
    trajs, rewards, correct = (list(x) for x in zip(*rows))
    batch = to_batch(trajs, rewards, [i // n for i in range(len(trajs))], cfg.mask_tool_output)
    return trajs, rewards, correct, batch, [dropped, extra]


def rollout_params(cfg, seed: int) -> RolloutParams:
    return RolloutParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                         max_code_calls=cfg.max_code_calls, use_code=cfg.use_code, seed=seed)


def score_trajectories(examples, trajs, n: int, cfg) -> tuple[list[float], list[float]]:
    """(rewards, correctness) for trajectories grouped n per example, in order."""
    rcfg = RewardConfig(plain=cfg.reward_plain)
    rewards, correct = [], []
    for i, tr in enumerate(trajs):
        s = examples[i // n].score(tr.text)
        correct.append(s)
        rewards.append(compute_reward(s, tr.turns, rcfg))
    return rewards, correct


def measure_success(model, tokenizer, sandbox, examples, cfg, dtype=None) -> list[float]:
    """Success rate of each question over `curriculum_samples` samples (for the curriculum)."""
    prompts = prompt_ids(tokenizer, examples, cfg.use_code)
    k = cfg.curriculum_samples
    trajs = sample_rollouts(model, tokenizer, sandbox, prompts, k, rollout_params(cfg, seed=cfg.seed + 17), dtype)
    return [sum(examples[i].score(t.text) for t in trajs[i * k:(i + 1) * k]) / k for i in range(len(examples))]


def has_void_turn(turns: list[str]) -> bool:
    """A model turn that holds neither a closed python block nor an answer (SimpleTIR's void turn)."""
    return any(pending_code(t) is None and extract_answer(t) is None for t in turns)


def loss_filter(trajs, batch: RLBatch, old_logp: torch.Tensor, cfg) -> tuple[torch.Tensor, list[int]]:
    """[B] bool: trajectories kept in the loss; and how many each filter dropped: sequence-level
    mismatch masking, void turns, truncation (a trajectory may be counted by several)."""
    mis = ~sequence_in_bounds(old_logp, batch.sampler_logp, batch.mask, cfg.mis_low, cfg.mis_high)
    void = torch.tensor([cfg.filter_void_turns and has_void_turn(t.turns) for t in trajs])
    cut = torch.tensor([cfg.mask_truncated and t.finish_reason == "length" for t in trajs])
    return ~(mis | void | cut), [int(mis.sum()), int(void.sum()), int(cut.sum())]


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



# ----------------------------------------------------------------------------- the loop

def update(model, critic, opts: dict, batch: RLBatch, adv, returns, old_logp, old_values, ref_logp, tis_w, cfg,
           device, amp, seed: int, train_policy: bool, measured: torch.Tensor) -> dict:
    """`ppo_epochs` passes over mini-batches, one optimizer step (per model) per mini-batch.
    PPO (a critic given) first takes the clipped value loss. With `old_logprobs=sampler` the first
    forward pass is pi_old itself: its mismatch with the sampler is added into `measured`."""
    B = len(batch)
    sums = dict.fromkeys(("pg_loss", "kl", "clipfrac", "entropy", "grad_norm", "value_loss", "vf_clipfrac"), 0.0)
    updates = 0
    for rows in minibatches(B, cfg, seed):
        mb = batch.rows(rows)
        # Denominators for the whole mini-batch on every rank, not per micro-batch.
        denom = global_denominator(step_denominator(mb.mask, cfg.loss_agg, max_len=cfg.max_new_tokens))
        vdenom = global_denominator(step_denominator(mb.mask, "token-mean")) if critic is not None else None
        for m in range(0, len(rows), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            idx, share = torch.as_tensor(rows[sl]), len(rows[sl]) / B
            ids, attn, mask = mb.ids[sl].to(device), mb.attn[sl].to(device), mb.mask[sl].to(device)
            if critic is not None:
                with amp:
                    values = critic(ids, attn)
                vl, vm = value_loss(values, old_values[idx].to(device), returns[idx].to(device), cfg.value_clip, mask)
                aggregate(vl, mask, "token-mean", vdenom).backward()
                sums["value_loss"] += float(aggregate(vl.detach(), mask, "token-mean", vdenom))
                sums["vf_clipfrac"] += float(vm["vf_clipfrac"]) * share
            if not train_policy:
                continue
            with amp:
                logp, ent = model(ids, attention_mask=attn, targets=mb.targets[sl].to(device), target_mask=mask,
                                  temperature=cfg.temperature, with_entropy=cfg.entropy_coef > 0,
                                  chunk_size=cfg.loss_chunk_size)
            old, a = old_logp[idx].to(device), adv[idx].to(device)
            if cfg.old_logprobs == "sampler" and updates == 0:
                measured += mismatch_sums(logp.detach(), old, mask).cpu()
            if cfg.policy_loss == "gspo":
                pl, pm = gspo_loss(logp, old, a, mask, cfg.gspo_clip_low, cfg.gspo_clip_high)
            elif cfg.policy_loss == "cispo":
                pl, pm = cispo_loss(logp, old, a, mask, cfg.clip_low, cfg.clip_high)
            else:
                pl, pm = policy_loss(logp, old, a, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
            if tis_w is not None:
                pl = pl * tis_w[idx].to(device)
            loss_tok = pl
            if ref_logp is not None and critic is None:   # GRPO: KL as a loss term (PPO has it in the reward)
                kl = kl_penalty(logp, ref_logp[idx].to(device), cfg.kl_estimator)
                loss_tok = loss_tok + cfg.kl_coef * kl
                sums["kl"] += float(masked_mean(kl.detach(), mask)) * share
            if ent is not None:
                loss_tok = loss_tok - cfg.entropy_coef * ent
                sums["entropy"] += float(masked_mean(ent.detach(), mask)) * share
            aggregate(loss_tok, mask, cfg.loss_agg, denom).backward()
            sums["pg_loss"] += float(aggregate(pl.detach(), mask, cfg.loss_agg, denom))
            sums["clipfrac"] += float(pm["clipfrac"]) * share
        for name, net in (("critic", critic), ("policy", model if train_policy else None)):
            if net is not None:
                dist.sync_grads(net)
                norm = dist.clip_grad_norm(net, cfg.grad_clip)
                sums["grad_norm"] += norm if name == "policy" else 0.0
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
        updates += 1
    return {k: v / (updates if k in ("grad_norm", "pg_loss", "value_loss") else cfg.ppo_epochs) for k, v in sums.items()}


def train_rl(cfg) -> dict:
    """`python train.py --stage grpo|ppo`: the whole run; returns the last step's metrics."""
    device, run_dir = setup_run(cfg)
    model, tokenizer, source, resume_dir = load_start_model(cfg, device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train", limit=cfg.num_train_examples,
                          seed=cfg.seed)
    if dist.is_main():
        print(f"{cfg.stage}: {model.num_params() / 1e6:.2f}M params from {source}; {len(examples)} training "
              f"questions; {cfg.prompts_per_step} prompts x {cfg.n_samples} samples per step")
    model = dist.parallelize(model, device)
    ref = frozen_reference(model, cfg, resume_dir, device) if cfg.kl_coef > 0 else None
    opts, critic = {"policy": make_optimizer(model.parameters(), cfg)}, None
    if cfg.stage == "ppo":
        critic = make_critic(model, resume_dir)
        critic.model.gradient_checkpointing = cfg.grad_checkpointing
        critic = dist.parallelize(critic, device)
        opts["critic"] = make_optimizer(critic.parameters(), cfg, lr=cfg.critic_lr)
    amp = autocast_for(device, cfg.dtype)
    sample_dtype = rollout_dtype(cfg.rollout_dtype, device)
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume)
    start, pools, last = 0, None, {}
    with Sandbox(timeout=cfg.exec_timeout) as sandbox:
        if resume_dir is not None:
            state = load_trainer_state(resume_dir, dist.is_sharded(model))
            restore_optimizers(state, opts)
            start = state["step"] + 1
            pools = state["extra"].get("pools")
            log.truncate_after(state["step"])
        elif cfg.curriculum:
            pools = curriculum_pools(measure_success(model, tokenizer, sandbox, examples, cfg, sample_dtype))
        for step in range(start, cfg.steps):
            t0 = time.time()
            trajs, rewards, correct, batch, sampled = collect(model, tokenizer, sandbox, examples, cfg, step,
                                                              dist.rank(), pools, sample_dtype)
            bypass = cfg.old_logprobs == "sampler"
            old_logp = (batch.sampler_logp if bypass else batch_logprobs(
                model, batch, cfg.micro_batch_size, device, amp, cfg.temperature, cfg.loss_chunk_size))
            # Unmasked interpreter output (ablation): pi_old stands in for the sampler there (ratio 1).
            batch.sampler_logp = torch.where(batch.sampler_logp.isnan(), old_logp, batch.sampler_logp)
            ref_logp = (batch_logprobs(ref, batch, cfg.micro_batch_size, device, amp, cfg.temperature,
                                       cfg.loss_chunk_size) if ref is not None else None)
            measured = torch.zeros(4, dtype=torch.float64) if bypass else mismatch_sums(old_logp, batch.sampler_logp,
                                                                                        batch.mask)
            tis_w = tis_weights(old_logp, batch.sampler_logp, batch.mask, cfg.tis_cap) if cfg.tis_cap > 0 else None
            tis = [masked_sum(tis_w, batch.mask), batch.mask.sum()] if tis_w is not None else [1, 1]
            keep, dropped = loss_filter(trajs, batch, old_logp, cfg)
            batch.mask = batch.mask * keep[:, None]   # a dropped trajectory leaves every loss term
            if critic is None:   # GRPO: group-relative, one advantage per trajectory
                adv = grpo_advantages(batch.scores, cfg.n_samples, norm_std=cfg.norm_adv_std)[:, None] * batch.mask
                old_values = returns = None
            else:                # PPO: GAE on the critic's values, the KL in the reward, whitened
                old_values = batch_values(critic, batch, cfg.micro_batch_size, device, amp)
                adv, returns = gae(token_rewards(batch, old_logp, ref_logp, cfg.kl_coef), old_values, batch.mask,
                                   cfg.gamma, cfg.lam)
                adv = masked_whiten(adv, batch.mask) * batch.mask
            lr = cfg.lr * lr_factor(step, cfg)
            set_lr(opts["policy"], lr)
            upd = update(model, critic, opts, batch, adv, returns, old_logp, old_values, ref_logp, tis_w, cfg, device,
                         amp, seed=step_seed(cfg.seed, step, 99), train_policy=step >= cfg.critic_warmup_steps,
                         measured=measured)
            check_finite(upd["pg_loss"] + upd["value_loss"], step, run_dir)
            stats = rollout_stats(trajs, rewards, correct)
            t = dist.all_reduce_sum(torch.tensor([stats["reward"], stats["accuracy"], *measured, *tis, *dropped,
                                                  *sampled], dtype=torch.float64)).tolist()
            w, count = dist.world_size(), max(t[5], 1)
            last = {**stats, "reward": t[0] / w, "accuracy": t[1] / w, "mismatch_kl": t[2] / count,
                    "mismatch_abs": t[3] / count, "mismatch_frac_out": t[4] / count,
                    "tis_weight_mean": t[6] / max(t[7], 1), "mis_dropped": int(t[8]), "void_dropped": int(t[9]),
                    "truncated_dropped": int(t[10]), "ds_dropped_groups": int(t[11]), "ds_extra_rounds": int(t[12]) // w,
                    **upd, "lr": lr, "step_s": time.time() - t0}
            if critic is not None:
                last["value_mean"] = float(masked_mean(old_values, batch.mask))
            log.log(step, last)
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                extra = {"pools": pools, **({"critic": dist.full_state_dict(critic)} if critic is not None else {})}
                save_run_checkpoint(run_dir, step, model, tokenizer, opts, extra=extra,
                                    keep=cfg.keep_checkpoints or cfg.steps + 1)
    dist.shutdown()
    return last
