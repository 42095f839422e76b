"""The Qwen-2.5 decoder (HF `Qwen2ForCausalLM`), one class for training and sampling.

HF parameter names, so checkpoints load strictly; the sampler's paged KV cache and `AttnMeta` are
passed in explicitly (see DEVELOPERS.md for both calling conventions).

Simplified against HF: no sliding-window attention, no rope scaling, no dropout; such configs are
refused rather than silently run wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minir1ci.inference.devices import cpu_has_bf16_units
from minir1ci.inference.kernels import attention as attn_kernels
from minir1ci.inference.logprobs import token_logprobs
from minir1ci.inference.model_config import ModelConfig


@dataclass
class AttnMeta:
    """Where the packed tokens of one sampler step sit in the paged KV cache (see DEVELOPERS.md)."""
    is_prefill: bool
    slot_mapping: Tensor            # [N] int64, cache slot (block * page_size + offset) of each new token
    block_table: Tensor             # [B, P] int32, the pages of each sequence
    context_lens: Tensor            # [B] int32, keys per sequence after this step (cached + new)
    cu_seqlens_q: Tensor | None = None  # [B+1] int32, prefill only
    cu_seqlens_k: Tensor | None = None  # [B+1] int32, prefill only
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    rows: Tensor | None = None      # [B] int64, decode on a CPU: each sequence's dense K/V row (engine/kv_rows.py)


# bf16 products on a CPU without bf16 units (AVX2 only): torch's own bf16 GEMM there ran 8-15x slower than
# fp32 at the tiny preset's shapes and 3.6x at a 32 x 896 -> 4864 linear (bench/bf16_cpu.py). Read once.
BF16_IN_FP32 = not cpu_has_bf16_units()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear. In bf16 on a CPU without bf16 units (BF16_IN_FP32) the product runs in fp32 and is rounded
    to bf16 once: a bf16 GEMM's math (the products of bf16 values are exact in fp32, the sums are fp32),
    at fp32's speed. Only the summation order differs from torch's bf16 kernel (about 1 output in 5,000
    lands one bf16 step away)."""
    if x.dtype == weight.dtype == torch.bfloat16 and BF16_IN_FP32 and x.device.type == "cpu":
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (HF names) through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # HF's order: normalise in fp32, cast back, then scale. One fused call when all is fp32.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed in fp32 (as HF does) then cast to the activation dtype."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # (..., D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (..., D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # HF's rotate_half


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: tuple[Tensor, Tensor] | None, meta: AttnMeta | None,
                prefix_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(output, this call's keys and values); `prefix_kv` [1, nkv, P, hd]: a prefix every row shares,
        computed once (Qwen2Model), whose keys the rows see before their own."""
        if kv_cache is not None:
            return self._forward_paged(x, cos, sin, kv_cache, meta), None
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]                                        # (B, 1, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv = (k, v)
        if prefix_kv is not None:                                                    # (B, nkv, P + T, hd)
            k, v = (torch.cat([p.expand(B, -1, -1, -1), t], dim=2) for p, t in zip(prefix_kv, kv))
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), kv

    def _forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor,
                       kv_cache: tuple[Tensor, Tensor], meta: AttnMeta) -> Tensor:
        N, H, Hkv, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim  # N packed tokens
        if x.is_cuda:  # CUDA graphs read the parameters themselves, never a cached copy
            q = self.q_proj(x).view(N, H, D)
            k = self.k_proj(x).view(N, Hkv, D)
            v = self.v_proj(x).view(N, Hkv, D)
            cos, sin = cos[:, None], sin[:, None]                        # (N, 1, hd)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:  # one product for q, k, v and one rotation for q and k: fewer ops per step
            w, b = fused_weights(self, (self.q_proj, self.k_proj, self.v_proj))
            qk, v = linear(x, w, b).split([(H + Hkv) * D, Hkv * D], -1)
            qk = apply_rotary(qk.view(N, H + Hkv, D), cos[:, None], sin[:, None])  # (N, H + Hkv, hd)
            q, k, v = qk[:, :H], qk[:, H:], v.view(N, Hkv, D)
        k_cache, v_cache = kv_cache[:2]   # then, with meta.rows, this layer's K and V rows
        attn_kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.rows is not None:
            y = attn_kernels.decode_attention_rows(q, k, v, *kv_cache[2:], meta.rows, meta.context_lens, self.scale,
                                                   page_size=k_cache.shape[1])
        elif meta.is_prefill:
            y = attn_kernels.prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                               meta.max_seqlen_q, meta.max_seqlen_k, self.scale,
                                               block_table=meta.block_table)
        else:
            y = attn_kernels.decode_attention(q, k_cache, v_cache, meta.block_table, meta.context_lens, self.scale)
        return self.o_proj(y.reshape(N, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # gate and up are not fused for sampling as q, k, v are: on a 2-core CPU at batch 32 that saved
        # 7 us of 70 at the tiny preset, was 4% slower at the 0.5B shape, and copies 2/3 of the MLP.
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fused_weights(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
    """The weights (and biases) of `linears` concatenated along the output dim, for sampling on a
    CPU: one product instead of several (q, k, v at the tiny preset: 27 us instead of 41).

    A copy cached on `owner` until `forget_fused_weights` (the sampler calls it when the weights
    change), so training and safetensors see only the separate HF-named parameters. Checking the
    parts' version counters on every call instead cost 20 us, all of the gain."""
    cache = owner.__dict__.get("_fused")
    if cache is None:
        weight = torch.cat([lin.weight.detach() for lin in linears])          # (sum of outs, in)
        has_bias = all(lin.bias is not None for lin in linears)
        bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
        cache = owner.__dict__["_fused"] = (weight, bias)
    return cache


def forget_fused_weights(model: nn.Module) -> None:
    """Drop every cached `fused_weights` copy; the next sampling step rebuilds them."""
    for m in model.modules():
        m.__dict__.pop("_fused", None)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, meta=None, prefix_kv=None):
        """(hidden, the attention's keys and values): see Qwen2Attention."""
        y, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, meta, prefix_kv)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Model(nn.Module):
    """The backbone: embeddings, decoder layers, final norm. Returns hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                kv_caches: list[tuple[Tensor, Tensor]] | None = None, attn_meta: AttnMeta | None = None) -> Tensor:
        if kv_caches is None and attention_mask is None and position_ids is None:
            prefix = shared_prefix(input_ids)
            if prefix >= MIN_SHARED_PREFIX:
                return self._forward_shared_prefix(input_ids, prefix)
        x = self.embed_tokens(input_ids)
        mask = None
        if kv_caches is None:
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
                else:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = padded_causal_mask(attention_mask)
        elif position_ids is None or attn_meta is None:
            raise ValueError("sampling with a KV cache needs position_ids and attn_meta")
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x, _ = self._layer(layer, x, cos, sin, mask, kv_caches[i] if kv_caches is not None else None, attn_meta)
        return self.norm(x)

    def _layer(self, layer, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _forward_shared_prefix(self, input_ids: Tensor, P: int) -> Tensor:
        """The training forward when every row begins with the same P tokens (a system prompt in SFT,
        a question's group in GRPO): the prefix runs once, as one row, and the rest of each row attends
        to its keys and values, then to its own. Exact: a causal position depends only on the tokens up
        to it. Rows are right-padded (no attention mask), so a padding position sees only real tokens."""
        B, T = input_ids.shape
        xp, x = self.embed_tokens(input_ids[:1, :P]), self.embed_tokens(input_ids[:, P:])    # (1, P, H), (B, T-P, H)
        cos, sin = self.rotary_emb(torch.arange(T, device=input_ids.device)[None], x.dtype)   # (1, T, hd)
        mask = torch.ones(T - P, T, dtype=torch.bool, device=x.device).tril(P)   # every prefix key, then causal
        for layer in self.layers:
            xp, kv = self._layer(layer, xp, cos[:, :P], sin[:, :P])
            x, _ = self._layer(layer, x, cos[:, P:], sin[:, P:], mask, None, None, kv)
        return self.norm(torch.cat([xp.expand(B, -1, -1), x], dim=1))


MIN_SHARED_PREFIX = 16   # shorter shared prefixes save less than the second pass per layer costs


def shared_prefix(input_ids: Tensor) -> int:
    """How many leading tokens every row of input_ids [B, T] shares, leaving at least one of each row's
    own (0 for a single row). Padding in it is fine: causal positions see nothing after them."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)                                     # [T]
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def padded_causal_mask(attention_mask: Tensor) -> Tensor:
    """Boolean SDPA mask (B, 1, T, T): causal, padded keys hidden. Each query always sees itself, so a
    padding query gets a finite (unused) output instead of a NaN softmax row."""
    T = attention_mask.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]                               # (B, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = on

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                kv_caches=None, attn_meta: AttnMeta | None = None, *, targets: Tensor | None = None,
                target_mask: Tensor | None = None, temperature: float = 1.0, with_entropy: bool = False,
                chunk_size: int = 1024):
        """Logits [B, T, V] (training) or [N, V] (packed sampling); with `targets [B, T]`, instead
        `(logp [B, T], entropy [B, T] | None)` through the chunked LM head (logprobs.py). Inside
        forward, because FSDP2 gathers the LM head's weight only around the root module's forward."""
        hidden = self.model(input_ids, attention_mask, position_ids, kv_caches, attn_meta)
        if targets is None:
            return self.lm_head(hidden)
        return token_logprobs(hidden, self.lm_head.weight, targets, temperature, chunk_size, with_entropy, target_mask)

    def init_weights(self, seed: int | None = None) -> None:
        """Random init as HF does (normal(0, initializer_range), zero biases, unit norms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
