"""Attention for the sampler: paged KV-cache writes, varlen causal prefill and split-K decode.

Each public function dispatches once: Triton for CUDA tensors, else its PyTorch twin (twins.py, the
reference); `set_backend` overrides. CPU tests run the kernels under `TRITON_INTERPRET=1`, set before
this module is imported. Layouts as in DEVELOPERS.md: q [Nq | B, Hq, D], caches [num_blocks,
page_size, Hkv, D], block_table [B, P] int32. Query head h reads KV head h // (Hq // Hkv), and one
program takes all query heads of a KV head, so each K/V tile is loaded once per group. Softmax runs
in base 2, accumulation in fp32; outputs take the input dtype.

Simplified against FlashAttention-2 / vLLM: no sliding window, ALiBi, soft-capping or fp8 caches; the
causal mask is computed on every key tile; fixed block sizes per dtype; a heuristic split count.
"""
from __future__ import annotations  # kernel annotations stay strings, so this imports without Triton

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel for this platform (e.g. macOS): only the twins run
    triton = tl = None

from .twins import (decode_attention_rows, decode_attention_torch, prefill_attention_torch,  # noqa: F401 (public)
                    store_kvcache_torch)

_jit = triton.jit if triton is not None else (lambda fn: fn)
_LOG2E = 1.4426950408889634
_BACKEND = "auto"


def set_backend(name: str) -> None:
    """'auto' (Triton for CUDA tensors, PyTorch otherwise), 'triton' or 'torch' for every call."""
    global _BACKEND
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {name!r}")
    _BACKEND = name


def _use_triton(x: Tensor) -> bool:
    """The one dispatch point of the three public functions."""
    if _BACKEND == "torch" or (_BACKEND == "auto" and not x.is_cuda):
        return False
    if triton is None:
        if _BACKEND == "triton":
            raise RuntimeError("backend 'triton' requested but Triton is not installed")
        return False
    # triton.jit picks the interpreter when a kernel is decorated (TRITON_INTERPRET=1 at import).
    if not x.is_cuda and type(_prefill_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before importing "
                           "minir1ci.inference.kernels.attention")
    return True


def _tiles(x: Tensor) -> tuple[int, int, int]:
    """(query rows per prefill program, keys per prefill step, keys per decode step). Tiny under
    the interpreter so short test sequences cross tile borders; fp32 gets smaller tiles (ieee dots
    need registers). The 16-bit sizes were the fastest of a small sweep on an H200 (4 warps)."""
    if not x.is_cuda:
        return 16, 16, 16  # tl.dot needs every dimension >= 16 on GPUs (the interpreter does not check)
    if x.dtype == torch.float32:
        return 64, 32, 32
    return 128, 64, 128


def _dot_precision(x: Tensor) -> str:
    # fp32 tl.dot defaults to TF32 on GPUs (10-bit mantissa); ieee keeps fp32 results next to the
    # twin. For fp16/bf16 the setting is ignored and the tensor cores run natively.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check_last_dim_contiguous(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        assert t.stride(-1) == 1, f"{name} must have unit stride in its last dimension, got {t.stride()}"


@_jit
def _store_kvcache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          stride_t, stride_h, stride_cb, stride_cs, stride_ch, num_kv_heads,
                          PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0)                                       # one program per new token
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:                                                   # padding token: nothing to write
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < num_kv_heads)[:, None]
    src = token.to(tl.int64) * stride_t + h[:, None] * stride_h + d[None, :]             # [BH, D]
    dst = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cs + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


