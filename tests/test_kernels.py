"""Attention kernels against their PyTorch twins, and the twins against plain SDPA.

Without CUDA the Triton kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes stay tiny; the interpreter tiles are 16 rows x 16 keys, and the
lengths below cross those tiles and the page borders. bf16 is left to tests/test_kernels_gpu.py:
the interpreter stores bf16 as raw uint16 and computes garbage with it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from minir1ci.inference.kernels import attention as A

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture
def triton_backend():
    A.set_backend("triton")
    yield
    A.set_backend("auto")


def naive_attention(q, k, v, scale, causal):
    """Dense SDPA on one sequence, q [Lq, Hq, D], k/v [Lk, Hkv, D]; causal is bottom-right."""
    group = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)                                           # [Hq, Lq, D]
    kh = k.float().repeat_interleave(group, 1).transpose(0, 1)
    vh = v.float().repeat_interleave(group, 1).transpose(0, 1)
    Lq, Lk = q.shape[0], k.shape[0]
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq) if causal else None
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


def rand(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def to_paged(keys, values, page_size, gen, spare_pages=3, spare_width=2):
    """Scatter per-sequence keys/values [L, H, D] into shuffled pages of fresh caches.
    Unused slots and table entries hold / point at NaN pages, so reading them shows."""
    H, D = keys[0].shape[1:]
    n_pages = [math.ceil(len(k) / page_size) for k in keys]
    total = sum(n_pages) + spare_pages
    order = torch.randperm(total, generator=gen).tolist()                   # shuffled page ids
    k_cache = torch.full((total, page_size, H, D), float("nan"), dtype=keys[0].dtype, device=DEVICE)
    v_cache = k_cache.clone()
    table = torch.full((len(keys), max(n_pages) + spare_width), order[-1], dtype=torch.int32)
    for i, (k, v) in enumerate(zip(keys, values)):
        for j in range(n_pages[i]):
            page = order.pop(0)
            table[i, j] = page
            k_cache[page, :len(k[j * page_size:(j + 1) * page_size])] = k[j * page_size:(j + 1) * page_size]
            v_cache[page, :len(v[j * page_size:(j + 1) * page_size])] = v[j * page_size:(j + 1) * page_size]
    return k_cache, v_cache, table.to(DEVICE)


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)


def make_prefill(lens_q, lens_k, hq, hkv, d, dtype, paged, page_size, seed=0):
    """Inputs for prefill_attention plus the naive reference output."""
    gen = torch.Generator().manual_seed(seed)
    scale = d ** -0.5
    qs = [rand((lq, hq, d), dtype, gen) for lq in lens_q]
    ks = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    vs = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    expected = torch.cat([naive_attention(q, k, v, scale, causal=True) for q, k, v in zip(qs, ks, vs)])
    if paged:
        k, v, table = to_paged(ks, vs, page_size, gen)
    else:
        k, v, table = torch.cat(ks), torch.cat(vs), None
    args = (torch.cat(qs), k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), scale)
    return args, table, expected


def make_decode(lens_k, hq, hkv, d, dtype, page_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = d ** -0.5
    q = rand((len(lens_k), hq, d), dtype, gen)
    ks = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    vs = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    expected = torch.cat([naive_attention(q[i:i + 1], k, v, scale, causal=False) for i, (k, v) in enumerate(zip(ks, vs))])
    k_cache, v_cache, table = to_paged(ks, vs, page_size, gen)
    context_lens = torch.tensor(lens_k, dtype=torch.int32, device=DEVICE)
    return (q, k_cache, v_cache, table, context_lens, scale), expected


# (lens_q, lens_k, Hq, Hkv, D, dtype, paged, page_size); lens_k > lens_q is a cached prefix.
PREFILL_CASES = {
    "mha_packed_d64": ([5, 17, 33], [5, 17, 33], 2, 2, 64, torch.float32, False, 0),
    "gqa2_packed_d128": ([1, 16, 20], [1, 16, 20], 4, 2, 128, torch.float32, False, 0),
    "gqa7_packed": ([3, 9], [3, 9], 7, 1, 64, torch.float32, False, 0),
    "gqa2_paged_prefix": ([4, 17], [13, 40], 4, 2, 64, torch.float32, True, 8),
    "gqa7_paged_prefix_d128": ([6], [37], 7, 1, 128, torch.float32, True, 32),
    "gqa2_paged_fp16": ([7, 18], [7, 30], 4, 2, 64, torch.float16, True, 4),
    # query lengths far apart (a group's first sample and its tails): the twin splits them into groups
    "gqa2_paged_mixed_lengths": ([40, 2, 3, 1, 35, 2], [40, 50, 3, 20, 35, 9], 4, 2, 64, torch.float32, True, 8),
    "gqa2_packed_mixed_lengths": ([1, 30, 2, 28], [1, 30, 2, 28], 4, 2, 32, torch.float32, False, 0),
}
# (lens_k, Hq, Hkv, D, dtype, page_size, num_splits)
DECODE_CASES = {
    "mha_d64_auto_splits": ([1, 17, 40], 2, 2, 64, torch.float32, 16, None),
    "gqa2_d128_three_splits": ([5, 33], 4, 2, 128, torch.float32, 4, 3),
    "gqa7_many_empty_splits": ([20, 3], 7, 1, 64, torch.float32, 8, 4),
    "gqa2_fp16_pages_of_32": ([50, 9], 4, 2, 64, torch.float16, 32, 2),
}


@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
def test_prefill_twin_matches_naive_sdpa(case):
    lens_q, lens_k, hq, hkv, d, dtype, paged, page_size = case
    args, table, expected = make_prefill(lens_q, lens_k, hq, hkv, d, dtype, paged, page_size)
    out = A.prefill_attention_torch(*args, block_table=table)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
def test_prefill_triton_matches_twin(case, triton_backend):
    lens_q, lens_k, hq, hkv, d, dtype, paged, page_size = case
    args, table, _ = make_prefill(lens_q, lens_k, hq, hkv, d, dtype, paged, page_size)
    out = A.prefill_attention(*args, block_table=table)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, A.prefill_attention_torch(*args, block_table=table), **TOL[dtype])


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_twin_matches_naive_sdpa(case):
    lens_k, hq, hkv, d, dtype, page_size, _ = case
    args, expected = make_decode(lens_k, hq, hkv, d, dtype, page_size)
    torch.testing.assert_close(A.decode_attention_torch(*args).float(), expected, **TOL[dtype])


def test_decode_twin_in_bf16_matches_naive_sdpa_and_keeps_the_dtype():
    """The CPU sampler's bf16 decode: no fp32 copy of the gathered cache, output in bf16, within
    bf16 rounding of the fp32 reference (grouped heads, stale NaN slots behind the context)."""
    args, expected = make_decode([50, 9, 23], 14, 2, 64, torch.bfloat16, 16)
    out = A.decode_attention_torch(*args)
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def rows_from_pages(k_cache, v_cache, table, lens, rows, capacity, gen):
    """Dense rows [capacity, Hkv, L, D] holding sequence i's first lens[i] - 1 keys in row rows[i] (its
    last one is the step's new token), and random finite values everywhere else (an earlier owner's)."""
    page_size, hkv, d = k_cache.shape[1:]
    length = max(math.ceil(int(n) / page_size) * page_size for n in lens) + 16
    out = []
    for cache in (k_cache, v_cache):
        dense = rand((capacity, hkv, length, d), cache.dtype, gen)
        for i, n in enumerate(lens.tolist()):
            keys = cache[table[i].long()].flatten(0, 1)[:n - 1]                # [n - 1, Hkv, D]
            dense[rows[i], :, :n - 1] = keys.transpose(0, 1)
        out.append(dense)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[2, 0, 1], [4, 0, 2], [1, 0, 3, 2]], ids=["permuted", "gaps", "all"])
def test_decode_over_dense_rows_equals_the_paged_twin(dtype, rows):
    """The CPU decode over dense rows (engine/kv_rows.py) writes the new key at context_len - 1 and gives
    the paged twin's bits in fp32 (same products over whole pages), whatever the rows' order, with rows
    outside the batch (gaps) holding anything, NaN included."""
    if DEVICE != "cpu":
        pytest.skip("a CPU path")
    gen = torch.Generator().manual_seed(5)
    lens_k = [33, 5, 20, 16][:len(rows)]
    (q, k_cache, v_cache, table, lens, scale), _ = make_decode(lens_k, 4, 2, 32, dtype, 8)
    k_new, v_new = rand((len(rows), 2, 32), dtype, gen), rand((len(rows), 2, 32), dtype, gen)
    rows_t = torch.tensor(rows)
    k_rows, v_rows = rows_from_pages(k_cache, v_cache, table, lens, rows_t, max(rows) + 2, gen)
    for r in set(range(max(rows) + 1)) - set(rows):
        k_rows[r], v_rows[r] = float("nan"), float("nan")
    out = A.decode_attention_rows(q, k_new, v_new, k_rows, v_rows, rows_t, lens, scale, page_size=8)
    slots = torch.stack([table[i, (n - 1) // 8].long() * 8 + (n - 1) % 8 for i, n in enumerate(lens.tolist())])
    A.store_kvcache_torch(k_new, v_new, k_cache, v_cache, slots)
    expected = A.decode_attention_torch(q, k_cache, v_cache, table, lens, scale)
    assert out.dtype == dtype and not out.isnan().any()
    if dtype == torch.float32:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    for i, n in enumerate(lens.tolist()):                                  # the new token is in its row
        assert torch.equal(k_rows[rows[i], :, n - 1], k_new[i]) and torch.equal(v_rows[rows[i], :, n - 1], v_new[i])


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_triton_matches_twin(case, triton_backend):
    lens_k, hq, hkv, d, dtype, page_size, num_splits = case
    args, _ = make_decode(lens_k, hq, hkv, d, dtype, page_size)
    out = A.decode_attention(*args, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, A.decode_attention_torch(*args), **TOL[dtype])


def test_decode_matches_last_row_of_prefill(triton_backend):
    # Decoding the last token over the cache = the last query row of a full causal prefill.
    (q, k, v, cu_q, cu_k, max_q, max_k, scale), table, _ = make_prefill([21], [21], 4, 2, 64, torch.float32, True, 8)
    full = A.prefill_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, block_table=table)
    last = A.decode_attention(q[-1:], k, v, table[:1], cu_k[1:], scale, num_splits=2)
    torch.testing.assert_close(last, full[-1:], **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_store_kvcache_writes_slots_and_skips_negative(backend):
    gen = torch.Generator().manual_seed(1)
    k, v = rand((6, 2, 64), torch.float32, gen), rand((6, 2, 64), torch.float32, gen)
    slots = torch.tensor([9, -1, 0, 22, -1, 5], dtype=torch.int64, device=DEVICE)   # page size 4
    k_cache = torch.zeros(6, 4, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    A.set_backend(backend)
    try:
        A.store_kvcache(k, v, k_cache, v_cache, slots)
    finally:
        A.set_backend("auto")
    expected_k, expected_v = torch.zeros(24, 2, 64, device=DEVICE), torch.zeros(24, 2, 64, device=DEVICE)
    for i, s in enumerate(slots.tolist()):                                 # hand-written scatter
        if s >= 0:
            expected_k[s], expected_v[s] = k[i], v[i]
    assert torch.equal(k_cache.flatten(0, 1), expected_k) and torch.equal(v_cache.flatten(0, 1), expected_v)


def test_prefill_reads_prefix_written_by_store_kvcache(triton_backend):
    # The model's flow: store the chunk's K/V after a cached prefix, then prefill over the cache.
    gen = torch.Generator().manual_seed(2)
    prefix, new, page_size = 11, 6, 4
    k_all, v_all = rand((prefix + new, 2, 64), torch.float32, gen), rand((prefix + new, 2, 64), torch.float32, gen)
    q = rand((new, 4, 64), torch.float32, gen)
    pages = torch.tensor([[3, 0, 4, 1, 2]], dtype=torch.int32, device=DEVICE)   # 5 pages of 4 >= 17 keys
    slots = torch.tensor([pages[0, i // page_size].item() * page_size + i % page_size
                          for i in range(prefix + new)], dtype=torch.int64, device=DEVICE)
    k_cache = torch.zeros(5, page_size, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    A.store_kvcache(k_all[:prefix], v_all[:prefix], k_cache, v_cache, slots[:prefix])
    A.store_kvcache(k_all[prefix:], v_all[prefix:], k_cache, v_cache, slots[prefix:])
    out = A.prefill_attention(q, k_cache, v_cache, cu([new]), cu([prefix + new]), new, prefix + new, 0.125,
                              block_table=pages)
    expected = naive_attention(q, k_all, v_all, 0.125, causal=True)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_auto_backend_uses_twin_for_cpu_tensors():
    args, table, _ = make_prefill([3], [3], 2, 1, 16, torch.float32, False, 0)
    if DEVICE == "cpu":
        assert torch.equal(A.prefill_attention(*args), A.prefill_attention_torch(*args))
    with pytest.raises(ValueError):
        A.set_backend("cuda")


def test_decode_sequence_without_keys_gives_zeros(triton_backend):
    # Batches padded for CUDA graphs carry sequences with context length 0: zeros, not NaN.
    args, _ = make_decode([9, 0, 4], 4, 2, 64, torch.float32, 8)
    out = A.decode_attention(*args, num_splits=2)
    torch.testing.assert_close(out, A.decode_attention_torch(*args), **TOL[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_negative", [True, False])
def test_store_kvcache_twin_both_layouts(contiguous, with_negative):
    # The twin writes a contiguous cache through a flat row view and any other by page/offset;
    # both must equal a hand-written scatter, with and without skipped (-1) slots.
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(5, 2, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    slots = torch.tensor([7, -1 if with_negative else 1, 0, 18, 3])
    if contiguous:
        k_cache, v_cache = torch.zeros(5, 4, 2, 16), torch.zeros(5, 4, 2, 16)
    else:  # pages interleaved with unused ones: a strided view of a larger buffer
        k_cache, v_cache = torch.zeros(10, 4, 2, 16)[::2], torch.zeros(10, 4, 2, 16)[::2]
        assert not k_cache.is_contiguous()
    A.store_kvcache_torch(k, v, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros(20, 2, 16), torch.zeros(20, 2, 16)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expected_k[s], expected_v[s] = k[i], v[i]
    assert torch.equal(k_cache.reshape(20, 2, 16), expected_k) and torch.equal(v_cache.reshape(20, 2, 16), expected_v)
