"""Time the Triton attention kernels against their PyTorch twins (and SDPA for prefill) on CUDA.

Shapes follow Qwen2.5-0.5B (14 query heads, 2 KV heads, head_dim 64) with a batch of 32
sequences of 1024 tokens in bf16 and a paged cache (page size 16, pages shuffled):
  prefill  all 32 x 1024 tokens at once, keys read through the block table;
           SDPA (FlashAttention, dense padded [B, H, T, D], K/V expanded to 14 heads) is the bar
  decode   one new token per sequence over its 1024 cached keys, launched plainly and replayed
           from a CUDA graph (the launch overhead is most of the plain time at this size)
Prints one JSON line per kernel, the speed-up over the twin last. Run: python bench/attention_gpu.py
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from minir1ci.inference.kernels import attention as A


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def paged_cache(k: torch.Tensor, v: torch.Tensor, page_size: int):
    """Dense k/v [B, T, Hkv, D] into shuffled pages: caches [B*T/page_size, page_size, Hkv, D]."""
    B, T, H, D = k.shape
    pages_per_seq = T // page_size
    perm = torch.randperm(B * pages_per_seq, device=k.device)
    k_cache, v_cache = torch.empty_like(k).view(-1, page_size, H, D), torch.empty_like(v).view(-1, page_size, H, D)
    k_cache[perm] = k.reshape(-1, page_size, H, D)
    v_cache[perm] = v.reshape(-1, page_size, H, D)
    table = perm.view(B, pages_per_seq).to(torch.int32)
    return k_cache, v_cache, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False")

    B, T, Hq, Hkv, D = args.batch, args.context, args.heads, args.kv_heads, args.head_dim
    dtype, scale = torch.bfloat16, D ** -0.5
    torch.manual_seed(0)
    q = torch.randn(B * T, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype)
    k_cache, v_cache, table = paged_cache(k, v, args.page_size)
    cu_seqlens = torch.arange(0, B * T + 1, T, device="cuda", dtype=torch.int32)
    device = torch.cuda.get_device_name()
    shape = dict(batch=B, context=T, q_heads=Hq, kv_heads=Hkv, head_dim=D, page_size=args.page_size, dtype="bf16")

    # Prefill: Triton (paged) vs twin vs SDPA on dense, pre-expanded K/V.
    prefill_args = (q, k_cache, v_cache, cu_seqlens, cu_seqlens, T, T, scale)
    out = A.prefill_attention(*prefill_args, block_table=table)
    err = (out.float() - A.prefill_attention_torch(*prefill_args, block_table=table).float()).abs().max().item()
    t_triton = bench_ms(lambda: A.prefill_attention(*prefill_args, block_table=table))
    t_twin = bench_ms(lambda: A.prefill_attention_torch(*prefill_args, block_table=table))
    qd = q.view(B, T, Hq, D).transpose(1, 2)                                # [B, Hq, T, D]
    kd = k.repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    vd = v.repeat_interleave(Hq // Hkv, 2).transpose(1, 2)
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale))
    flops = 4 * B * Hq * D * T * T / 2                                      # causal: half the QK^T and PV work
    print(json.dumps(dict(kernel="prefill_attention", device=device, **shape, max_abs_err_vs_twin=err,
                          triton_ms=round(t_triton, 4), triton_tflops=round(flops / t_triton / 1e9, 1),
                          sdpa_ms=round(t_sdpa, 4), torch_twin_ms=round(t_twin, 4),
                          sdpa_over_triton=round(t_sdpa / t_triton, 3), twin_over_triton=round(t_twin / t_triton, 2))))

    # Decode: one query per sequence over T cached keys.
    qd1 = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    context_lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    decode_args = (qd1, k_cache, v_cache, table, context_lens, scale)
    out = A.decode_attention(*decode_args)
    err = (out.float() - A.decode_attention_torch(*decode_args).float()).abs().max().item()
    t_triton = bench_ms(lambda: A.decode_attention(*decode_args))
    t_twin = bench_ms(lambda: A.decode_attention_torch(*decode_args))
    graph = torch.cuda.CUDAGraph()                                          # as the sampler replays it
    with torch.cuda.graph(graph):
        A.decode_attention(*decode_args)
    t_graph = bench_ms(graph.replay)
    kv_bytes = 2 * B * T * Hkv * D * k.element_size()                       # decode is bound by reading K and V
    print(json.dumps(dict(kernel="decode_attention", device=device, **shape, max_abs_err_vs_twin=err,
                          triton_ms=round(t_triton, 4), triton_graph_ms=round(t_graph, 4),
                          triton_graph_gb_per_s=round(kv_bytes / t_graph / 1e6, 1),
                          torch_twin_ms=round(t_twin, 4), twin_over_triton=round(t_twin / t_triton, 2))))


if __name__ == "__main__":
    main()
