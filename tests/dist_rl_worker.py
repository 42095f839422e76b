"""Worker for test_distributed.py: train.py's GRPO/PPO loop with the policy sharded by FSDP2 on CPU.

`dist.parallelize` keeps CPU runs replicated and shards only on CUDA; this worker swaps in the same
`fully_shard` calls over gloo so the sharded RL path (rollouts from a gathered copy, sharded
reference and critic, sharded checkpoints and resume) runs on a CPU-only machine. Gloo has no
pre-scaled reduce-scatter, so gradients are averaged over ranks here rather than summed; the test
checks that the loop runs and resumes, not the gradient scale.

    torchrun --nproc_per_node 2 tests/dist_rl_worker.py --stage grpo ... (train.py's arguments)
"""
import sys

from torch.distributed.fsdp import fully_shard

from minir1ci.training import distributed as dist


def parallelize_on_cpu(model, device):
    if not dist.is_initialized():
        return model
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model._minir1ci_fsdp = True
    return model


if __name__ == "__main__":
    dist.parallelize = parallelize_on_cpu
    import train
    sys.exit(train.main(sys.argv[1:]))
