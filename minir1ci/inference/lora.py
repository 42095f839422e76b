"""LoRA on the decoder's linear layers, from scratch, saved and loaded in PEFT's layout.

    apply_lora(model, rank=8, alpha=32)  # adapters on the targeted decoder linears; every other weight frozen
    with adapters_disabled(model): ...   # the base model (RL's KL reference) without a second copy
    merged = merge_lora(model)           # a plain Qwen2ForCausalLM, to sample from (the CPU sampler's fused
                                         # q/k/v copy, model.fused_weights, would skip adapters) and to export

A layer computes W x + b + (alpha / r) B A x: W, b frozen; A [r, in], B [out, r] in fp32, B zero at first. HF
names stay (`q_proj.weight`); adapters add `q_proj.lora_A.weight`, PEFT's names less `base_model.model.`.
Simplified against PEFT: one adapter, one rank and alpha, targets by short name; no dropout, rsLoRA, DoRA or
trained biases (adapter_config.json options beyond r, lora_alpha and target_modules are not read).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minir1ci.inference.checkpoint import CONFIG, _write_json, load_pretrained, write_atomically
from minir1ci.inference.model import Linear, Qwen2ForCausalLM
from minir1ci.inference.model_config import read_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's two wrappers (PeftModelForCausalLM, LoraModel) before HF's names


class LoRALinear(Linear):
    """model.Linear plus lora_A (in -> r) and lora_B (r -> out); `apply_lora` swaps a layer's class for this one."""
    enabled = True  # False inside `adapters_disabled`

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)                                                    # (..., out), base dtype
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling  # (..., out), fp32
        return (y + update).to(y.dtype)  # summed in fp32 and rounded once, as PEFT does


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = TARGETS) -> nn.Module:
    """Adapters on the linears named in `targets`, every other parameter frozen; in place. A rank above a
    layer's min(in, out) is refused first (on a meta-device model: the shape check alone)."""
    layers = {name: m for name, m in model.named_modules() if name.rpartition(".")[2] in targets}
    for name, m in layers.items():
        if rank > min(m.in_features, m.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = {min(m.in_features, m.out_features)} "
                             f"of {name}")
    model.requires_grad_(False)
    for m in layers.values():
        m.__class__ = LoRALinear  # the same object: HF names, storage and weight tying are untouched
        m.scaling = alpha / rank
        # A gets nn.Linear's kaiming-uniform init (PEFT's too); B zero: the model starts as the base
        m.lora_A = nn.Linear(m.in_features, rank, bias=False, device=m.weight.device, dtype=torch.float32)
        m.lora_B = nn.Linear(rank, m.out_features, bias=False, device=m.weight.device, dtype=torch.float32)
        nn.init.zeros_(m.lora_B.weight)
    model.lora_spec = (rank, alpha, tuple(sorted(targets)))  # survives fully_shard; read by save and gather
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes with its base weights alone (a no-op without adapters)."""
    layers = lora_layers(model).values()
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """A plain Qwen2ForCausalLM with W + (alpha / r) B A (summed in fp32, stored in W's dtype); only merged
    weights are new tensors, the rest is shared with `model` (which keeps its adapters)."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for name, m in lora_layers(model).items():
        delta = (m.lora_B.weight @ m.lora_A.weight) * m.scaling                   # [out, r] @ [r, in], fp32
        state[f"{name}.weight"] = (m.weight.float() + delta).to(m.weight.dtype)
    with torch.device("meta"):
        merged = Qwen2ForCausalLM(model.config)
    merged.load_state_dict(state, assign=True)
    merged.model.rotary_emb = copy.deepcopy(model.model.rotary_emb)  # a non-persistent buffer: not in `state`
    if model.config.tie_word_embeddings:  # assign=True gave the head a Parameter of its own: tie it again
        merged.lm_head.weight = merged.model.embed_tokens.weight
    return merged


def save_adapter(model: nn.Module, path: str | Path, base: str | Path, state_dict: dict | None = None) -> None:
    """The adapters in PEFT's layout, written atomically, the base's directory recorded absolute; a sharded
    model passes its gathered adapters as `state_dict`."""
    rank, alpha, targets = model.lora_spec
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "bias": "none",
              "target_modules": list(targets), "base_model_name_or_path": str(Path(base).absolute())}
    tensors = {PEFT_PREFIX + name: t.detach().cpu().contiguous()
               for name, t in (state_dict or model.state_dict()).items() if ".lora_" in name}
    with write_atomically(Path(path), ADAPTER_CONFIG) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        _write_json(tmp / ADAPTER_CONFIG, config)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """(model with its adapters, the base's tokenizer); the base loaded by `load_pretrained` (merged if an adapter)."""
    config, base = adapter_config(Path(path))
    model, tokenizer = load_pretrained(base, dtype, device)
    apply_lora(model, config["r"], config["lora_alpha"], {t.rpartition(".")[2] for t in config["target_modules"]})
    adapters = {name.removeprefix(PEFT_PREFIX): t for name, t in load_file(Path(path) / ADAPTER_FILE).items()}
    model.load_state_dict(adapters, strict=False)  # the base's tensors are already in place
    return model, tokenizer


def adapter_config(path: Path) -> tuple[dict, Path]:
    """adapter_config.json and the base model directory it names (absolute, or relative to `path`)."""
    config = read_json(path / ADAPTER_CONFIG)
    base = path / (config.get("base_model_name_or_path") or "")  # an absolute path replaces `path`
    if not (base / CONFIG).is_file():
        raise FileNotFoundError(f"the base model of adapter {path} is missing: no {CONFIG} at {base}")
    return config, base
