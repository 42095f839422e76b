"""PPO with a critic and a code interpreter, interpreter output masked out of GAE and every loss.

Each step: sample trajectories with the interpreter in the loop; per-token rewards are the k1 KL
penalty against the frozen reference on sampled tokens plus the sequence reward on the last
sampled token (veRL's KL-in-reward); the critic's values feed GAE, which skips interpreter tokens
(their values and rewards never enter the recursion, losses.gae); advantages are whitened over
sampled tokens; then `ppo_epochs` passes of the clipped policy loss and the clipped value loss.

The critic (`Critic`) is a Qwen2 backbone with a scalar head named `score` (as HF's
Qwen2ForTokenClassification with one label), initialised from the policy checkpoint; its head
starts at zero so the first values are 0 for every state.

Run: `python train.py --stage ppo` (from the newest runs/sft checkpoint) or `--model PATH`.

Simplified against veRL: critic and policy on the same device in one process, critic saved inside
the trainer state rather than as its own HF checkpoint, no critic warm-up beyond
`critic_warmup_steps` (steps that train only the critic).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn

from . import distributed as dist
from .losses import (aggregate, gae, global_denominator, kl_penalty, masked_mean, masked_whiten, policy_loss,
                     step_denominator, value_loss)
from .model import Qwen2Model
from .rl import batch_logprobs, collect, minibatches, rollout_stats
from .sandbox import Sandbox
from .tasks import load_tasks
from .trainutil import (MetricsLog, autocast_for, check_finite, frozen_reference, load_start_model,
                        load_trainer_state, lr_factor, make_optimizer, restore_optimizers,
                        save_run_checkpoint, set_lr, setup_run, step_seed)


class Critic(nn.Module):
    """V(prefix) for every position: a Qwen2 backbone and a linear `score` head to one scalar."""

    def __init__(self, backbone: Qwen2Model):
        super().__init__()
        self.model = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False, device=next(backbone.parameters()).device)
        nn.init.zeros_(self.score.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.model(input_ids, attention_mask)           # [B, T, H]
        return self.score(h).squeeze(-1).float()             # [B, T]


def make_critic(model, resume_dir) -> Critic:
    """The value model, whole on this rank (shard it after): a copy of the policy's backbone in fp32
    with a zero score head, or on resume the critic saved in rank 0's trainer state. Call it after
    `dist.parallelize(model)`, so no rank holds the whole fp32 policy and critic at once."""
    if dist.is_sharded(model):
        backbone = dist.unsharded_copy(model, dtype=torch.float32).model
    else:
        backbone = copy.deepcopy(model.model)
    critic = Critic(backbone).train()
    if resume_dir is not None:  # every rank reads rank 0's file: only it holds the whole critic
        critic.load_state_dict(load_trainer_state(resume_dir)["extra"]["critic"])
    return critic


@torch.no_grad()
def batch_values(critic, batch, micro: int, device, amp) -> Tensor:
    out = torch.zeros(batch.ids.shape, dtype=torch.float32)
    for i in range(0, len(batch), micro):
        with amp:
            out[i:i + micro] = critic(batch.ids[i:i + micro].to(device), batch.attn[i:i + micro].to(device)).cpu()
    return out * batch.mask


def token_rewards(batch, old_logp: Tensor, ref_logp: Tensor | None, kl_coef: float) -> Tensor:
    """[B, T]: -kl_coef * k1 on sampled tokens, plus the sequence reward on the last sampled one."""
    r = torch.zeros_like(old_logp)
    if ref_logp is not None and kl_coef > 0:
        r = -kl_coef * kl_penalty(old_logp, ref_logp, "k1") * batch.mask
    pos = torch.arange(batch.mask.shape[1]).expand_as(batch.mask)
    last = torch.where(batch.mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values   # [B]
    has = last >= 0
    r[has, last[has]] += batch.scores[has]
    return r


def ppo_update(model, critic, opt, copt, batch, adv, returns, old_logp, old_values, cfg, device, amp, seed,
               train_policy: bool) -> dict:
    B = len(batch)
    sums = {"pg_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "vf_clipfrac": 0.0, "grad_norm": 0.0}
    updates = 0
    for rows in minibatches(B, cfg, seed):
        mb = batch.rows(rows)
        denom = global_denominator(step_denominator(mb.mask, cfg.loss_agg, max_len=cfg.max_new_tokens))
        vdenom = global_denominator(step_denominator(mb.mask, "token-mean"))
        for m in range(0, len(rows), cfg.micro_batch_size):
            sl = slice(m, m + cfg.micro_batch_size)
            idx = torch.as_tensor(rows[m:m + cfg.micro_batch_size])
            ids, attn, mask = mb.ids[sl].to(device), mb.attn[sl].to(device), mb.mask[sl].to(device)
            with amp:
                values = critic(ids, attn)
            vl, vm = value_loss(values, old_values[idx].to(device), returns[idx].to(device), cfg.value_clip, mask)
            aggregate(vl, mask, "token-mean", vdenom).backward()
            sums["value_loss"] += float(aggregate(vl.detach(), mask, "token-mean", vdenom))
            sums["vf_clipfrac"] += float(vm["vf_clipfrac"]) * len(idx) / B
            if train_policy:
                with amp:
                    logp, _ = model(ids, attention_mask=attn, targets=mb.targets[sl].to(device), target_mask=mask,
                                    temperature=cfg.temperature, chunk_size=cfg.loss_chunk_size)
                pl, pm = policy_loss(logp, old_logp[idx].to(device), adv[idx].to(device), mask,
                                     cfg.clip_low, cfg.clip_high, cfg.dual_clip)
                aggregate(pl, mask, cfg.loss_agg, denom).backward()
                sums["pg_loss"] += float(aggregate(pl.detach(), mask, cfg.loss_agg, denom))
                sums["clipfrac"] += float(pm["clipfrac"]) * len(idx) / B
        dist.sync_grads(critic)
        dist.clip_grad_norm(critic, cfg.grad_clip)
        copt.step()
        copt.zero_grad(set_to_none=True)
        if train_policy:
            dist.sync_grads(model)
            sums["grad_norm"] += dist.clip_grad_norm(model, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        updates += 1
    return {k: v / (updates if k in ("grad_norm", "pg_loss", "value_loss") else cfg.ppo_epochs) for k, v in sums.items()}


def train_ppo(cfg) -> dict:
    device, run_dir = setup_run(cfg)
    model, tokenizer, source, resume_dir = load_start_model(cfg, device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train", seed=cfg.seed)
    if dist.is_main():
        print(f"ppo: {model.num_params() / 1e6:.2f}M params from {source}; {len(examples)} training questions")
    model = dist.parallelize(model, device)
    ref = frozen_reference(model, cfg, resume_dir, device) if cfg.kl_coef > 0 else None
    critic = make_critic(model, resume_dir)
    critic.model.gradient_checkpointing = cfg.grad_checkpointing
    critic = dist.parallelize(critic, device)
    opt = make_optimizer(model.parameters(), cfg)
    copt = make_optimizer(critic.parameters(), cfg, lr=cfg.critic_lr)
    amp = autocast_for(device, cfg.dtype)
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume)
    start = 0
    if resume_dir is not None:
        state = load_trainer_state(resume_dir, dist.is_sharded(model))
        restore_optimizers(state, {"policy": opt, "critic": copt})
        start = state["step"] + 1
        log.truncate_after(state["step"])
    last = {}
    with Sandbox(timeout=cfg.exec_timeout) as sandbox:
        for step in range(start, cfg.steps):
            t0 = time.time()
            trajs, rewards, correct, batch = collect(model, tokenizer, sandbox, examples, cfg, step, dist.rank())
            old_logp = batch_logprobs(model, batch, cfg.micro_batch_size, device, amp, cfg.temperature,
                                      cfg.loss_chunk_size)
            ref_logp = (batch_logprobs(ref, batch, cfg.micro_batch_size, device, amp, cfg.temperature,
                                       cfg.loss_chunk_size) if ref is not None else None)
            old_values = batch_values(critic, batch, cfg.micro_batch_size, device, amp)
            rewards_tok = token_rewards(batch, old_logp, ref_logp, cfg.kl_coef)
            adv, returns = gae(rewards_tok, old_values, batch.mask, cfg.gamma, cfg.lam)
            adv = masked_whiten(adv, batch.mask) * batch.mask
            lr = cfg.lr * lr_factor(step, cfg)
            set_lr(opt, lr)
            upd = ppo_update(model, critic, opt, copt, batch, adv, returns, old_logp, old_values, cfg, device, amp,
                             seed=step_seed(cfg.seed, step, 99), train_policy=step >= cfg.critic_warmup_steps)
            check_finite(upd["pg_loss"] + upd["value_loss"], step, run_dir)
            stats = rollout_stats(trajs, rewards, correct)
            totals = dist.all_reduce_sum(torch.tensor([stats["reward"], stats["accuracy"]], dtype=torch.float64))
            w = dist.world_size()
            last = {**stats, "reward": float(totals[0]) / w, "accuracy": float(totals[1]) / w, **upd,
                    "value_mean": float(masked_mean(old_values, batch.mask)), "lr": lr, "step_s": time.time() - t0}
            log.log(step, last)
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                critic_sd = dist.full_state_dict(critic)
                save_run_checkpoint(run_dir, step, model, tokenizer, {"policy": opt, "critic": copt},
                                    extra={"critic": critic_sd})
    dist.shutdown()
    return last
