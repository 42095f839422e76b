"""bf16 sampling on a CPU: products in fp32 rounded once (model.BF16_IN_FP32) against torch's bf16 kernels.

On a CPU without bf16 units (AVX2 only) torch's bf16 GEMM is emulated and runs several times slower than
fp32; `model.linear` then multiplies the same bf16 values in fp32 and rounds the result to bf16 once.
For each model shape (the tiny preset; the Qwen2.5-0.5B shape, random weights) the sampler generates
`--new-tokens` tokens after random prompts in three settings, alternating, the median of `--reps`
timed calls each: fp32, bf16 with torch's kernels, bf16 with products in fp32. Also printed: the
share of one forward's bf16 logits on which the two bf16 settings differ, and their largest difference;
first, one linear at the tiny preset's shapes and the 0.5B MLP's, in the same three settings.

    python bench/bf16_cpu.py --threads 1          # the tiny preset, one thread (as the demo's jobs run)
    python bench/bf16_cpu.py --shapes qwen2.5-0.5b --new-tokens 16 --reps 2   # minutes: torch's bf16 is slow here

Prints a line per linear and per shape, then one JSON line whose last field, per shape, is `ratio`:
tokens/s of bf16 with products in fp32 over bf16 with torch's kernels (per linear: time over time).
On a CPU with bf16 units (AMX-BF16, AVX512-BF16) the switch is off in normal use (`model.BF16_IN_FP32`
False); this script forces each setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import minir1ci.inference.model as model_module
from minir1ci.inference.devices import cpu_has_bf16_units
from minir1ci.inference.engine import Sampler, SamplingParams
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
from minir1ci.presets import tiny_dir

QWEN_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=32768)
SETTINGS = {"fp32": ("fp32", False), "bf16 torch": ("bf16", False), "bf16 in fp32": ("bf16", True)}  # model, switch
LINEARS = [(64, 128, 384), (64, 384, 128), (64, 128, 1024), (32, 896, 4864)]   # rows, in, out: tiny; 0.5B's MLP


def time_linears(reps: int) -> dict:
    """Microseconds of one `model.linear` call per setting at LINEARS' shapes, alternating, median of reps."""
    g, out = torch.Generator().manual_seed(0), {}
    for n, i, o in LINEARS:
        x, w = torch.randn(n, i, generator=g), torch.randn(o, i, generator=g)
        args = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
        times = {name: [] for name in SETTINGS}
        for rep in range(reps + 1):
            for name, (dtype, in_fp32) in SETTINGS.items():
                model_module.BF16_IN_FP32 = in_fp32
                t0 = time.perf_counter()
                for _ in range(20):
                    model_module.linear(*args[dtype])
                if rep:
                    times[name].append((time.perf_counter() - t0) / 20 * 1e6)
        row = {name: round(statistics.median(t), 1) for name, t in times.items()}
        out[f"{n}x{i}->{o} us"] = {**row, "ratio": round(row["bf16 torch"] / row["bf16 in fp32"], 2)}
    model_module.BF16_IN_FP32 = not cpu_has_bf16_units()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny", help="tiny, qwen2.5-0.5b or both, comma-separated")
    ap.add_argument("--batch", type=int, default=32, help="sequences per call (the 0.5B shape: a quarter)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    caps = {k: v for k, v in torch.cpu.get_capabilities().items()
            if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    print(f"threads={torch.get_num_threads()} bf16 units={cpu_has_bf16_units()} {caps}", flush=True)
    result = {"caps": caps, "threads": torch.get_num_threads(), "linears": time_linears(args.reps)}
    for shape, row in result["linears"].items():
        print(f"linear {shape}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    for shape in args.shapes.split(","):
        cfg = ModelConfig.from_json(tiny_dir()) if shape == "tiny" else ModelConfig(**QWEN_0_5B)
        batch = args.batch if shape == "tiny" else max(1, args.batch // 4)
        fp32 = Qwen2ForCausalLM(cfg)
        fp32.init_weights(seed=0)
        models = {"fp32": fp32.eval(), "bf16": Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()}
        models["bf16"].load_state_dict(fp32.state_dict())
        samplers = {name: Sampler(models[m], None, max_num_seqs=batch, max_model_len=1024)
                    for name, (m, _) in SETTINGS.items()}
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        times = {name: [] for name in SETTINGS}
        for rep in range(args.reps + 1):   # rep 0: warm-up, untimed
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
            for name, (_, in_fp32) in SETTINGS.items():   # alternating, the same prompts
                model_module.BF16_IN_FP32 = in_fp32
                t0 = time.perf_counter()
                outs = samplers[name].generate(prompts, params)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                assert all(len(o.token_ids) == args.new_tokens for o in outs)
        ids = torch.randint(0, cfg.vocab_size, (2, args.prompt_len), generator=gen)
        with torch.no_grad():
            logits = []
            for in_fp32 in (False, True):
                model_module.BF16_IN_FP32 = in_fp32
                logits.append(models["bf16"](ids).float())
        model_module.BF16_IN_FP32 = not cpu_has_bf16_units()
        tps = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
        row = {**{f"{name} tok/s": round(v, 1) for name, v in tps.items()}, "batch": batch,
               "logits differing": round(float((logits[0] != logits[1]).float().mean()), 5),
               "max logit diff": float((logits[0] - logits[1]).abs().max()),
               "ratio": round(tps["bf16 in fp32"] / tps["bf16 torch"], 2)}
        print(f"{shape}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        result[shape] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
