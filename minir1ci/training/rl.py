"""GRPO and PPO with a code interpreter, one loop; interpreter output masked out of every loss term.

Each step: sample `n_samples` trajectories for each of `prompts_per_step` questions with the
interpreter in the loop (experience.py: curriculum, dynamic sampling, scoring, filters), recompute
pi_old (or reuse the sampler's log-probs), correct the sampler/trainer mismatch (TIS weights,
sequence masking), compute advantages -- the one place the two differ: GRPO's are group-relative,
PPO's come from GAE on a critic's values (critic.py) with the KL in the reward -- then run
`ppo_epochs` passes of the policy loss (clipped PPO, GSPO or CISPO) over mini-batches. A GRPO step
with no signal (every advantage 0 while the policy still is its reference) has a zero gradient: it
skips the passes and the backward and steps the optimizer on zeros (`no_signal`).

Run: `python train.py --stage grpo|ppo` (from the newest runs/sft checkpoint, or `--model PATH`).
Simplified against veRL: one process samples and trains (no rollout workers, no vLLM), each rank on
its share of the prompts; no dynamic batch sizing; the reference model stays on the same device.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict

import torch

from minir1ci.env.sandbox import Sandbox
from minir1ci.env.tasks import load_tasks
from minir1ci.inference import checkpoint
from minir1ci.inference.devices import autocast_for, rollout_dtype
from minir1ci.inference.lora import adapters_disabled
from minir1ci.training import distributed as dist
from minir1ci.training.critic import make_critic, token_rewards
from minir1ci.training.experience import (RLBatch, cached_success, collect, curriculum_pools, loss_filter,
                                          no_grad_pass, rollout_stats)
from minir1ci.training.losses import (aggregate, gae, grpo_advantages, kl_penalty, masked_mean, masked_sum,
                                      masked_whiten, mismatch_sums, policy_objective, sequence_in_bounds,
                                      step_denominator, tis_weights, value_loss)
from minir1ci.training.optim import make_optimizer, set_lr
from minir1ci.training.progress import MetricsLog, check_finite
from minir1ci.training.runs import load_start_model, open_run_dir, resume, save_run_checkpoint, start_run, step_seed


def token_logp(model, x: RLBatch, cfg, with_entropy: bool = False):
    """(log-probs [b, T] of the sampled tokens at the sampling temperature, entropy [b, T] or None). Rows
    are right-padded, so plain causal attention never lets a real token see padding: no mask needed."""
    return model(x.ids, targets=x.targets, target_mask=x.mask, temperature=cfg.temperature,
                 with_entropy=with_entropy, chunk_size=cfg.loss_chunk_size)


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


def frozen_reference(model, cfg, resumed, device):
    """The KL reference: the run's start weights, frozen (reloaded from the recorded start, cfg.model, when
    resuming). Call it after `dist.parallelize(model)`: a sharded policy gets a reference sharded the
    same way, made from a bf16 copy (FSDP2 computes in bf16 anyway), so no rank ever holds two whole
    fp32 models."""
    sharded = dist.is_sharded(model)
    if resumed is None:
        ref = dist.unsharded_copy(model) if sharded else copy.deepcopy(model)
    else:
        ref, _ = checkpoint.load_pretrained(cfg.model, dtype=dist.COMPUTE_DTYPE if sharded else torch.float32,
                                            device=device)
    if sharded:
        ref = dist.parallelize(ref, device)
    return ref.eval().requires_grad_(False)


def pi_old_in_update(cfg, rows: int) -> bool:
    """GRPO with one on-policy update per step: pi_old is the update's own forward pass, exactly (the
    weights have not moved yet), so it needs no pass of its own (as TRL and veRL do)."""
    return (cfg.stage == "grpo" and cfg.old_logprobs == "trainer" and cfg.ppo_epochs == 1
            and cfg.mini_batch_size in range(rows))   # 0 or >= rows: one mini-batch


def correct_mismatch(x: RLBatch, cfg) -> dict[str, float]:
    """With pi_old (x.old_logp) known: measure its mismatch with the sampler, set the TIS weights, drop
    the trajectories sequence masking refuses and those not in x.keep (their mask rows zeroed, so they
    leave every loss term); returns what it measured, as sums.
    Unmasked interpreter output (ablation) has no sampler log-prob (NaN): pi_old stands in (ratio 1)."""
    sampled = ~x.sampler_logp.isnan()
    x.sampler_logp = torch.where(sampled, x.sampler_logp, x.old_logp)
    sums = mismatch_sums(x.old_logp, x.sampler_logp, x.mask * sampled)
    if cfg.tis_cap > 0:
        x.tis_w = tis_weights(x.old_logp, x.sampler_logp, x.mask, cfg.tis_cap)
        sums.update(tis_sum=masked_sum(x.tis_w, x.mask), tis_tokens=x.mask.sum())
    keep = sequence_in_bounds(x.old_logp, x.sampler_logp, x.mask, cfg.mis_low, cfg.mis_high)
    x.mask = x.mask * (keep & x.keep)[:, None]   # with the trajectories `loss_filter` dropped
    return {**{k: float(v) for k, v in sums.items()}, "mis_dropped": float((~keep).sum())}


UPDATE_SUMS = ("pg_loss", "kl", "clipfrac", "entropy", "grad_norm", "value_loss", "vf_clipfrac")   # what update logs


def update(model, critic, opts: dict, batch: RLBatch, cfg, device, amp, step: int) -> dict[str, float]:
    """`ppo_epochs` passes over mini-batches, one optimizer step (per model) per mini-batch; returns this
    rank's measurements. PPO (a critic given) first takes the clipped value loss, and during
    `critic_warmup_steps` trains only the critic. Without pi_old (`pi_old_in_update`) the forward pass is
    pi_old itself, corrected for the mismatch there; with `old_logprobs=sampler` the mismatch is measured
    there."""
    train_policy = step >= cfg.critic_warmup_steps
    sums = dict.fromkeys(UPDATE_SUMS, 0.0)
    measured, updates = defaultdict(float), 0
    for rows in minibatches(len(batch), cfg, step_seed(cfg.seed, step, 99)):
        mb = batch.rows(rows)
        # Denominators for the whole mini-batch on every rank, not per micro-batch.
        denom = dist.all_reduce_sum(step_denominator(mb.mask, cfg.loss_agg, cfg.max_new_tokens))
        vdenom = dist.all_reduce_sum(step_denominator(mb.mask, "token-mean"))
        kept = mb.mask.clone()   # the mask after sequence masking in this pass (pi_old from it)
        for idx in mb.micro_batches(list(range(len(mb))), cfg.micro_batch_size):
            x = mb.rows(idx, device)
            share = len(x) / len(batch)
            if critic is not None:
                with amp:
                    values = critic(x.ids)
                vl, vm = value_loss(values, x.old_values, x.returns, cfg.value_clip, x.mask)
                aggregate(vl, x.mask, "token-mean", vdenom).backward()
                sums["value_loss"] += float(aggregate(vl.detach(), x.mask, "token-mean", vdenom))
                sums["vf_clipfrac"] += float(vm["vf_clipfrac"]) * share
            if not train_policy:
                continue
            with amp:
                logp, ent = token_logp(model, x, cfg, with_entropy=cfg.entropy_coef > 0)
            if x.old_logp is None:
                x.old_logp = logp.detach()
                for k, v in correct_mismatch(x, cfg).items():
                    measured[k] += v
                kept[idx, :x.mask.shape[1]] = x.mask.cpu()
            elif cfg.old_logprobs == "sampler" and updates == 0:
                for k, v in mismatch_sums(logp.detach(), x.old_logp, x.mask).items():
                    measured[k] += float(v)
            pl, pm = policy_objective(logp, x.old_logp, x.adv, x.mask, cfg)
            if x.tis_w is not None:
                pl = pl * x.tis_w
            loss_tok = pl
            if x.ref_logp is not None and critic is None:   # GRPO: KL as a loss term (PPO has it in the reward)
                kl = kl_penalty(logp, x.ref_logp, cfg.kl_estimator)
                loss_tok = loss_tok + cfg.kl_coef * kl
                sums["kl"] += float(masked_mean(kl.detach(), x.mask)) * share
            if ent is not None:
                loss_tok = loss_tok - cfg.entropy_coef * ent
                sums["entropy"] += float(masked_mean(ent.detach(), x.mask)) * share
            aggregate(loss_tok, x.mask, cfg.loss_agg, denom).backward()
            sums["pg_loss"] += float(aggregate(pl.detach(), x.mask, cfg.loss_agg, denom))
            sums["clipfrac"] += float(pm["clipfrac"]) * share
        if batch.old_logp is None:   # the denominator counted trajectories this pass then dropped: rescale
            kept_denom = dist.all_reduce_sum(step_denominator(kept, cfg.loss_agg, cfg.max_new_tokens))
            scale = float(denom / kept_denom.clamp(min=1e-30))   # none left: every gradient is 0 anyway
            if scale != 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
                sums["pg_loss"] *= scale
        for name, net in (("critic", critic), ("policy", model if train_policy else None)):
            if net is not None:
                dist.sync_grads(net)
                norm = dist.clip_grad_norm(net, cfg.grad_clip)
                sums["grad_norm"] += norm if name == "policy" else 0.0
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
        updates += 1
    per_update = ("grad_norm", "pg_loss", "value_loss")   # the others are summed as shares of each pass
    return {**{k: v / (updates if k in per_update else cfg.ppo_epochs) for k, v in sums.items()}, **measured}


def no_signal(adv: torch.Tensor, cfg, at_reference: bool) -> bool:
    """A GRPO step (no critic) whose every advantage `adv` [B] is 0 on every rank (each group's rewards equal),
    taken while the policy still is its reference, without an entropy term: its gradient is zero (the
    policy term has no advantage, the KL term's gradient vanishes where policy and reference agree), so
    `zero_update` stands for its passes and update. Early steps from a base model that solves nothing
    (the cold start) are such."""
    if not at_reference or cfg.entropy_coef != 0:
        return False
    return not bool(dist.all_reduce_sum((adv != 0).sum()))


def zero_update(model, opts: dict, num_rows: int, cfg, step: int) -> dict[str, float]:
    """`update` for a step of zero gradient: one optimizer step per mini-batch on zero gradients, so the
    optimizer's state counts them (Adam's bias correction) and weight decay applies as it would."""
    for _ in minibatches(num_rows, cfg, step_seed(cfg.seed, step, 99)):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opts["policy"].step()
        opts["policy"].zero_grad(set_to_none=True)
    return dict.fromkeys((*UPDATE_SUMS, "mis_dropped"), 0.0)


# Summed over ranks, then: these are each rank's means (divided by the world size); the mismatch and TIS
# sums are divided by their token counts; counts and the losses (shares of one global loss) stay sums.
RANK_MEANS = ("reward", "accuracy", "code_calls", "code_use", "response_len", "truncated", "ds_extra_rounds", "kl",
              "clipfrac", "entropy", "grad_norm", "vf_clipfrac", "value_mean", "no_signal")
COUNTS = ("mis_dropped", "void_dropped", "truncated_dropped", "ds_dropped_groups", "ds_extra_rounds")


def step_metrics(sums: dict[str, float]) -> dict:
    """One step's logged metrics from every rank's named sums."""
    t, w = dist.all_reduce_dict(sums), dist.world_size()
    out = {k: t[k] / w if k in RANK_MEANS else t[k] for k in t
           if k not in ("mismatch_tokens", "tis_sum", "tis_tokens")}
    for k in ("mismatch_kl", "mismatch_abs", "mismatch_frac_out"):   # none measured in a critic-only step
        out[k] = t.get(k, 0.0) / max(t.get("mismatch_tokens", 0.0), 1)
    out["tis_weight_mean"] = t["tis_sum"] / max(t["tis_tokens"], 1) if "tis_sum" in t else 1.0
    return {k: int(v) if k in COUNTS else v for k, v in out.items()}


def passes(model, ref, critic, batch: RLBatch, sums: dict, cfg, device, amp, adv) -> torch.Tensor | None:
    """What the update needs, into `batch`: pi_old (the sampler's, a pass of its own, or none when the
    update's forward is pi_old) and the sampler/trainer mismatch corrected (its measurements into `sums`),
    the reference's log-probs, the advantages: GRPO's `adv` [B] (group-relative) on every response token;
    PPO's from GAE on the critic's values with the KL (k1 of pi_old against the reference, returned) in
    the reward, whitened."""
    micro = cfg.micro_batch_size
    if cfg.old_logprobs == "sampler":
        batch.old_logp = batch.sampler_logp
    elif not pi_old_in_update(cfg, len(batch)):
        batch.old_logp = no_grad_pass(lambda x: token_logp(model, x, cfg)[0], batch, micro, device, amp)
    if batch.old_logp is not None:
        sums.update(correct_mismatch(batch, cfg))
    if ref is not None:
        with adapters_disabled(ref):
            batch.ref_logp = no_grad_pass(lambda x: token_logp(ref, x, cfg)[0], batch, micro, device, amp)
    if critic is None:
        batch.adv = adv[:, None] * batch.mask
        return None
    batch.old_values = no_grad_pass(lambda x: critic(x.ids), batch, micro, device, amp) * batch.mask
    reward_kl = kl_penalty(batch.old_logp, batch.ref_logp, "k1") if ref is not None else None
    adv, batch.returns = gae(token_rewards(batch, reward_kl, cfg.kl_coef), batch.old_values, batch.mask,
                             cfg.gamma, cfg.lam)
    batch.adv = masked_whiten(adv, batch.mask) * batch.mask
    return reward_kl


def train_rl(cfg) -> dict:
    """`python train.py --stage grpo|ppo`: the whole run; returns the last step's metrics."""
    cfg, device, resumed = start_run(cfg)
    run_dir = open_run_dir(cfg)
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume, every=cfg.log_every)
    model, tokenizer, source = load_start_model(cfg, device, resumed)
    model.gradient_checkpointing = cfg.grad_checkpointing
    examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train", limit=cfg.num_train_examples,
                          seed=cfg.questions_seed())
    if dist.is_main():
        print(f"{cfg.stage}: {model.num_params() / 1e6:.2f}M params from {source}; {len(examples)} training "
              f"questions; {cfg.prompts_per_step} prompts x {cfg.n_samples} samples per step")
    model = dist.parallelize(model, device)
    # The KL reference; with LoRA the policy itself, run with its adapters off (the base), not a second copy.
    ref = (model if cfg.lora_rank else frozen_reference(model, cfg, resumed, device)) if cfg.kl_coef > 0 else None
    opts, critic = {"policy": make_optimizer(model.parameters(), cfg)}, None
    if cfg.stage == "ppo":
        critic = make_critic(model, resumed)
        critic.model.gradient_checkpointing = cfg.grad_checkpointing
        critic = dist.parallelize(critic, device)
        opts["critic"] = make_optimizer(critic.parameters(), cfg, lr=cfg.critic_lr)
    amp = autocast_for(device, cfg.dtype)
    sample_dtype = rollout_dtype(cfg.rollout_dtype, device)
    last = {}
    with Sandbox(timeout=cfg.exec_timeout) as sandbox:
        start, extra = resume(resumed, model, opts)
        pools = extra.get("pools")
        at_reference = extra.get("at_reference", resumed is None)   # the policy still is its start weights
        if resumed is None and cfg.curriculum:
            sampling = dist.unsharded_copy(model, sample_dtype)
            pools = curriculum_pools(cached_success(sampling, tokenizer, sandbox, examples, cfg))
        for step in range(start, cfg.steps):
            t0 = time.time()
            # Rollouts, from the policy or its copy in the sampling dtype (gathered whole when sharded).
            sampling = dist.unsharded_copy(model, sample_dtype)
            trajs, batch, sums = collect(sampling, tokenizer, sandbox, examples, cfg, step, pools)
            del sampling
            t_rollout = time.time()
            lr = set_lr(opts["policy"], step, cfg)
            batch.keep, dropped = loss_filter(trajs, cfg)
            sums.update(**dropped, **rollout_stats(trajs, batch))
            # GRPO's advantages, one per trajectory: all 0 from a policy still at its reference is no signal
            adv = grpo_advantages(batch.scores, cfg.n_samples, norm_std=cfg.norm_adv_std) if critic is None else None
            sums["no_signal"] = float(adv is not None and no_signal(adv, cfg, at_reference))
            if sums["no_signal"]:   # a zero gradient: no passes, no forward or backward
                sums.update(zero_update(model, opts, len(batch), cfg, step))
                at_reference = cfg.weight_decay == 0   # zero gradients move nothing but weight decay
                t_passes = time.time()
            else:
                reward_kl = passes(model, ref, critic, batch, sums, cfg, device, amp, adv)
                t_passes = time.time()
                for k, v in update(model, critic, opts, batch, cfg, device, amp, step).items():
                    sums[k] = sums.get(k, 0.0) + v   # mismatch sums come from here when pi_old is the update's
                at_reference = False
                if critic is not None:   # PPO logs the reward's KL as `kl` (GRPO its loss term's)
                    sums.update(value_mean=float(masked_mean(batch.old_values, batch.mask)),
                                kl=float(masked_mean(reward_kl, batch.mask)) if reward_kl is not None else 0.0)
            t_end = time.time()   # the step's time and its phases: rollouts, no-grad passes, update
            last = {**step_metrics(sums), "lr": lr, "step_s": t_end - t0, "rollout_s": t_rollout - t0,
                    "passes_s": t_passes - t_rollout, "update_s": t_end - t_passes}
            check_finite(last["pg_loss"] + last["value_loss"], step, run_dir)
            log.log(step, last)
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                extra = {"pools": pools, "at_reference": at_reference,
                         **({"critic": dist.full_state_dict(critic)} if critic is not None else {})}
                save_run_checkpoint(run_dir, step, model, tokenizer, opts, extra=extra,
                                    keep=cfg.keep_checkpoints or cfg.steps + 1, base=cfg.model)
    dist.shutdown()
    return last
