"""The Qwen2 `config.json`: `ModelConfig` (the fields the model reads, unsupported options refused by name)
and `read_json`, which names the file it could not read."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        self._check_types()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    def _check_types(self) -> None:
        """Refuse fields of the wrong JSON type (`"hidden_size": "64"`) or out of range, naming the field."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def need(ok: bool, name: str, want: str) -> None:
            if not ok:
                raise ValueError(f"config field {name} must be {want}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "a positive integer")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            need((is_int(value) or isinstance(value, float)) and 0 < value < float("inf"), name, "a positive number")
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", "true or false")
        need(self.head_dim is None or (is_int(self.head_dim) and self.head_dim >= 1), "head_dim", "a positive integer")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos)):
            need(all(i is None or (is_int(i) and 0 <= i < self.vocab_size) for i in ids), name,
                 f"a token id below vocab_size {self.vocab_size}")
        need(self.torch_dtype is None or isinstance(self.torch_dtype, str), "torch_dtype", "a string")

    @classmethod
    def from_json(cls, source: str | Path | dict) -> "ModelConfig":
        """Build from a HF `config.json` (path or dict), refusing what this model does not implement."""
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            raw = read_json(path / "config.json" if path.is_dir() else path)
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"unsupported model_type {model_type!r}: only 'qwen2' (Qwen-2.5) is implemented")
        if raw.get("use_sliding_window", False):
            raise ValueError("unsupported config: use_sliding_window=true (sliding-window attention is not "
                             "implemented)")
        for key in ("rope_scaling", "rope_parameters"):
            rope = raw.get(key) or {}
            if not isinstance(rope, dict):
                raise ValueError(f"unsupported config: {key}={rope!r} (expected an object or null)")
            kind = rope.get("rope_type", rope.get("type"))
            if kind not in (None, "default"):
                raise ValueError(f"unsupported config: {key}={rope!r} (only plain RoPE is implemented)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported config: hidden_act={raw['hidden_act']!r} (Qwen2 uses silu)")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if n not in raw]
        if missing:
            raise ValueError(f"config is missing required fields: {missing}")
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        if raw.get("rope_theta") is None and isinstance(raw.get("rope_parameters"), dict):
            kwargs["rope_theta"] = raw["rope_parameters"].get("rope_theta", 1_000_000.0)
        if kwargs.get("rope_theta") is None:
            kwargs.pop("rope_theta", None)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The HF `config.json` contents for this configuration."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                 use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers,
                 attention_dropout=0.0, rope_scaling=None, use_cache=True)
        return {k: v for k, v in d.items() if v is not None or k in ("sliding_window", "rope_scaling")}


def read_json(file: Path) -> dict:
    """A JSON file's contents; FileNotFoundError or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"no {file.name} at {file}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
