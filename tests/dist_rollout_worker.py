"""Worker for test_distributed.py: rollouts from a sharded policy, under torchrun, equal rollouts
from the same weights unsharded.

Shards the tiny preset's model with FSDP2 (`dist.parallelize` on CUDA; on CPU, where parallelize
keeps replicas, the same `fully_shard` calls by hand, over gloo), then on every rank:
- `dist.unsharded_copy(model, fp32)` must equal the weights before sharding, exactly;
- the default copy has bf16 parameters, fp32 buffers and a still-tied LM head;
- rollouts from `dist.unsharded_copy` of the sharded model (the trainer's path) must give the same
  trajectories as from an unsharded model whose parameters were cast to bf16 the same way;
- the KL reference (`rl.frozen_reference`) holds those bf16 weights, frozen, and the PPO
  critic (`critic.make_critic`) the policy's fp32 backbone exactly, with a zero score head;
- the fp32 sampling copy of a sharded LoRA policy (gathered, then merged) has no adapters and gives the
  adapted model's logits.
Writes the findings of rank 0 to argv[1]; argv[2] == "cuda" runs on the local rank's GPU.
"""
import copy
import sys

import torch
from dist_rl_worker import parallelize_on_cpu  # this file's folder is on sys.path when run as a script

from minir1ci.training import distributed as dist
from minir1ci.inference.checkpoint import init_from_config
from minir1ci.inference.lora import apply_lora, lora_layers
from minir1ci.env.interpreter import RolloutParams, run_rollouts
from minir1ci.training.critic import make_critic
from minir1ci.presets import tiny_dir
from minir1ci.env.sandbox import Sandbox
from minir1ci.training.rl import frozen_reference


def shard(model, device: torch.device):
    return (dist.parallelize if device.type == "cuda" else parallelize_on_cpu)(model, device)


def main(out: str, device_name: str = "cpu") -> None:
    dist.init(device_name)
    device = torch.device("cuda", dist.local_rank()) if device_name == "cuda" else torch.device("cpu")
    model, tok = init_from_config(tiny_dir(), seed=0, device=device)
    whole = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(dist.COMPUTE_DTYPE)
    sharded = shard(model, device)
    exact = dist.unsharded_copy(sharded, dtype=torch.float32)
    mismatched = [k for k, v in whole.items() if not torch.equal(exact.state_dict()[k], v)]
    default = dist.unsharded_copy(sharded)
    frozen = frozen_reference(sharded, None, None, device)
    frozen_sd = dist.full_state_dict(frozen)  # None on ranks other than 0 when sharded
    ref_ok = frozen_sd is None or all(torch.equal(frozen_sd[k].cpu(), v.cpu()) for k, v in ref.state_dict().items())
    ref_frozen = not any(p.requires_grad for p in frozen.parameters())
    critic = make_critic(sharded, None)
    critic_ok = (all(torch.equal(critic.model.state_dict()[k[len("model."):]], v) for k, v in whole.items()
                     if k.startswith("model.")) and not critic.score.weight.any())
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 900, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    params = RolloutParams(temperature=1.0, max_new_tokens=24, seed=3)
    with Sandbox() as sandbox:
        got = run_rollouts(dist.unsharded_copy(sharded), tok, sandbox, prompts, 2, params)
        want = run_rollouts(ref, tok, sandbox, prompts, 2, params)
    adapted, _ = init_from_config(tiny_dir(), seed=0, device=device)
    apply_lora(adapted, 4, 8)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:   # the same on every rank (A is drawn from each rank's own RNG); B not zero
                p.copy_(torch.randn(p.shape, generator=gen).to(device) * 0.05)
    ids = torch.randint(0, 900, (2, 17), generator=gen).to(device)
    with torch.no_grad():
        want_lora = adapted(ids)
        merged = dist.unsharded_copy(shard(adapted, device), torch.float32)
        lora_ok = not lora_layers(merged) and torch.allclose(merged(ids), want_lora, atol=1e-5, rtol=1e-5)
    result = dict(world=dist.world_size(), lora_ok=lora_ok, sharded=dist.is_sharded(sharded), mismatched=mismatched,
                  ref_ok=ref_ok, ref_frozen=ref_frozen, critic_ok=critic_ok,
                  tied=default.lm_head.weight is default.model.embed_tokens.weight,
                  param_dtypes=sorted({str(p.dtype) for p in default.parameters()}),
                  buffer_dtypes=sorted({str(b.dtype) for b in default.buffers()}),
                  got=[t.response_ids for t in got], want=[t.response_ids for t in want],
                  got_logp=[t.logprobs for t in got], want_logp=[t.logprobs for t in want])
    if dist.is_main():
        torch.save(result, out)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
