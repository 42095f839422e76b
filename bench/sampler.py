"""Sampler throughput against HF transformers' generate, same random weights and settings.

For each model shape (the tiny preset; the Qwen2.5-0.5B shape) and batch size, both sides
generate `--new-tokens` tokens after random `--prompt-len`-token prompts at temperature 1 with
top-k and top-p off and no eos, so every row produces exactly the same number of tokens. HF's
model is built from our state dict with `assign=True`, so both read the very same weight tensors.
Each side runs in every dtype of `--dtypes` (default fp32 and bf16), so four runs per row: HF
fp32, HF bf16, ours fp32, ours bf16. Each gets one untimed warm-up call per batch size (our CUDA
graphs are captured when the Sampler is built, also untimed); the timed calls alternate between
the four, and the median of `--reps` is reported. `ratio_best` is our best dtype's tokens/s over
HF's best dtype's. tokens/s = batch x new tokens / wall time of one call, prefill
included. Every call, warm-up included, gets fresh random prompts (the same ones for both sides):
the sampler keeps freed prompt pages for reuse, so repeating a prompt would let our side skip its
prefill while HF recomputes it.

    python bench/sampler.py                                   # CPU, fp32 and bf16, all threads
    python bench/sampler.py --device cuda --dtypes bfloat16   # a GPU run
    python bench/sampler.py --shapes tiny --batches 32 --reps 5

Prints a table (and the dtype `auto` picks here), then one JSON line: every side and dtype per row,
ending with `ratio_best` per shape/batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import transformers

from minir1ci.inference.devices import cpu_has_bf16_units, inference_dtype
from minir1ci.inference.engine import Sampler, SamplingParams
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
from minir1ci.presets import tiny_dir

QWEN_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=32768)


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[Qwen2ForCausalLM, transformers.PreTrainedModel]:
    cfg = ModelConfig.from_json(tiny_dir()) if shape == "tiny" else ModelConfig(**QWEN_0_5B)
    ours = Qwen2ForCausalLM(cfg)
    ours.init_weights(seed=0)
    ours = ours.to(device=device, dtype=dtype).eval()
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    hf = transformers.Qwen2ForCausalLM(hf_cfg)
    hf.load_state_dict(ours.state_dict(), assign=True)  # the same tensors, not copies
    hf.tie_weights()
    return ours, hf.to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_hf(hf, prompts: torch.Tensor, new_tokens: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                          top_p=1.0, eos_token_id=None, pad_token_id=0)
    sync(device)
    assert out.shape == (prompts.shape[0], prompts.shape[1] + new_tokens)
    return time.perf_counter() - t0


def time_ours(sampler: Sampler, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    outs = sampler.generate(prompts, params)
    sync(device)
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,qwen2.5-0.5b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="each side runs in each of these")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        ap.error(f"unknown dtype {bad[0]!r}; use float32, bfloat16 or float16")
    batches = [int(b) for b in args.batches.split(",")]
    auto = inference_dtype("auto", torch.device(args.device))
    rows = []
    print(f"device={args.device} threads={torch.get_num_threads()} prompt={args.prompt_len} new={args.new_tokens} "
          f"reps={args.reps} auto dtype={str(auto).removeprefix('torch.')} (bf16 units: {cpu_has_bf16_units()})")
    order = [(side, d) for side in ("HF", "ours") for d in dtypes]
    print(f"{'shape':<14}{'batch':>6}" + "".join(f"{side + ' ' + d:>17}" for side, d in order) + f"{'best/best':>11}")
    for shape in args.shapes.split(","):
        sides = {}  # (side, dtype) -> callable(prompts) -> seconds; all four share one random init
        for d in dtypes:
            ours, hf = build(shape, args.device, getattr(torch, d))
            sampler = Sampler(ours, None, max_num_seqs=max(batches), max_model_len=4096)
            sides["HF", d] = lambda p, hf=hf: time_hf(hf, p.to(args.device), args.new_tokens, args.device)
            sides["ours", d] = lambda p, s=sampler: time_ours(s, p.tolist(), args.new_tokens, args.device)
        vocab = ours.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            times = {k: [] for k in sides}
            for rep in range(args.reps + 1):                              # rep 0: warm-up, untimed
                prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen)
                for k, run in sides.items():                              # alternating, same prompts
                    t = run(prompts)
                    if rep:
                        times[k].append(t)
            tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
            best = {side: max(v for (s, _), v in tps.items() if s == side) for side in ("HF", "ours")}
            row = dict(shape=shape, batch=batch)
            row.update({f"{side.lower()}_{d}_tok_s": round(tps[side, d], 1) for side, d in order})
            row.update(hf_best_tok_s=round(best["HF"], 1), ours_best_tok_s=round(best["ours"], 1),
                       ratio_best=round(best["ours"] / best["HF"], 2))
            rows.append(row)
            print(f"{shape:<14}{batch:>6}" + "".join(f"{tps[k]:>17.1f}" for k in order)
                  + f"{row['ratio_best']:>11.2f}", flush=True)
        del sides, sampler, ours, hf
    print(json.dumps(dict(bench="sampler", device=args.device, dtypes=dtypes, auto_dtype=str(auto).removeprefix("torch."),
                          threads=torch.get_num_threads(), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          reps=args.reps, results=rows,
                          ratio_best={f"{r['shape']}/{r['batch']}": r["ratio_best"] for r in rows})))


if __name__ == "__main__":
    main()