def store_kvcache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write new keys/values [N, Hkv, D] into [num_blocks, page_size, Hkv, D] caches, in place."""
    N, Hkv, D = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.shape[2:] == (Hkv, D)
    assert slot_mapping.shape == (N,) and not slot_mapping.is_floating_point()
    if not _use_triton(k):
        return store_kvcache_torch(k, v, k_cache, v_cache, slot_mapping)
    _check_last_dim_contiguous(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    assert k.stride() == v.stride() and k_cache.stride() == v_cache.stride(), "k/v layouts must match"
    assert k.dtype == k_cache.dtype == v.dtype == v_cache.dtype
    assert D & (D - 1) == 0, f"head_dim must be a power of two, got {D}"
    if N == 0:
        return
    _store_kvcache_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), Hkv,
        PAGE_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(Hkv), HEAD_DIM=D)


@_jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, table_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kt, stride_kh, stride_table, scale_log2,
                    GROUP: tl.constexpr, POS_PER_BLOCK: tl.constexpr, PAGED: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Grid: (query blocks, sequences, KV heads). Rows of the Q tile are (position, head-in-group)
    # pairs, position-major: row r is position r // GROUP of this block, query head
    # kv_head * GROUP + r % GROUP. POS_PER_BLOCK * GROUP <= BLOCK_R rows are real.
    q_block, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    len_k = tl.load(cu_k_ptr + seq + 1) - k_start
    first_pos = q_block * POS_PER_BLOCK
    if first_pos >= len_q:
        return

    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    pos = first_pos + r // GROUP                                            # [R] position in sequence
    head = kv_head * GROUP + r % GROUP                                      # [R] query head
    row_ok = (r < POS_PER_BLOCK * GROUP) & (pos < len_q)
    q_off = (q_start + pos).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)             # [R, D]

    # Bottom-right causal: position j of Lq queries sees keys 0 .. Lk - Lq + j.
    last_key = len_k - len_q + pos                                          # [R]
    last_pos = tl.minimum(first_pos + POS_PER_BLOCK, len_q) - 1
    hi = tl.minimum(len_k, len_k - len_q + last_pos + 1)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)                       # running max (log2 units)
    l = tl.zeros([BLOCK_R], tl.float32)                                     # running sum of exp
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)                                      # [N] key index
        if PAGED:  # key n lives at offset n % PAGE_SIZE of the sequence's (n // PAGE_SIZE)-th page
            page = tl.load(table_ptr + seq * stride_table + n // PAGE_SIZE, mask=n < len_k, other=0)
            kv_row = page.to(tl.int64) * stride_kb + (n % PAGE_SIZE) * stride_kt
        else:
            kv_row = (k_start + n).to(tl.int64) * stride_kt
        kv_off = kv_row[:, None] + kv_head * stride_kh + d[None, :]        # [N, D]
        k = tl.load(k_ptr + kv_off, mask=(n < len_k)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2   # [R, N]
        visible = (n[None, :] <= last_key[:, None]) & (n < len_k)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)              # fully masked rows: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off, mask=(n < len_k)[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_off = (q_start + pos).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      block_table: Tensor | None = None) -> Tensor:
    """Variable-length causal attention q [Nq, Hq, D] -> [Nq, Hq, D], bottom-right aligned.

    k/v are packed [Nk, Hkv, D] (`block_table` None) or the paged caches, from which sequence i
    reads the first `cu_seqlens_k[i+1] - cu_seqlens_k[i]` slots of its pages (a cached prefix
    followed by the tokens just stored)."""
    Nq, Hq, D = q.shape
    Hkv = k.shape[-2]
    assert Hq % Hkv == 0 and k.shape == v.shape and k.shape[-1] == D
    assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
    if not _use_triton(q):
        return prefill_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       scale, block_table)
    _check_last_dim_contiguous(q=q, k=k, v=v)
    assert k.stride() == v.stride() and q.dtype == k.dtype == v.dtype
    assert D & (D - 1) == 0 and D >= 16, f"head_dim must be a power of two >= 16, got {D}"
    paged = block_table is not None
    if paged:
        assert k.dim() == 4 and block_table.dim() == 2 and block_table.shape[0] == cu_seqlens_q.shape[0] - 1
        _check_last_dim_contiguous(block_table=block_table)
        stride_kb, stride_kt, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        page_size, table, stride_table = k.shape[1], block_table, block_table.stride(0)
    else:
        assert k.dim() == 3
        stride_kb, (stride_kt, stride_kh) = 0, k.stride()[:2]
        page_size, table, stride_table = 1, cu_seqlens_k, 0  # table unused when not paged
    group = Hq // Hkv
    block_r, block_n, _ = _tiles(q)
    block_r = max(block_r, triton.next_power_of_2(group))
    pos_per_block = block_r // group
    out = torch.empty_like(q)
    batch = cu_seqlens_q.shape[0] - 1
    if Nq == 0 or batch == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, pos_per_block), batch, Hkv)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        stride_kb, stride_kt, stride_kh, stride_table, scale * _LOG2E,
        GROUP=group, POS_PER_BLOCK=pos_per_block, PAGED=paged, PAGE_SIZE=page_size,
        BLOCK_R=block_r, BLOCK_N=block_n, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q))
    return out


@_jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_table,
                         num_q_heads, num_splits, split_len, scale_log2,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Grid: (sequences, KV heads, splits). The GROUP query heads of one KV head are the rows of a
    # [BLOCK_H, D] tile (padded to a power of two >= 16 and masked), so each K/V tile is read once.
    # Writes the unnormalised partial output, max and sum of keys [start, end) of this split.
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    len_k = tl.load(ctx_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, len_k)                              # start >= end: empty split

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + h                                              # [H] query head
    head_ok = h < GROUP
    q_off = seq.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=head_ok[:, None], other=0.0)           # [H, D]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)                                      # [N] key index
        key_ok = n < end
        page = tl.load(table_ptr + seq * stride_table + n // PAGE_SIZE, mask=key_ok, other=0)
        kv_off = (page.to(tl.int64) * stride_kb + (n % PAGE_SIZE) * stride_kt)[:, None] \
            + kv_head * stride_kh + d[None, :]                              # [N, D]
        k = tl.load(k_cache_ptr + kv_off, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2   # [H, N]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # Partial buffers are contiguous: o [B, Hq, S, D], m and l [B, Hq, S].
    row = (seq * num_q_heads + head) * num_splits + split                  # [H]
    tl.store(part_m_ptr + row, m, mask=head_ok)
    tl.store(part_l_ptr + row, l, mask=head_ok)
    tl.store(part_o_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc, mask=head_ok[:, None])


@_jit
def _decode_reduce_kernel(part_o_ptr, part_m_ptr, part_l_ptr, o_ptr, stride_ob, stride_oh, num_q_heads, num_splits,
                          BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Grid: (sequences, query heads). out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
    seq, head = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    split_ok = s < num_splits
    row = (seq * num_q_heads + head) * num_splits + s                     # [S]
    m = tl.load(part_m_ptr + row, mask=split_ok, other=float("-inf"))     # empty splits hold -inf
    l = tl.load(part_l_ptr + row, mask=split_ok, other=0.0)
    acc = tl.load(part_o_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))         # [S], 0 for empty splits
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)  # [D]
    tl.store(o_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def _default_num_splits(x: Tensor, batch: int, kv_heads: int, max_keys: int, block_n: int) -> int:
    """Enough programs to fill the GPU about twice, never more splits than key tiles. Uses the
    table width, not the real context lengths (reading those would sync with the GPU)."""
    programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(triton.cdiv(programs, batch * kv_heads), triton.cdiv(max_keys, block_n)))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_lens: Tensor,
                     scale: float, num_splits: int | None = None) -> Tensor:
    """One new query per sequence, q [B, Hq, D] -> [B, Hq, D], over the paged cache. Split-K: the
    keys are cut into `num_splits` chunks handled by separate programs, then combined."""
    B, Hq, D = q.shape
    Hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    assert Hq % Hkv == 0 and k_cache.shape == v_cache.shape and k_cache.shape[3] == D
    assert block_table.dim() == 2 and block_table.shape[0] == B and context_lens.shape == (B,)
    if not _use_triton(q):
        return decode_attention_torch(q, k_cache, v_cache, block_table, context_lens, scale, num_splits)
    _check_last_dim_contiguous(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table)
    assert k_cache.stride() == v_cache.stride() and q.dtype == k_cache.dtype == v_cache.dtype
    assert D & (D - 1) == 0 and D >= 16, f"head_dim must be a power of two >= 16, got {D}"
    group = Hq // Hkv
    _, _, block_n = _tiles(q)
    max_keys = block_table.shape[1] * page_size
    if num_splits is None:
        num_splits = _default_num_splits(q, B, Hkv, max_keys, block_n)
    split_len = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n   # whole key tiles
    part_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty_like(q)
    if B == 0:
        return out
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_table, context_lens.contiguous(), part_o, part_m, part_l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        Hq, num_splits, split_len, scale * _LOG2E,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), PAGE_SIZE=page_size,
        BLOCK_N=block_n, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q))
    _decode_reduce_kernel[(B, Hq)](
        part_o, part_m, part_l, out, out.stride(0), out.stride(1), Hq, num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=D)
    return out

