"""PPO's value model (a Qwen2 backbone with a scalar `score` head, as HF's Qwen2ForTokenClassification
with one label) and the per-token rewards its GAE runs on.

Simplified against veRL: critic and policy share the device and process; the critic is saved in
the trainer state, not as its own HF checkpoint; its only warm-up is `critic_warmup_steps`.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from minir1ci.inference import lora
from minir1ci.training import distributed as dist
from minir1ci.inference.model import Qwen2Model
from minir1ci.training.runs import load_trainer_state


class Critic(nn.Module):
    """V(prefix) at every position; the `score` head starts at zero, so the first values are all 0."""

    def __init__(self, backbone: Qwen2Model):
        super().__init__()
        self.model = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False, device=next(backbone.parameters()).device)
        nn.init.zeros_(self.score.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.model(input_ids, attention_mask)           # [B, T, H]
        return self.score(h).squeeze(-1).float()             # [B, T]


def make_critic(model, resume_dir) -> Critic:
    """The value model, whole on this rank (shard it after): the policy's backbone in fp32, or on resume
    the critic in rank 0's trainer state. Call it after `dist.parallelize(model)`, so no rank holds the
    whole fp32 policy and critic at once. A LoRA policy gets a LoRA critic (frozen base, own adapters, score head
    trained): a full one would need full fine-tuning's memory (gradients, AdamW state), what LoRA avoids."""
    if dist.is_sharded(model):
        backbone = dist.unsharded_copy(model, dtype=torch.float32).model   # LoRA: merged, B = 0 at the start
        if hasattr(model, "lora_spec"):
            lora.apply_lora(backbone, *model.lora_spec)
    else:   # the memo maps each frozen tensor to itself: shared (all of them trained without LoRA: copied)
        backbone = copy.deepcopy(model.model, memo={id(p): p for p in model.parameters() if not p.requires_grad})
    critic = Critic(backbone).train()
    if resume_dir is not None:  # every rank reads rank 0's file: only it holds the whole critic
        critic.load_state_dict(load_trainer_state(resume_dir)["extra"]["critic"])
    return critic


def token_rewards(batch, kl: Tensor | None, kl_coef: float) -> Tensor:
    """[B, T]: -kl_coef * kl (k1 of pi_old against the reference) on sampled tokens, plus the sequence
    reward on the last sampled one."""
    r = torch.zeros_like(batch.mask, dtype=torch.float32)
    if kl is not None and kl_coef > 0:
        r = -kl_coef * kl * batch.mask
    pos = torch.arange(batch.mask.shape[1]).expand_as(batch.mask)
    last = torch.where(batch.mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values   # [B]
    has = last >= 0
    r[has, last[has]] += batch.scores[has]
    return r
