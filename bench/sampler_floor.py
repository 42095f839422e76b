"""How fast could any sampler be on this machine, per dtype? The matrix products alone, against HF.

Sampling `new` tokens for `batch` prompts of `prompt` tokens needs at least these products, with
the model's own weights, whatever the implementation: every layer's seven projections (q, k, v,
o, gate, up, down) over the batch x prompt prompt tokens, the LM head over the batch's last
tokens, then for each of the other new - 1 tokens the seven projections and the LM head over
one token per sequence. This script runs exactly those `F.linear` calls, in the order a sampler
makes them (so the weights stream from memory as they do in a real decode), and nothing else: no
attention, norms, sampling or bookkeeping. Its time is a floor for any sampler that uses torch's
GEMMs in that dtype (fp32: MKL; bf16: oneDNN, on AMX where the CPU has it); HF's generate time
divided by it is the largest speed-up over HF that such a sampler can show on this machine, and
batch x new tokens over it is the bound in tokens/s. A second floor runs the decode products through oneDNN with
weights reordered for the batch beforehand (faster than MKL at small batches on this machine); the
largest ratio uses the lower of the two floors.

In the same run, interleaved: HF generate and our Sampler on the same fresh random prompts (as in
bench/sampler.py), and the floor.

    python bench/sampler_floor.py                                 # tiny and 0.5B shape, batch 32
    python bench/sampler_floor.py --shapes qwen2.5-0.5b --reps 2 --dtypes float32,bfloat16

Prints a table (one row per dtype), then one JSON line per shape: per dtype both sides, the floor,
the bound in tokens/s, our ratio and the largest ratio its floor allows; last, our best dtype over
HF's best (`ours_ratio_best`) and the largest such ratio any dtype's floor allows (`max_ratio_best`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler import build, time_hf, time_ours  # noqa: E402  (the sampler bench's set-up, shared)

from minir1ci.inference.devices import cpu_has_bf16_units  # noqa: E402
from minir1ci.inference.engine import Sampler  # noqa: E402


def projections(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every layer's seven projections, in forward order."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            out.append((lin.weight, lin.bias))
    return out


def onednn_linear(batch: int):
    """A linear through oneDNN with its weights reordered once for `batch` rows (the layout its
    kernels prefer), or None where this torch build lacks the ops. Returns (prepare, apply)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return None
    return (lambda w: ops._reorder_linear_weight(w, batch),
            lambda x, w, b: ops._linear_pointwise(x, w, b, "none", [], ""))


@torch.inference_mode()
def time_floor(model, batch: int, prompt_len: int, new_tokens: int, onednn: bool = False) -> float:
    """Seconds for the products alone: prefill over batch x prompt_len rows, then new_tokens - 1
    decode steps over batch rows; the LM head once per produced token. With `onednn`, the decode
    products use weights reordered for oneDNN beforehand (reordering is not timed)."""
    projs = projections(model)
    head = model.lm_head.weight
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    dt = head.dtype
    pre_h, pre_i = torch.randn(batch * prompt_len, hidden, dtype=dt), torch.randn(batch * prompt_len, inter, dtype=dt)
    dec_h, dec_i = torch.randn(batch, hidden, dtype=dt), torch.randn(batch, inter, dtype=dt)
    dec_projs, dec_head, dec_linear = projs, head, F.linear
    if onednn:
        prepare, dec_linear = onednn_linear(batch)
        dec_projs = [(prepare(w), b) for w, b in projs]
        dec_head = prepare(head)
    t0 = time.perf_counter()
    for w, b in projs:
        F.linear(pre_i if w.shape[1] == inter else pre_h, w, b)
    F.linear(dec_h, head)
    for _ in range(new_tokens - 1):
        for (w, b), (wd, _) in zip(projs, dec_projs):
            dec_linear(dec_i if w.shape[1] == inter else dec_h, wd, b)
        dec_linear(dec_h, dec_head, None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    dtypes = args.dtypes.split(",")
    print(f"cpu threads={torch.get_num_threads()} batch={B} prompt={P} new={N} reps={args.reps} "
          f"bf16 units={cpu_has_bf16_units()}")
    dnn = onednn_linear(B) is not None
    print(f"{'shape':<14}{'dtype':>10}{'HF s':>9}{'ours s':>9}{'floor s':>9}{'oneDNN':>9}{'bound tok/s':>13}"
          f"{'ours/HF':>9}{'max':>7}")
    for shape in args.shapes.split(","):
        runs = {}  # dtype -> (ours, hf, sampler); one random init cast to each dtype
        for d in dtypes:
            ours, hf = build(shape, "cpu", getattr(torch, d))
            runs[d] = (ours, hf, Sampler(ours, None, max_num_seqs=B, max_model_len=4096))
        gen = torch.Generator().manual_seed(0)
        t = {(d, k): [] for d in dtypes for k in ("hf", "ours", "floor", "floor_onednn")}
        for rep in range(args.reps + 1):                                  # rep 0: warm-up, untimed
            prompts = torch.randint(0, ours.config.vocab_size, (B, P), generator=gen)
            for d, (ours, hf, sampler) in runs.items():                  # interleaved, same prompts
                one = dict(hf=time_hf(hf, prompts, N, "cpu"), ours=time_ours(sampler, prompts.tolist(), N, "cpu"),
                           floor=time_floor(ours, B, P, N),
                           floor_onednn=time_floor(ours, B, P, N, onednn=True) if dnn else float("nan"))
                if rep:
                    for k, v in one.items():
                        t[d, k].append(v)
        med = {k: statistics.median(v) for k, v in t.items()}
        out = dict(bench="sampler_floor", shape=shape, batch=B, prompt_len=P, new_tokens=N,
                   threads=torch.get_num_threads(), reps=args.reps)
        for d in dtypes:
            hf_s, ours_s, floor_s, dnn_s = (med[d, k] for k in ("hf", "ours", "floor", "floor_onednn"))
            best = min(floor_s, dnn_s) if dnn else floor_s
            print(f"{shape:<14}{d:>10}{hf_s:>9.3f}{ours_s:>9.3f}{floor_s:>9.3f}{dnn_s:>9.3f}{B * N / best:>13.1f}"
                  f"{hf_s / ours_s:>9.2f}{hf_s / best:>7.2f}", flush=True)
            out[d] = dict(hf_s=round(hf_s, 3), ours_s=round(ours_s, 3), gemm_floor_s=round(floor_s, 3),
                          gemm_floor_onednn_s=round(dnn_s, 3) if dnn else None, bound_tok_s=round(B * N / best, 1),
                          ours_ratio=round(hf_s / ours_s, 2), max_ratio=round(hf_s / best, 2))
        # The bound on our best dtype against HF's best: HF's best time over the lowest floor of any dtype.
        hf_best = min(med[d, "hf"] for d in dtypes)
        floor_best = min(min(med[d, "floor"], med[d, "floor_onednn"]) if dnn else med[d, "floor"] for d in dtypes)
        out.update(ours_ratio_best=round(hf_best / min(med[d, "ours"] for d in dtypes), 2),
                   max_ratio_best=round(hf_best / floor_best, 2))
        print(json.dumps(out), flush=True)
        del runs, ours, hf, sampler


if __name__ == "__main__":
    main()
