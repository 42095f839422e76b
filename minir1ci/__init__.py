"""minir1ci: R1-Code-Interpreter training, from scratch in PyTorch.

    model, tokenizer = minir1ci.load_pretrained("path/to/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    logits = model(input_ids)                      # [B, T] -> [B, T, vocab]
    minir1ci.save_pretrained(model, tokenizer, "runs/sft/final")   # transformers/vLLM load it

Exports resolve lazily (PEP 562), so the sandbox's workers do not pay for importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {   # public name -> module that defines it
    **dict.fromkeys(("load_pretrained", "save_pretrained", "load_model", "init_from_config"), "inference.checkpoint"),
    **dict.fromkeys(("ModelConfig", "Qwen2ForCausalLM"), "inference.model"),
    "Tokenizer": "inference.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minir1ci' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
