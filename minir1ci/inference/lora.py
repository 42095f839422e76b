"""LoRA on the decoder's linear layers, from scratch, saved and loaded in PEFT's layout.

    apply_lora(model, rank=8, alpha=16)  # adapters on every decoder linear (attention and MLP); all else frozen
    with adapters_disabled(model): ...   # the base model (the KL reference) without a second copy
    save_adapter(model, "runs/grpo/adapter", base_path)  # PEFT and vLLM load it, and so does load_pretrained
    merged = merge_lora(model)           # a plain Qwen2ForCausalLM, for sampling and export

An adapted layer computes W x + b + (alpha / r) B A x: W, b frozen; A [r, in], B [out, r] trained in fp32 even
on a bf16 base; B starts at zero, so a fresh adapter changes no output. HF names stay (`q_proj.weight`); the
adapters add `q_proj.lora_A.weight`, PEFT's names without its `base_model.model.` prefix.
Sample from `merge_lora(model)`: the CPU sampler's fused q/k/v copy (model.fused_weights) skips adapters.
Simplified against PEFT: one adapter, one rank, decoder linears only; no dropout, rsLoRA, DoRA or trained biases.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minir1ci.inference.checkpoint import CONFIG, _load_tokenizer, _write_json, load_pretrained, write_atomically
from minir1ci.inference.model import Qwen2ForCausalLM, read_json
from minir1ci.inference.tokenizer import Tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's two wrappers (PeftModelForCausalLM, LoraModel) before HF's names
# PEFT options not implemented here: an adapter that sets one is refused, not silently misread.
UNSUPPORTED = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
               "modules_to_save", "layers_to_transform")


class LoRALinear(nn.Linear):
    """nn.Linear plus the low-rank update; `apply_lora` swaps a layer's class for this one, so its weight and
    bias keep their names, storage and dtype. Adds lora_A (in -> r) and lora_B (r -> out), both fp32."""
    enabled = True  # False inside `adapters_disabled`

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)                                                    # (..., out), base dtype
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling  # (..., out), fp32
        return (y + update).to(y.dtype)  # summed in fp32 and rounded once, as PEFT does


def apply_lora(model: Qwen2ForCausalLM, rank: int, alpha: float, targets: Sequence[str] = TARGETS) -> Qwen2ForCausalLM:
    """Give each decoder linear named in `targets` an adapter and freeze every other parameter; in place,
    returns `model`. A is drawn from the global RNG (the trainer seeds it), B is zero."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {', '.join(TARGETS)}")
    layers = {name: m for name, m in model.named_modules()
              if name.startswith("model.layers.") and name.rpartition(".")[2] in targets}  # not lm_head
    for name, m in layers.items():
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if rank > min(m.in_features, m.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = {min(m.in_features, m.out_features)} "
                             f"of {name}")
    model.requires_grad_(False)
    for m in layers.values():
        m.__class__ = LoRALinear  # the same object: HF names, storage and weight tying are untouched
        m.lora_alpha, m.scaling = alpha, alpha / rank
        m.lora_A = nn.Linear(m.in_features, rank, bias=False, device=m.weight.device, dtype=torch.float32)
        m.lora_B = nn.Linear(rank, m.out_features, bias=False, device=m.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))  # PEFT's init (nn.Linear's own)
        nn.init.zeros_(m.lora_B.weight)                            # B A = 0: the model starts as the base
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes with its base weights alone (the KL reference, no second copy)."""
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
    """A new plain Qwen2ForCausalLM with W + (alpha / r) B A in each adapted layer (summed in fp32, stored in W's
    dtype), for sampling and export; `model` keeps its adapters. Only merged weights are new tensors: the rest
    (embeddings, norms, biases, unadapted layers) is shared with `model`, so read the merged model, never train it."""
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
    return merged.requires_grad_(False).eval()


def save_adapter(model: nn.Module, path: str | Path, base_model_path: str | Path) -> Path:
    """Write the adapters in PEFT's layout (fp32), atomically as `save_pretrained` does; returns the path.
    The base model's path is recorded absolute."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    m = next(iter(layers.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": m.lora_A.out_features, "lora_alpha": m.lora_alpha,
              "target_modules": sorted({n.rpartition(".")[2] for n in layers}), "bias": "none", "lora_dropout": 0.0,
              "base_model_name_or_path": str(Path(base_model_path).absolute()), "inference_mode": True,
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}  # PEFT defaults the rest
    tensors = {f"{PEFT_PREFIX}{name}.{ab}.weight": getattr(m, ab).weight.detach().cpu().contiguous()
               for name, m in layers.items() for ab in ("lora_A", "lora_B")}
    path = Path(path).absolute()
    with write_atomically(path, ADAPTER_CONFIG) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        _write_json(tmp / ADAPTER_CONFIG, config)
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> tuple[Qwen2ForCausalLM, Tokenizer | None]:
    """(model, tokenizer) from an adapter directory: the base model it names, loaded by `load_pretrained`, with
    the adapters applied in fp32; the adapter directory's tokenizer if it has one, else the base's."""
    path = Path(path)
    config, base = adapter_config(path)
    model, tokenizer = load_pretrained(base, dtype, device)
    apply_lora(model, config["r"], config["lora_alpha"], config["target_modules"])
    adapters = {name.removeprefix(PEFT_PREFIX): t for name, t in load_file(path / ADAPTER_FILE).items()}
    differ = sorted(adapters.keys() ^ {name for name in model.state_dict() if ".lora_" in name})
    if differ:  # e.g. a PEFT adapter on some layers only
        raise ValueError(f"{path / ADAPTER_FILE} does not match {ADAPTER_CONFIG}: missing or extra {differ[:4]}")
    model.load_state_dict(adapters, strict=False)  # a wrong shape raises here, naming the tensor
    return model.eval(), _load_tokenizer(path) or tokenizer


def adapter_config(path: Path) -> tuple[dict, Path]:
    """adapter_config.json, checked, and the base model directory it names (absolute, or relative to `path`)."""
    config = read_json(path / ADAPTER_CONFIG)
    refused = {key: config[key] for key in UNSUPPORTED if config.get(key)}
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        refused.update(peft_type=config.get("peft_type"), bias=config.get("bias"))
    if not isinstance(config.get("target_modules"), list):  # PEFT also takes a regex string
        refused["target_modules"] = config.get("target_modules")
    if refused:
        raise ValueError(f"{path / ADAPTER_CONFIG}: only plain LoRA on listed modules is implemented, not {refused}")
    config["target_modules"] = sorted({t.rpartition(".")[2] for t in config["target_modules"]})  # short names
    base = path / (config.get("base_model_name_or_path") or "")  # an absolute path replaces `path`
    if not (base / CONFIG).is_file():
        raise FileNotFoundError(f"the base model of adapter {path} is missing: no {CONFIG} at {base}")
    return config, base

