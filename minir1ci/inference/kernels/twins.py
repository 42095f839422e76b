"""PyTorch twins of the Triton attention kernels (attention.py, same layouts): the references the
kernels are tested against, and the CPU sampler's path (so batched, not loops over sequences); and
the CPU decode over dense per-sequence rows, which has no kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def store_kvcache_torch(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter k/v [N, Hkv, D] into the paged caches, skipping slot < 0. A contiguous cache takes one
    index_copy_ over its [num_blocks * page_size] rows: half the cost of indexing by page and offset."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slots = slot_mapping.long()
    for src, cache in ((k, k_cache), (v, v_cache)):
        if cache.is_contiguous():
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, src.to(cache.dtype))
        else:
            cache[slots // cache.shape[1], slots % cache.shape[1]] = src.to(cache.dtype)


def _packed_rows(cu: Tensor, idx: Tensor) -> Tensor:
    """Packed positions of sequences `idx` (in that order), given cumulative lengths `cu` [B+1]."""
    lens = (cu[1:] - cu[:-1]).long()[idx]
    starts = torch.repeat_interleave(cu[:-1].long()[idx] - torch.cumsum(lens, 0) + lens, lens)
    return starts + torch.arange(int(lens.sum()), device=cu.device)


def prefill_attention_torch(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, scale: float,
                            block_table: Tensor | None = None) -> Tensor:
    """Causal attention in fp32 over padded blocks, one call per group of sequences of like query
    lengths: a prefill's first sequence of a group computes the shared prompt pages and the others only
    their tails, and padding all to the longest made 8x the query rows (longest first, a group grows
    while its padded rows stay under twice its real ones)."""
    B = cu_seqlens_q.numel() - 1
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    groups, cur, real = [], [], 0
    for i in sorted(range(B), key=lambda i: -len_q[i]):
        if cur and len_q[cur[0]] * (len(cur) + 1) > 2 * (real + len_q[i]):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += len_q[i]
    if len(groups) == 0:
        return _prefill_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, block_table)
    groups.append(cur)
    out = torch.empty_like(q)
    for g in groups:
        idx = torch.tensor(sorted(g), device=cu_seqlens_q.device)
        rows = _packed_rows(cu_seqlens_q, idx)
        sub_cu = [torch.zeros(len(g) + 1, dtype=torch.int32, device=cu.device) for cu in (cu_seqlens_q, cu_seqlens_k)]
        for cu, full in zip(sub_cu, (cu_seqlens_q, cu_seqlens_k)):
            cu[1:] = torch.cumsum((full[1:] - full[:-1])[idx], 0)
        if block_table is None:
            keys = _packed_rows(cu_seqlens_k, idx)
            out[rows] = _prefill_padded(q[rows], k[keys], v[keys], *sub_cu, scale, None)
        else:
            out[rows] = _prefill_padded(q[rows], k, v, *sub_cu, scale, block_table[idx])
    return out


def _prefill_padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, scale: float,
                    block_table: Tensor | None) -> Tensor:
    """Queries and keys (gathered from the pages with a `block_table`) scattered into padded
    [B, L, H, D] blocks, one SDPA call with padding and future keys hidden by one mask (2.4x faster
    than scores, mask and softmax written out, on a CPU), packed back."""
    B = cu_seqlens_q.numel() - 1
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[-2]
    if B == 0 or q.shape[0] == 0:
        return torch.empty_like(q)
    dev = q.device
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(dev).long()                # [B]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(dev).long()
    Lq, Lk = int(len_q.max()), max(int(len_k.max()), 1)
    # Row b, column j of the padded query block holds packed query cu_q[b] + j.
    qpos = torch.arange(Lq, device=dev)
    q_valid = qpos[None, :] < len_q[:, None]                                   # [B, Lq]
    q_idx = (cu_seqlens_q[:-1].to(dev).long()[:, None] + qpos[None, :]).clamp(max=q.shape[0] - 1)
    qb = q.float()[q_idx]                                                      # [B, Lq, Hq, D]
    kpos = torch.arange(Lk, device=dev)
    if block_table is None:
        k_idx = (cu_seqlens_k[:-1].to(dev).long()[:, None] + kpos[None, :]).clamp(max=k.shape[0] - 1)
        kb, vb = k.float()[k_idx], v.float()[k_idx]                            # [B, Lk, Hkv, D]
    else:
        pages = block_table[:, :-(-Lk // k.shape[1])].long()                     # [B, pages holding Lk keys]
        kb, vb = (t[pages].flatten(1, 2)[:, :Lk].float() for t in (k, v))      # [B, Lk, Hkv, D]
    # Slots past a sequence's keys are zeroed: stale ones may hold NaN, and a masked score or a zero
    # probability does not hide a NaN (NaN + -inf, 0 * NaN).
    k_valid = (kpos[None, :] < len_k[:, None])[:, :, None, None]               # [B, Lk, 1, 1]
    kb, vb = kb.masked_fill(~k_valid, 0.0), vb.masked_fill(~k_valid, 0.0)
    # Bottom-right causal: query j sees keys up to len_k - len_q + j. A padding query sees every key
    # (a finite row, dropped at the end: a row with no key would be NaN).
    last_key = (len_k - len_q)[:, None] + qpos[None, :]                        # [B, Lq]
    visible = (kpos[None, None, :] <= last_key[:, :, None]) | ~q_valid[:, :, None]   # [B, Lq, Lk]
    # The G = Hq / Hkv query heads of a KV head are G * Lq query rows of that head: no GQA expansion.
    G = Hq // Hkv
    qh = qb.view(B, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Lq, D)
    out = F.scaled_dot_product_attention(qh, kb.transpose(1, 2), vb.transpose(1, 2),
                                         attn_mask=visible.repeat(1, G, 1)[:, None], scale=scale)
    out = out.view(B, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(B, Lq, Hq, D)
    return out[q_valid].to(q.dtype)


def decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                           context_lens: Tensor, scale: float, num_splits: int | None = None) -> Tensor:
    """Each sequence's one query over its cached keys: pages gathered into [B, K, Hkv, D] (K = the
    longest context in whole pages), slots past each context zeroed (stale slots may hold NaN, and
    0 * NaN would leak through the mask) by row index, which costs less than a masked_fill."""
    B, Hq, D = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    if B == 0:
        return torch.empty_like(q)
    n_pages = max(-(-int(context_lens.max()) // page_size), 1)
    pages = block_table[:, :n_pages].reshape(-1).long()                        # [B * P]
    K = n_pages * page_size
    k, v = (c.index_select(0, pages).view(B * K, Hkv * D) for c in (k_cache, v_cache))  # fresh copies
    visible = torch.arange(K, device=q.device)[None, :] < context_lens[:, None].to(q.device)  # [B, K]
    stale = (~visible).view(-1).nonzero().squeeze(1)
    k.index_fill_(0, stale, 0.0)
    v.index_fill_(0, stale, 0.0)
    k, v = (t.view(B, K, Hkv, D).transpose(1, 2) for t in (k, v))              # [B, Hkv, K, D]
    # The G = Hq / Hkv query heads that share a KV head are G query rows of that head: no GQA
    # expansion (a quarter less time than enable_gqa here). CPU SDPA accumulates in fp32 for bf16.
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, D)
    if q.dtype == torch.float32 == k.dtype:   # two batched products and a softmax: half SDPA's time here
        kf, vf = (t.reshape(B * Hkv, K, D) for t in (k, v))                    # contiguous per head (a copy)
        s = torch.bmm(qg.reshape(B * Hkv, G, D), kf.transpose(1, 2)).view(B, Hkv, G, K)
        s = s.mul_(scale).masked_fill_(~visible[:, None, None, :], float("-inf"))
        out = torch.bmm(s.softmax(-1).view(B * Hkv, G, K), vf).view(B, Hkv, G, D)
    else:
        out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=visible[:, None, None, :],
                                             scale=scale)                      # [B, Hkv, G, D]
    out = torch.where(context_lens.to(q.device)[:, None, None, None] > 0, out, 0.0)  # a context of 0 gives zeros
    return out.reshape(B, Hq, D)


def decode_attention_rows(q: Tensor, k: Tensor, v: Tensor, k_rows: Tensor, v_rows: Tensor, rows: Tensor,
                          context_lens: Tensor, scale: float, page_size: int) -> Tensor:
    """The CPU decode (no Triton twin): each sequence's keys as one dense row of k_rows/v_rows
    [R, Hkv, L, D] (engine/kv_rows.py keeps the batch in rows [0, B)), its new k/v [B, Hkv, D] written
    at position context_len - 1. The products read rows [0, max row] in place; a row outside the batch
    gets a zero query and every key, and its output is dropped. Keys are counted in whole pages, as
    decode_attention_torch does: the same products, which gave the same fp32 bits in every test and
    rollout compared (a BLAS may still sum a row another way at another stride)."""
    B, Hq, D = q.shape
    Hkv = k_rows.shape[1]
    G = Hq // Hkv
    pos = context_lens.long() - 1
    k_rows[rows, :, pos] = k.to(k_rows.dtype)
    v_rows[rows, :, pos] = v.to(v_rows.dtype)
    n, K = int(rows.max()) + 1, -(-int(context_lens.max()) // page_size) * page_size
    qn = q.new_zeros(n, Hkv, G, D)
    qn[rows] = q.view(B, Hkv, G, D)
    lens = torch.full((n,), K, dtype=torch.long)
    lens[rows] = context_lens.long()
    kv = [t[:n, :, :K] for t in (k_rows, v_rows)]                               # [n, Hkv, K, D] views
    visible = torch.arange(K)[None, :] < lens[:, None]                          # [n, K]
    if q.dtype == torch.float32 == k_rows.dtype:   # as decode_attention_torch: two products and a softmax
        kf, vf = (t.reshape(n * Hkv, K, D) for t in kv)                         # views
        s = torch.bmm(qn.reshape(n * Hkv, G, D), kf.transpose(1, 2)).view(n, Hkv, G, K)
        s = s.mul_(scale).masked_fill_(~visible[:, None, None, :], float("-inf"))
        out = torch.bmm(s.softmax(-1).view(n * Hkv, G, K), vf).view(n, Hkv, G, D)
    else:
        out = F.scaled_dot_product_attention(qn, *(t.to(q.dtype) for t in kv), attn_mask=visible[:, None, None, :],
                                             scale=scale)                      # [n, Hkv, G, D]
    return out[rows].reshape(B, Hq, D)
