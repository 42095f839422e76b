"""Multi-turn supervised fine-tuning with interpreter output masked out of the loss (`--stage sft`).

One straight loop: draw a batch (deterministic in seed and step), split it into micro-batches and
ranks, sum each micro-batch's masked token losses over the trained tokens of the *whole* step, then
clip and step AdamW (warmup + cosine). Data (data.py): the built-in tasks' oracle trajectories, or
`--sft_data FILE.jsonl` (`--sft_min_reward 1`: rejection sampling from any teacher, the open stand-in
for the paper's GPT-4o trajectories); `--use_code=false` trains the text-only baseline. `--stage
pretrain` is this loop on the copy corpus, the tiny preset's stand-in for pretraining.

Simplified against the paper's LLaMA-Factory runs: no sequence packing, no varied prompt formats;
batches are drawn with replacement rather than in epochs (exactly resumable from any step).
"""
from __future__ import annotations

import math
import random
import time

import torch

from minir1ci.training import distributed as dist
from minir1ci.training.data import copy_corpus, load_jsonl, next_token_targets, oracle_samples, pad_batch
from minir1ci.env.tasks import load_tasks
from minir1ci.inference.devices import autocast_for
from minir1ci.training.optim import make_optimizer, set_lr
from minir1ci.training.progress import MetricsLog, check_finite
from minir1ci.training.runs import (load_start_model, open_run_dir, release_run_dir, resume, save_run_checkpoint,
                                    start_run, step_seed)


def build_samples(cfg, tokenizer, vocab_size: int | None = None):
    """(samples that fit max_seq_len, how many did not) from the stage's data source."""
    if cfg.stage == "pretrain":
        samples = copy_corpus(tokenizer, cfg.num_train_examples, seed=cfg.questions_seed())
    elif cfg.sft_data:
        min_reward = None if cfg.sft_min_reward == -math.inf else cfg.sft_min_reward
        samples = load_jsonl(cfg.sft_data, tokenizer, min_reward=min_reward, vocab_size=vocab_size)
    else:
        examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train",
                              limit=cfg.num_train_examples, seed=cfg.questions_seed())
        missing = sorted({ex.task for ex in examples if ex.oracle is None})
        if missing and cfg.use_code:
            raise ValueError(f"--tasks {cfg.tasks!r}: {', '.join(missing)} have no oracle code trajectories (only "
                             "the built-in families do); pass --sft_data FILE.jsonl for them")
        samples = oracle_samples(examples, tokenizer, cfg.use_code, cfg.text_fraction, cfg.questions_seed())
    # Too long: dropped, not truncated (a cut trajectory would teach the model to stop mid-answer).
    kept = [s for s in samples if len(s.ids) <= cfg.max_seq_len and any(s.mask)]
    if not kept:
        raise ValueError(f"no {cfg.stage} sample fits max_seq_len={cfg.max_seq_len}")
    return kept, len(samples) - len(kept)


def sft_step_loss(model, batch, denom: float, cfg, device, amp) -> tuple[float, int]:
    """Forward + backward of one micro-batch; returns (sum of token losses, tokens)."""
    ids, attn, mask = pad_batch([s.ids for s in batch], [s.mask for s in batch])
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    targets, target_mask = next_token_targets(ids, mask)
    with amp:   # right-padded: plain causal attention never lets a real token see padding
        logp, _ = model(ids, targets=targets, target_mask=target_mask, chunk_size=cfg.loss_chunk_size)
    loss_sum = -(logp * target_mask).sum()
    (loss_sum / denom).backward()
    return float(loss_sum.detach()), int(attn.sum())


def train_sft(cfg) -> dict:
    """`python train.py --stage pretrain|sft`: the whole run; returns the last step's metrics."""
    cfg, device, resume_dir = start_run(cfg)
    model, tokenizer, source = load_start_model(cfg, device, resume_dir)
    model.gradient_checkpointing = cfg.grad_checkpointing
    samples, dropped = build_samples(cfg, tokenizer, model.config.vocab_size)
    run_dir = open_run_dir(cfg)   # only once the data has loaded: a bad input leaves no run directory
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume, every=cfg.log_every)
    if dist.is_main():
        print(f"{cfg.stage}: {model.num_params() / 1e6:.2f}M params from {source}; {len(samples)} samples "
              f"({dropped} longer than {cfg.max_seq_len} dropped); world size {dist.world_size()}")
    model = dist.parallelize(model, device)
    opt = make_optimizer(model.parameters(), cfg)
    start, _ = resume(resume_dir, model, {"policy": opt})
    amp = autocast_for(device, cfg.dtype)
    model.train()
    last = {}
    for step in range(start, cfg.steps):
        t0 = time.time()
        rng = random.Random(step_seed(cfg.seed, step))
        batch = [samples[rng.randrange(len(samples))] for _ in range(cfg.batch_size)]
        # The normaliser counts trained tokens over the whole step, every micro-batch and rank.
        denom = float(sum(sum(s.mask[1:]) for s in batch))
        mine = sorted(dist.shard(batch), key=lambda s: len(s.ids))   # micro-batches of like lengths: less padding
        loss_sum, tokens = 0.0, 0
        for i in range(0, len(mine), cfg.micro_batch_size):
            l, n = sft_step_loss(model, mine[i:i + cfg.micro_batch_size], denom, cfg, device, amp)
            loss_sum, tokens = loss_sum + l, tokens + n
        totals = dist.all_reduce_sum(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64))
        loss = float(totals[0]) / denom
        check_finite(loss, step, run_dir)
        dist.sync_grads(model)
        grad_norm = dist.clip_grad_norm(model, cfg.grad_clip)
        lr = set_lr(opt, step, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_s": float(totals[1]) / (time.time() - t0)}
        log.log(step, last)
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
            save_run_checkpoint(run_dir, step, model, tokenizer, {"policy": opt}, base=cfg.model)
    release_run_dir(run_dir)
    dist.shutdown()
    return last
