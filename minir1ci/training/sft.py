"""Multi-turn supervised fine-tuning with interpreter output masked out of the loss.

One straight loop: sample a batch (deterministically from seed and step), split it into
micro-batches (and across ranks), sum each micro-batch's masked token losses divided by the number
of trained tokens in the *whole* step, step AdamW with warmup + cosine and gradient clipping.

Data: the built-in tasks' oracle trajectories by default (prompt, reasoning, a python block, its
real output, the answer), or `--sft_data FILE.jsonl` (chat messages or rollout.py trajectories;
`--sft_min_reward 1` keeps the trajectories whose reward reaches 1: rejection sampling from any
teacher checkpoint, the open-model stand-in for the paper's GPT-4o trajectories).
The loss covers assistant tokens only; interpreter output inside an assistant turn has mask 0.
`--use_code=false` trains the text-only baseline on the same questions. `--stage pretrain` is this
same loop on the synthetic copy corpus (`data.copy_corpus`): the tiny preset's stand-in for the
pretraining a real Qwen-2.5 checkpoint brings.

Simplified against the paper's LLaMA-Factory runs: no sequence packing, no varied prompt formats;
batches are drawn with replacement rather than in epochs (the same thing for the few-epoch budgets
used here, and exactly resumable from any step).
"""
from __future__ import annotations

import math
import random
import time

import torch

from minir1ci.training import distributed as dist
from minir1ci.training.data import (copy_corpus, filter_by_length, load_jsonl, next_token_targets, oracle_samples,
                                    pad_batch)
from minir1ci.env.tasks import load_tasks
from minir1ci.inference.devices import autocast_for
from minir1ci.training.optim import make_optimizer, set_lr
from minir1ci.training.runs import (MetricsLog, check_finite, load_start_model, load_trainer_state, open_run_dir,
                                    release_run_dir, restore_optimizers, save_run_checkpoint, start_run, step_seed)


def build_samples(cfg, tokenizer, vocab_size: int | None = None):
    if cfg.stage == "pretrain":
        samples = copy_corpus(tokenizer, cfg.num_train_examples, seed=cfg.seed)
    elif cfg.sft_data:
        min_reward = None if cfg.sft_min_reward == -math.inf else cfg.sft_min_reward
        samples = load_jsonl(cfg.sft_data, tokenizer, min_reward=min_reward, vocab_size=vocab_size)
    else:
        examples = load_tasks(cfg.tasks, data_dir=cfg.data or None, split="train",
                              limit=cfg.num_train_examples, seed=cfg.seed)
        if not all(hasattr(ex, "oracle_segments") for ex in examples):
            raise ValueError(f"--tasks {cfg.tasks!r} has tasks without oracle trajectories; "
                             "pass --sft_data FILE.jsonl for them")
        samples = oracle_samples(examples, tokenizer, cfg.use_code, cfg.text_fraction, cfg.seed)
    kept, dropped = filter_by_length(samples, cfg.max_seq_len)
    if not kept:
        raise ValueError(f"no {cfg.stage} sample fits max_seq_len={cfg.max_seq_len}")
    return kept, dropped


def sft_step_loss(model, batch, denom: float, cfg, device, amp) -> tuple[float, int]:
    """Forward + backward of one micro-batch; returns (sum of token losses, tokens)."""
    ids, attn, mask = pad_batch([s.ids for s in batch], 0, [s.mask for s in batch])
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    targets, target_mask = next_token_targets(ids, mask)
    with amp:
        logp, _ = model(ids, attention_mask=attn, targets=targets, target_mask=target_mask,
                        chunk_size=cfg.loss_chunk_size)
    loss_sum = -(logp * target_mask).sum()
    (loss_sum / denom).backward()
    return float(loss_sum.detach()), int(attn.sum())


def train_sft(cfg) -> dict:
    device = start_run(cfg)
    model, tokenizer, source, resume_dir = load_start_model(cfg, device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    samples, dropped = build_samples(cfg, tokenizer, model.config.vocab_size)
    run_dir = open_run_dir(cfg)   # only once the data has loaded: a bad input leaves no run directory
    if dist.is_main():
        print(f"{cfg.stage}: {model.num_params() / 1e6:.2f}M params from {source}; {len(samples)} samples "
              f"({dropped} longer than {cfg.max_seq_len} dropped); world size {dist.world_size()}")
    model = dist.parallelize(model, device)
    opt = make_optimizer(model.parameters(), cfg)
    start = 0
    log = MetricsLog(run_dir, cfg.steps, resume=cfg.resume, every=cfg.log_every)
    if resume_dir is not None:
        state = load_trainer_state(resume_dir, dist.is_sharded(model))
        restore_optimizers(state, {"policy": opt})
        start = state["step"] + 1
        log.truncate_after(state["step"])
    amp = autocast_for(device, cfg.dtype)
    model.train()
    last = {}
    for step in range(start, cfg.steps):
        t0 = time.time()
        rng = random.Random(step_seed(cfg.seed, step))
        batch = [samples[rng.randrange(len(samples))] for _ in range(cfg.batch_size)]
        # The normaliser counts trained tokens over the whole step, every micro-batch and rank.
        denom = float(sum(sum(s.mask[1:]) for s in batch))
        mine = dist.shard(batch)
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
            save_run_checkpoint(run_dir, step, model, tokenizer, {"policy": opt})
    release_run_dir(run_dir)
    dist.shutdown()
    return last
