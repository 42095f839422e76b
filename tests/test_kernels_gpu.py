"""Compiled Triton attention kernels on CUDA against their PyTorch twins, at realistic sizes.

Self-contained (run with `make test-gpu` or `pytest -m gpu tests/test_kernels_gpu.py`); skipped
without CUDA. fp32 runs with ieee dots, so it must match the fp32 twin tightly; fp16/bf16 round the
softmax probabilities to the input dtype before the P @ V dot, hence looser tolerances. The CPU
twins themselves are checked against SDPA in tests/test_kernels.py.
"""
import math

import pytest
import torch

from minir1ci.inference.kernels import attention as A

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def exact_fp32_twin():
    # The twin must not use TF32 either, or the fp32 comparison measures the twin's error.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    A.set_backend("auto")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def rand(shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


def to_paged(keys, values, page_size, gen, spare_pages=4):
    """Per-sequence keys/values [L, H, D] scattered into shuffled pages; unused slots are NaN."""
    H, D = keys[0].shape[1:]
    n_pages = [math.ceil(len(k) / page_size) for k in keys]
    total = sum(n_pages) + spare_pages
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0)).tolist()
    k_cache = torch.full((total, page_size, H, D), float("nan"), dtype=keys[0].dtype, device="cuda")
    v_cache = k_cache.clone()
    table = torch.full((len(keys), max(n_pages) + 1), order[-1], dtype=torch.int32)
    for i, (k, v) in enumerate(zip(keys, values)):
        for j in range(n_pages[i]):
            page, rows = order.pop(0), slice(j * page_size, (j + 1) * page_size)
            table[i, j] = page
            k_cache[page, :len(k[rows])], v_cache[page, :len(v[rows])] = k[rows], v[rows]
    return k_cache, v_cache, table.cuda()


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()


# (lens_q, lens_k, Hq, Hkv, D, page_size or 0 for packed keys)
PREFILL_CASES = {
    "qwen05b_packed": ([1, 100, 257, 1000], [1, 100, 257, 1000], 14, 2, 64, 0),
    "mha_d128_packed": ([64, 129, 700], [64, 129, 700], 8, 8, 128, 0),
    "gqa2_d128_paged16_prefix": ([37, 300, 1], [500, 300, 1200], 16, 8, 128, 16),
    "gqa7_d64_paged256_prefix": ([513, 20], [1500, 2049], 14, 2, 64, 256),
}
# (lens_k, Hq, Hkv, D, page_size, num_splits)
DECODE_CASES = {
    "qwen05b_batch32": ([1, 7, 64, 65, 300, 1024, 2000, 4097] * 4, 14, 2, 64, 16, None),
    "gqa2_d128_one_split": ([1, 129, 1000, 3000], 16, 8, 128, 16, 1),
    "mha_d128_pages256_splits7": ([5, 700, 2500], 8, 8, 128, 256, 7),
    "gqa7_padding_sequence": ([0, 33, 600], 7, 1, 64, 32, 16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
def test_prefill_triton_matches_twin_on_gpu(case, dtype):
    lens_q, lens_k, hq, hkv, d, page_size = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = rand((sum(lens_q), hq, d), dtype, gen)
    ks = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    vs = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    if page_size:
        k, v, table = to_paged(ks, vs, page_size, gen)
    else:
        k, v, table = torch.cat(ks), torch.cat(vs), None
    args = (q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), d ** -0.5)
    out = A.prefill_attention(*args, block_table=table)                     # CUDA tensors -> Triton
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, A.prefill_attention_torch(*args, block_table=table), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_triton_matches_twin_on_gpu(case, dtype):
    lens_k, hq, hkv, d, page_size, num_splits = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = rand((len(lens_k), hq, d), dtype, gen)
    ks = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    vs = [rand((lk, hkv, d), dtype, gen) for lk in lens_k]
    k_cache, v_cache, table = to_paged(ks, vs, page_size, gen)
    context_lens = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, table, context_lens, d ** -0.5)
    out = A.decode_attention(*args, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, A.decode_attention_torch(*args), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kvcache_matches_twin_on_gpu(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, hkv, d, page_size, num_pages = 3000, 2, 64, 16, 256
    k, v = rand((n, hkv, d), dtype, gen), rand((n, hkv, d), dtype, gen)
    slots = torch.randperm(num_pages * page_size, generator=gen, device="cuda")[:n]
    slots[::7] = -1                                                          # padding tokens
    caches = [torch.zeros(num_pages, page_size, hkv, d, dtype=dtype, device="cuda") for _ in range(4)]
    A.store_kvcache(k, v, caches[0], caches[1], slots)
    A.store_kvcache_torch(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_decode_of_last_token_matches_last_prefill_row_on_gpu():
    # Two kernels, one answer: decoding the last token = the last row of the causal prefill.
    gen = torch.Generator(device="cuda").manual_seed(0)
    L, hq, hkv, d = 777, 14, 2, 64
    q, k, v = rand((L, hq, d), torch.float32, gen), rand((L, hkv, d), torch.float32, gen), rand((L, hkv, d), torch.float32, gen)
    k_cache, v_cache, table = to_paged([k], [v], 16, gen)
    full = A.prefill_attention(q, k_cache, v_cache, cu([L]), cu([L]), L, L, 0.125, block_table=table)
    last = A.decode_attention(q[-1:], k_cache, v_cache, table, torch.tensor([L], dtype=torch.int32, device="cuda"), 0.125)
    torch.testing.assert_close(last, full[-1:], **TOL[torch.float32])
