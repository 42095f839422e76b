"""Device and dtype, resolved once at the edge (command line, trainer set-up); model code reads none
(but for `cpu_has_bf16_units`, which picks how model.linear multiplies bf16 on a CPU).

`auto` means CUDA when present. For sampling (`inference_dtype`, `rollout_dtype`) it is bf16 on CUDA,
and on a CPU only where it has bf16 matrix units (AMX-BF16 or AVX512-BF16): without them torch's
bf16 products are emulated, 2.4x slower than fp32 for a 2048x896 -> 4864 linear (model.linear then
multiplies bf16 values in fp32 instead, at fp32's speed; fp32 stays the more exact choice). For training
(`train_autocast_dtype`) it is bf16 autocast on CUDA and fp32 on a CPU (slower even with AMX at the
tiny preset; see bench/train.py). Weights, optimizer state, log-probs and losses stay fp32.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def cpu_has_bf16_units() -> bool:
    """True where this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), as torch sees it."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA device `local_rank` when CUDA is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`resolve_device`, refusing a device this machine does not have (`cuda:7` with one GPU, or none)."""
    device = resolve_device(name, local_rank)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {device} is not available: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ValueError(f"device {device} is not available: {reason}") from None
    return device


def named_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ('bf16', 'bfloat16', 'torch.bfloat16', ...) or itself."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for sampling and evaluation (see the module docstring for `auto`)."""
    if name != "auto":
        return named_dtype(name)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units()):
        return torch.bfloat16
    return torch.float32


def train_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a training step, None for fp32 (see the module docstring for `auto`)."""
    dtype = (torch.bfloat16 if device.type == "cuda" else None) if name == "auto" else named_dtype(name)
    return None if dtype in (None, torch.float32) else dtype


def rollout_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """What `--rollout_dtype` samples in (`inference_dtype`'s choice): None = the policy's own fp32
    weights (a sharded policy's gathered copy is always bf16), else a copy in that dtype."""
    dtype = inference_dtype(name, device)
    return None if dtype == torch.float32 else dtype


def autocast_for(device: torch.device, name: str):
    """The autocast context of a training step (`train_autocast_dtype`); a no-op for fp32."""
    amp = train_autocast_dtype(name, device)
    return nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=amp)
