"""How an RL step with LoRA should sample: from weights merged once per step, or with the adapters
applied in every decode step's forward. Both give the current policy exactly; this measures their cost.

(a) merged: `merge_lora` on the whole model, once per RL step (W + (alpha / r) B A for every adapted
    linear, then the sampler runs the plain model);
(b) adapters in the forward: the extra work of every decode step, each adapted linear's two thin
    products (x A^T, then B) and the add, timed on a decode batch of `--batch` rows, times the
    `--decode_steps` steps of a rollout (the response budget).

The base products are the same on both sides and are not timed. Qwen2.5-0.5B's shape (or `--shape
tiny`), rank 8 on every decoder linear, fp32, random weights.

    python bench/lora_sampling.py [--shape 0.5b|tiny] [--batch 128] [--decode_steps 160] [--rank 8]

Prints both sides and a JSON line, `adapters_over_merged` last (above 1: merging is cheaper).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(shape: str):
    from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
    from minir1ci.presets import tiny_dir

    if shape == "tiny":
        config = ModelConfig.from_json(tiny_dir())
    else:   # Qwen2.5-0.5B's config.json
        config = ModelConfig.from_json({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
                                        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                                        "num_key_value_heads": 2, "max_position_embeddings": 32768,
                                        "tie_word_embeddings": True, "rope_theta": 1e6})
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["0.5b", "tiny"], default="0.5b")
    ap.add_argument("--batch", type=int, default=128, help="rows of a decode step (prompts x samples)")
    ap.add_argument("--decode_steps", type=int, default=160)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from minir1ci.inference.lora import apply_lora, lora_layers, merge_lora

    model = apply_lora(build(args.shape), args.rank, 32.0)
    for m in lora_layers(model).values():   # B nonzero, as after training (the cost does not depend on it)
        torch.nn.init.normal_(m.lora_B.weight, std=1e-3)
    layers = list(lora_layers(model).values())
    xs = {m.in_features: torch.randn(args.batch, m.in_features) for m in layers}

    @torch.no_grad()
    def adapter_products():   # one decode step's extra work: every adapted linear's update
        for m in layers:
            x = xs[m.in_features]
            _ = m.lora_B(m.lora_A(x)) * m.scaling

    with torch.no_grad():
        merged_s = best_of(lambda: merge_lora(model), args.reps)
    per_step = best_of(adapter_products, args.reps)
    adapters_s = per_step * args.decode_steps
    caps = {k: v for k, v in torch.cpu.get_capabilities().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    print(f"{args.shape}, rank {args.rank}, {len(layers)} adapted linears, CPU {caps}, {args.threads} threads")
    print(f"(a) merge once per RL step: {merged_s * 1e3:.1f} ms")
    print(f"(b) adapters in the forward: {per_step * 1e3:.2f} ms per decode step of {args.batch} rows, "
          f"x {args.decode_steps} steps = {adapters_s * 1e3:.1f} ms")
    print(json.dumps({"shape": args.shape, "cpu": caps, "rank": args.rank, "batch": args.batch,
                      "decode_steps": args.decode_steps, "merge_ms": round(merged_s * 1e3, 2),
                      "adapters_ms": round(adapters_s * 1e3, 2),
                      "adapters_over_merged": round(adapters_s / merged_s, 2)}))


if __name__ == "__main__":
    main()
