"""AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay."""
from __future__ import annotations

import math

import torch


def make_optimizer(params, cfg, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_factor(step: int, cfg) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio` over `cfg.steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, step: int, cfg) -> float:
    """Give every group the learning rate of `step` (`cfg.lr` times `lr_factor`); return it."""
    lr = cfg.lr * lr_factor(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr
