"""Worker for test_distributed.py: one SFT optimizer step's loss and gradients, under torchrun or alone.

Writes {"loss": float, "grads": {name: tensor}, "params": {name: tensor}} (rank 0) to the path in
argv[1]. Uses the trainer's own pieces: the step denominator over the global batch, `dist.shard`,
`sft_step_loss`, `dist.parallelize` (FSDP2 on CUDA), `dist.sync_grads`, `dist.full_state_dict`.
With argv[2] == "cuda" it runs on the GPU of its local rank with the trainer's bf16 autocast.
"""
import random
import sys

import torch

from minir1ci.training import distributed as dist
from minir1ci.config import TrainConfig
from minir1ci.training.data import Sample
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
from minir1ci.training.sft import sft_step_loss
from minir1ci.inference.devices import autocast_for


def main(out: str, device_name: str = "cpu") -> None:
    dist.init(device_name)
    device = torch.device("cuda", dist.local_rank()) if device_name == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.init_weights(seed=0)
    model = dist.parallelize(model.to(device), device)
    rng = random.Random(0)
    batch = []
    for _ in range(8):                      # ragged sequences, masks with holes (interpreter output)
        n = rng.randint(5, 20)
        ids = [rng.randrange(96) for _ in range(n)]
        mask = [0] * 3 + [int(rng.random() > 0.3) for _ in range(n - 3)]
        batch.append(Sample(ids, mask))
    tcfg = TrainConfig(micro_batch_size=2, batch_size=8)
    denom = float(sum(sum(s.mask[1:]) for s in batch))
    mine = dist.shard(batch)
    loss_sum = 0.0
    for i in range(0, len(mine), tcfg.micro_batch_size):
        l, _ = sft_step_loss(model, mine[i:i + tcfg.micro_batch_size], denom, tcfg, device,
                             autocast_for(device, "auto"))
        loss_sum += l
    loss = float(dist.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64))) / denom
    dist.sync_grads(model)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
             for n, p in model.named_parameters()}     # a sharded gradient is gathered on every rank
    params = dist.full_state_dict(model)
    if dist.is_main():
        torch.save({"loss": loss, "world": dist.world_size(), "sharded": dist.is_sharded(model),
                    "grads": grads, "params": params}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
