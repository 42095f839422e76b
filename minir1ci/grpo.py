"""GRPO with a code interpreter, interpreter output masked out of every loss term.

Each step: pick `prompts_per_step` training questions (deterministic in seed and step; staged by
the paper's 4p(1-p) curriculum with `--curriculum`), sample `n_samples` trajectories per question
with the interpreter in the loop, score them (rule-based reward, REFERENCE.md), compute
group-relative advantages, recompute the old log-probs with the trainer (logging their gap to the
sampler's), compute the frozen reference's log-probs, then run `ppo_epochs` passes of clipped
policy-gradient updates over mini-batches, with the k3 KL to the reference as a loss term.

Run: `python train.py --stage grpo` (starts from the newest runs/sft checkpoint) or with
`--model PATH` for a real Qwen-2.5 checkpoint (the paper's settings).

Simplified against veRL (which the paper used): one process samples and trains (no separate
rollout workers, no vLLM); rollouts run on this rank's share of the prompts with the current
weights; no dynamic batch sizing; the reference model stays in memory on the same device.
"""
from __future__ import annotations

import time

import torch

from . import distributed as dist
from .interpreter import prompt_ids
from .losses import aggregate, global_denominator, grpo_advantages, kl_penalty, masked_mean, policy_loss, step_denominator
from .rl import (batch_logprobs, collect, curriculum_pools, minibatches, rollout_params, rollout_stats,
                 sample_rollouts)
from .sandbox import Sandbox
from .tasks import load_tasks
from .trainutil import (MetricsLog, autocast_for, check_finite, frozen_reference, load_start_model, load_trainer_state, lr_factor,
                        make_optimizer, restore_optimizers, save_run_checkpoint, set_lr, setup_run, step_seed)


def measure_success(model, tokenizer, sandbox, examples, cfg) -> list[float]:
    """Success rate of each question over `curriculum_samples` samples (for the curriculum)."""
    prompts = prompt_ids(tokenizer, examples, cfg.use_code)
    k = cfg.curriculum_samples
    trajs = sample_rollouts(model, tokenizer, sandbox, prompts, k, rollout_params(cfg, seed=cfg.seed + 17))
    return [sum(examples[i].score(t.text) for t in trajs[i * k:(i + 1) * k]) / k for i in range(len(examples))]


def policy_update(model, opt, batch, adv_tok, old_logp, ref_logp, cfg, device, amp, seed: int) -> dict:
    """`ppo_epochs` passes over mini-batches; one optimizer step per mini-batch. Returns metrics."""
    B = len(batch)
    sums = {"pg_loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    updates = 0
    for rows in minibatches(B, cfg, seed):
        mb = batch.rows(rows)
        # Denominator for the whole mini-batch on every rank, not per micro-batch.
        denom = global_denominator(step_denominator(mb.mask, cfg.loss_agg, max_len=cfg.max_new_tokens))
        for m in range(0, len(rows), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            ids, attn = mb.ids[sl].to(device), mb.attn[sl].to(device)
            mask = mb.mask[sl].to(device)
            with amp:
                logp, ent = model(ids, attention_mask=attn, targets=mb.targets[sl].to(device), target_mask=mask,
                                  temperature=cfg.temperature, with_entropy=cfg.entropy_coef > 0,
                                  chunk_size=cfg.loss_chunk_size)
            idx = torch.as_tensor(rows[m:m + cfg.micro_batch_size])
            pl, pm = policy_loss(logp, old_logp[idx].to(device), adv_tok[idx].to(device), mask,
                                 cfg.clip_low, cfg.clip_high, cfg.dual_clip)
            loss_tok = pl
            if cfg.kl_coef > 0:
                kl = kl_penalty(logp, ref_logp[idx].to(device), cfg.kl_estimator)
                loss_tok = loss_tok + cfg.kl_coef * kl
                sums["kl"] += float(masked_mean(kl.detach(), mask)) * len(idx) / B
            if ent is not None:
                loss_tok = loss_tok - cfg.entropy_coef * ent
                sums["entropy"] += float(masked_mean(ent.detach(), mask)) * len(idx) / B
            loss = aggregate(loss_tok, mask, cfg.loss_agg, denom)
            loss.backward()
            sums["pg_loss"] += float(aggregate(pl.detach(), mask, cfg.loss_agg, denom))
            sums["clipfrac"] += float(pm["clipfrac"]) * len(idx) / B
        dist.sync_grads(model)
        sums["grad_norm"] += dist.clip_grad_norm(model, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates += 1
    return {k: v / (updates if k in ("grad_norm", "pg_loss") else cfg.ppo_epochs) for k, v in sums.items()}


def train_grpo(cfg) -> dict:
    device, run_dir = setup_run(cfg)
    model, tokenizer, source, resume_dir = load_start_model(cfg, device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train", seed=cfg.seed)
    if dist.is_main():
        print(f"grpo: {model.num_params() / 1e6:.2f}M params from {source}; {len(examples)} training questions; "
              f"{cfg.prompts_per_step} prompts x {cfg.n_samples} samples per step")
    model = dist.parallelize(model, device)
    ref = frozen_reference(model, cfg, resume_dir, device) if cfg.kl_coef > 0 else None
    opt = make_optimizer(model.parameters(), cfg)
    amp = autocast_for(device, cfg.dtype)
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume)
    start = 0
    pools = None
    with Sandbox(timeout=cfg.exec_timeout) as sandbox:
        if resume_dir is not None:
            state = load_trainer_state(resume_dir, dist.is_sharded(model))
            restore_optimizers(state, {"policy": opt})
            start = state["step"] + 1
            pools = state["extra"].get("pools")
            log.truncate_after(state["step"])
        elif cfg.curriculum:
            pools = curriculum_pools(measure_success(model, tokenizer, sandbox, examples, cfg))
        last = {}
        for step in range(start, cfg.steps):
            t0 = time.time()
            trajs, rewards, correct, batch = collect(model, tokenizer, sandbox, examples, cfg, step, dist.rank(), pools)
            adv = grpo_advantages(batch.scores, cfg.n_samples, norm_std=cfg.norm_adv_std)   # [B]
            adv_tok = adv[:, None] * batch.mask                                                   # [B, T]
            old_logp = batch_logprobs(model, batch, cfg.micro_batch_size, device, amp, cfg.temperature,
                                      cfg.loss_chunk_size)
            ref_logp = (batch_logprobs(ref, batch, cfg.micro_batch_size, device, amp, cfg.temperature,
                                       cfg.loss_chunk_size) if ref is not None else None)
            lr = cfg.lr * lr_factor(step, cfg)
            set_lr(opt, lr)
            upd = policy_update(model, opt, batch, adv_tok, old_logp, ref_logp, cfg, device, amp,
                                seed=step_seed(cfg.seed, step, 99))
            check_finite(upd["pg_loss"], step, run_dir)
            stats = rollout_stats(trajs, rewards, correct)
            gap = float(masked_mean((old_logp - batch.sampler_logp).abs(), batch.mask))
            totals = dist.all_reduce_sum(torch.tensor([stats["reward"], stats["accuracy"], gap], dtype=torch.float64))
            w = dist.world_size()
            last = {**stats, "reward": float(totals[0]) / w, "accuracy": float(totals[1]) / w,
                    "logprob_gap": float(totals[2]) / w, **upd, "lr": lr, "step_s": time.time() - t0}
            log.log(step, last)
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                save_run_checkpoint(run_dir, step, model, tokenizer, {"policy": opt}, extra={"pools": pools})
    dist.shutdown()
    return last
