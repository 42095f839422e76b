"""Multi-process training under `torchrun`, applied from outside the model: FSDP2 on CUDA (`fully_shard`
per decoder layer, then the root; bf16 compute, fp32 reduce), a full replica per rank on CPU (gloo).
Without torchrun everything here is a no-op (world size 1). Gradients are summed across ranks, not
averaged: losses are already divided by the whole step's denominator on all ranks (losses.py).

Simplified: no tensor or pipeline parallelism; rollouts are split across ranks by prompt.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from minir1ci.inference import lora


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto") -> None:
    """Start the process group when launched by torchrun (RANK, WORLD_SIZE and MASTER_ADDR set): NCCL
    (with gloo for CPU tensors) when `device` may be CUDA and a GPU is visible, else gloo alone."""
    if is_initialized() or any(k not in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        # NCCL for CUDA tensors; gloo beside it for the small CPU tensors (loss sums, counts).
        tdist.init_process_group("cuda:nccl,cpu:gloo")
    else:
        tdist.init_process_group("gloo")


def shutdown() -> None:
    if is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity in a single process."""
    if not is_initialized():
        return x
    x = x.clone()
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def all_reduce_dict(sums: dict[str, float]) -> dict[str, float]:
    """Each named value summed over ranks, in one float64 all-reduce; unchanged in a single process."""
    names = sorted(sums)
    total = all_reduce_sum(torch.tensor([float(sums[k]) for k in names], dtype=torch.float64))
    return dict(zip(names, total.tolist()))


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list) -> list:
    """This rank's strided share of `items`."""
    return items[rank()::world_size()]


COMPUTE_DTYPE = torch.bfloat16  # FSDP2's parameter dtype in forward; unsharded copies use it too


def is_sharded(model: torch.nn.Module) -> bool:
    return getattr(model, "_minir1ci_fsdp", False)


def parallelize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard with FSDP2 on CUDA; on CPU keep a full replica (gradients summed by `sync_grads`)."""
    if not is_initialized() or device.type != "cuda":
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPE, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Losses are divided by the whole step's denominator: gradients are summed (FSDP2 averages by default).
    for module in [*model.model.layers, model]:
        setter = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
        setter(1.0)
    model._minir1ci_fsdp = True
    return model


def sync_grads(model: torch.nn.Module) -> None:
    """Sum gradients over ranks for replicated (CPU) training. FSDP2 reduces its own."""
    if not is_initialized() or is_sharded(model):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])   # one all-reduce for the whole model
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def full_state_dict(model: torch.nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU (on rank 0; None elsewhere when sharded); `trained_only`: the
    parameters that require grad (LoRA's adapters), gathered one at a time, on every rank."""
    if trained_only:
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for name, p in model.named_parameters() if p.requires_grad}
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_main() else None


@torch.no_grad()
def unsharded_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A plain copy of a sharded model on every rank, for sampling (the sampler cannot run DTensor
    shards); `model` itself when not sharded and `dtype` is None or its own. Every rank must call it:
    parameters are all-gathered one at a time into `dtype` (default COMPUTE_DTYPE; buffers keep theirs),
    on a model built on the meta device, so no second fp32 copy is ever made. LoRA: merged (`merge_lora`)."""
    spec = getattr(model, "lora_spec", None)
    if spec is not None and not is_sharded(model):
        model, spec = lora.merge_lora(model), None
    if not is_sharded(model) and dtype in (None, next(model.parameters()).dtype):
        return model
    dtype = dtype or COMPUTE_DTYPE
    from minir1ci.inference.model import Qwen2ForCausalLM  # fully_shard swapped the class of `model` for an FSDP one

    with torch.device("meta"):
        copy = Qwen2ForCausalLM(model.config)
    if spec is not None:
        lora.apply_lora(copy, *spec)
    device = next(model.parameters()).device
    copy = copy.to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty makes one new tensor per module: tie them again
        copy.lm_head.weight = copy.model.embed_tokens.weight
    for p in copy.parameters():  # tied weights are one Parameter: converted once, still tied
        p.data = torch.empty_like(p, dtype=dtype)
    dst = {**dict(copy.named_parameters()), **dict(copy.named_buffers())}
    src = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if dst.keys() != src.keys():
        raise RuntimeError(f"the unsharded copy does not match the sharded model: {sorted(dst.keys() ^ src.keys())}")
    for name, t in src.items():
        dst[name].copy_(t.full_tensor() if hasattr(t, "full_tensor") else t)
    return (copy if spec is None else lora.merge_lora(copy)).eval()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip by the global norm (FSDP2's DTensor grads reduce across shards inside clip_grad_norm_)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
