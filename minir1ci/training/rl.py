"""GRPO and PPO with a code interpreter, one loop; interpreter output masked out of every loss term.

Each step: sample `n_samples` trajectories for each of `prompts_per_step` questions with the
interpreter in the loop (experience.py: curriculum, dynamic sampling, scoring, filters), recompute
pi_old (or reuse the sampler's log-probs), correct the sampler/trainer mismatch (TIS weights,
sequence masking), compute advantages -- the one place the two differ: GRPO's are group-relative,
PPO's come from GAE on a critic's values (critic.py) with the KL in the reward -- then run
`ppo_epochs` passes of the policy loss (clipped PPO, GSPO or CISPO) over mini-batches.

Run: `python train.py --stage grpo|ppo` (from the newest runs/sft checkpoint, or `--model PATH`).
Simplified against veRL: one process samples and trains (no rollout workers, no vLLM), each rank on
its share of the prompts; no dynamic batch sizing; the reference model stays on the same device.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from minir1ci.env.sandbox import Sandbox
from minir1ci.env.tasks import load_tasks
from minir1ci.inference import checkpoint
from minir1ci.inference.devices import autocast_for, rollout_dtype
from minir1ci.training import distributed as dist
from minir1ci.training.critic import batch_values, make_critic, token_rewards
from minir1ci.training.experience import (RLBatch, collect, curriculum_pools, loss_filter, measure_success,
                                          rollout_stats)
from minir1ci.training.losses import (aggregate, gae, grpo_advantages, kl_penalty, masked_mean, masked_sum,
                                      masked_whiten, mismatch_sums, policy_objective, step_denominator,
                                      tis_weights, value_loss)
from minir1ci.training.optim import make_optimizer, set_lr
from minir1ci.training.runs import (MetricsLog, check_finite, find_latest_run_checkpoint, load_start_model,
                                    open_run_dir, resume, save_run_checkpoint, start_run, step_seed)


@torch.no_grad()
def batch_logprobs(model, batch: RLBatch, cfg, device, amp) -> torch.Tensor:
    """Log-probs [B, T] of every sampled token under `model` (no grad), at the sampling temperature."""
    out = torch.zeros(batch.ids.shape, dtype=torch.float32)
    was_training = model.training
    model.eval()
    micro = cfg.micro_batch_size
    for i in range(0, len(batch), micro):
        mb = batch.rows(slice(i, i + micro))
        with amp:
            logp, _ = model(mb.ids.to(device), attention_mask=mb.attn.to(device), targets=mb.targets.to(device),
                            target_mask=mb.mask.to(device), temperature=cfg.temperature,
                            chunk_size=cfg.loss_chunk_size)
        out[i:i + micro] = logp.float().cpu()
    model.train(was_training)
    return out


def minibatches(num_rows: int, cfg, seed: int):
    """Row indices of each mini-batch over `ppo_epochs` passes (shuffled unless one on-policy pass);
    every rank draws the same permutation of its own rows, so ranks step the optimizer together."""
    mini = cfg.mini_batch_size or num_rows
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.ppo_epochs):
        shuffle = cfg.ppo_epochs > 1 or mini < num_rows
        order = torch.randperm(num_rows, generator=g).tolist() if shuffle else list(range(num_rows))
        for s in range(0, num_rows, mini):
            yield order[s:s + mini]


def frozen_reference(model, cfg, resume_dir, device):
    """The KL reference: the run's starting weights, frozen (reloaded from disk when resuming). Call it
    after `dist.parallelize(model)`: a sharded policy gets a reference sharded the same way, made from
    a bf16 copy (FSDP2 computes in bf16 anyway), so no rank ever holds two whole fp32 models."""
    sharded = dist.is_sharded(model)
    if resume_dir is None:
        ref = dist.unsharded_copy(model) if sharded else copy.deepcopy(model)
    else:
        source = Path(cfg.model) if cfg.model else find_latest_run_checkpoint("sft", cfg.run_dir().parent)
        ref = checkpoint.load_model(source, dtype=dist.COMPUTE_DTYPE if sharded else torch.float32, device=device)
    if sharded:
        ref = dist.parallelize(ref, device)
    return ref.eval().requires_grad_(False)


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
        denom = dist.all_reduce_sum(step_denominator(mb.mask, cfg.loss_agg, max_len=cfg.max_new_tokens))
        vdenom = dist.all_reduce_sum(step_denominator(mb.mask, "token-mean")) if critic is not None else None
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
            pl, pm = policy_objective(logp, old, a, mask, cfg)
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
    per_update = ("grad_norm", "pg_loss", "value_loss")   # the others are summed as shares of each pass
    return {k: v / (updates if k in per_update else cfg.ppo_epochs) for k, v in sums.items()}


def train_rl(cfg) -> dict:
    """`python train.py --stage grpo|ppo`: the whole run; returns the last step's metrics."""
    device = start_run(cfg)
    run_dir = open_run_dir(cfg)
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
    last = {}
    with Sandbox(timeout=cfg.exec_timeout) as sandbox:
        start, extra = resume(resume_dir, model, opts)
        pools = extra.get("pools")
        if resume_dir is None and cfg.curriculum:
            pools = curriculum_pools(measure_success(model, tokenizer, sandbox, examples, cfg, sample_dtype))
        for step in range(start, cfg.steps):
            t0 = time.time()
            trajs, rewards, correct, batch, sampled = collect(model, tokenizer, sandbox, examples, cfg, step,
                                                              dist.rank(), pools, sample_dtype)
            bypass = cfg.old_logprobs == "sampler"
            old_logp = batch.sampler_logp if bypass else batch_logprobs(model, batch, cfg, device, amp)
            # Unmasked interpreter output (ablation): pi_old stands in for the sampler there (ratio 1).
            batch.sampler_logp = torch.where(batch.sampler_logp.isnan(), old_logp, batch.sampler_logp)
            ref_logp = batch_logprobs(ref, batch, cfg, device, amp) if ref is not None else None
            measured = torch.zeros(4, dtype=torch.float64) if bypass else mismatch_sums(old_logp, batch.sampler_logp,
                                                                                        batch.mask)
            tis_w = tis_weights(old_logp, batch.sampler_logp, batch.mask, cfg.tis_cap) if cfg.tis_cap > 0 else None
            tis = [masked_sum(tis_w, batch.mask), batch.mask.sum()] if tis_w is not None else [1, 1]
            keep, dropped = loss_filter(trajs, batch, old_logp, cfg)
            batch.mask = batch.mask * keep[:, None]   # a dropped trajectory leaves every loss term
            reward_kl = None   # PPO's KL, in the reward: k1 of pi_old against the reference
            if critic is None:   # GRPO: group-relative, one advantage per trajectory
                adv = grpo_advantages(batch.scores, cfg.n_samples, norm_std=cfg.norm_adv_std)[:, None] * batch.mask
                old_values = returns = None
            else:                # PPO: GAE on the critic's values, the KL in the reward, whitened
                old_values = batch_values(critic, batch, cfg.micro_batch_size, device, amp)
                reward_kl = kl_penalty(old_logp, ref_logp, "k1") if ref_logp is not None else None
                adv, returns = gae(token_rewards(batch, reward_kl, cfg.kl_coef), old_values, batch.mask,
                                   cfg.gamma, cfg.lam)
                adv = masked_whiten(adv, batch.mask) * batch.mask
            lr = set_lr(opts["policy"], step, cfg)
            upd = update(model, critic, opts, batch, adv, returns, old_logp, old_values, ref_logp, tis_w, cfg, device,
                         amp, seed=step_seed(cfg.seed, step, 99), train_policy=step >= cfg.critic_warmup_steps,
                         measured=measured)
            check_finite(upd["pg_loss"] + upd["value_loss"], step, run_dir)
            if reward_kl is not None:   # logged as `kl` too (GRPO logs its loss term's)
                upd["kl"] = float(masked_mean(reward_kl, batch.mask))
            stats = rollout_stats(trajs, rewards, correct)
            t = dist.all_reduce_sum(torch.tensor([stats["reward"], stats["accuracy"], *measured, *tis, *dropped,
                                                  *sampled], dtype=torch.float64)).tolist()
            w, count = dist.world_size(), max(t[5], 1)
            last = {**stats, "reward": t[0] / w, "accuracy": t[1] / w, "mismatch_kl": t[2] / count,
                    "mismatch_abs": t[3] / count, "mismatch_frac_out": t[4] / count,
                    "tis_weight_mean": t[6] / max(t[7], 1), "mis_dropped": int(t[8]), "void_dropped": int(t[9]),
                    "truncated_dropped": int(t[10]), "ds_dropped_groups": int(t[11]),
                    "ds_extra_rounds": int(t[12]) // w, **upd, "lr": lr, "step_s": time.time() - t0}
            if critic is not None:
                last["value_mean"] = float(masked_mean(old_values, batch.mask))
            log.log(step, last)
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                extra = {"pools": pools, **({"critic": dist.full_state_dict(critic)} if critic is not None else {})}
                save_run_checkpoint(run_dir, step, model, tokenizer, opts, extra=extra,
                                    keep=cfg.keep_checkpoints or cfg.steps + 1)
    dist.shutdown()
    return last
