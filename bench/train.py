"""SFT training throughput and peak memory: our loop against a plain loop over HF Qwen2ForCausalLM.

Both sides train the same random weights on the same batches (CPU, the real 151,936-token
vocabulary), in fp32 and with bf16 autocast over fp32 weights and optimizer state, with AdamW: forward, masked next-token loss, backward, step. HF computes the loss the
usual way (`labels=` -> full [B, T, V] logits); ours computes it through the LM head in chunks
(minir1ci/inference/logprobs.py) inside the model's forward. Each side runs in its own fresh process so
its peak resident memory is its own; the peak (VmHWM) is reset after the models are built, so it
covers training only. The weights are built from one seed in both.

    python bench/train.py [--hidden 256 --layers 4 --batch 4 --seq 512 --steps 4]

Prints a table and a final JSON line with every side and dtype; last, our best dtype against HF's
best in tokens/s (`tok_s_ratio`) and peak memory (`peak_mem_ratio`).
"""
import argparse
import contextlib
import json
import subprocess
import sys
import time

VOCAB = 151936


def build(args, side: str):
    import torch
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
              num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
              max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, use_sliding_window=False))
    if side == "hf":
        return hf
    from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
    ours = Qwen2ForCausalLM(ModelConfig(**kw))
    ours.load_state_dict(hf.state_dict())
    del hf
    return ours


def batches(args, steps):
    import torch
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
        mask = torch.ones_like(ids)
        mask[:, : args.seq // 4] = 0            # the prompt is not trained on
        yield ids, mask


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_side(args, side: str) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    model = build(args, side).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    import gc
    gc.collect()
    reset_peak_rss()          # building the models (ours copies HF's weights) is not training
    base = rss_mb("VmRSS")

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()

    def step(ids, mask):
        with amp():
            loss = forward_loss(ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def forward_loss(ids, mask):
        if side == "hf":
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, labels=labels).loss
        else:
            targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
            tmask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
            logp, _ = model(ids, targets=targets, target_mask=tmask, chunk_size=args.chunk)
            loss = -(logp.float() * tmask).sum() / tmask.sum()
        return loss

    data = list(batches(args, args.steps + 1))
    first = step(*data[0])                      # warm-up (also allocates the optimizer state)
    t0 = time.perf_counter()
    losses = [step(*b) for b in data[1:]]
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    return {"tok_s": tokens / dt, "peak_mb": rss_mb("VmHWM"), "model_mb": base, "first_loss": first,
            "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="fp32, and bf16 autocast over fp32 weights")
    ap.add_argument("--side", choices=["hf", "ours"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args, args.side)))
        return
    res = {}
    for dtype in args.dtypes.split(","):
        for side in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--dtype", dtype] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("side", "dtype", "dtypes")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[side, dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SFT step, CPU, vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq} tokens, {args.threads} threads; bf16 = autocast over fp32 weights")
    print(f"{'':16s} {'tokens/s':>10s} {'peak MB':>10s} {'loss first->last':>20s}")
    for (side, dtype), r in res.items():
        print(f"{side + ' ' + dtype:16s} {r['tok_s']:10.1f} {r['peak_mb']:10.0f} {r['first_loss']:9.4f} -> {r['last_loss']:.4f}")
    best = {side: max((k for k in res if k[0] == side), key=lambda k: res[k]["tok_s"]) for side in ("hf", "ours")}
    summary = {f"{side}_{dtype}_{m}": round(r[m], 1) for (side, dtype), r in res.items() for m in ("tok_s", "peak_mb")}
    summary.update(hf_best=best["hf"][1], ours_best=best["ours"][1],
                   tok_s_ratio=round(res[best["ours"]]["tok_s"] / res[best["hf"]]["tok_s"], 3),
                   peak_mem_ratio=round(res[best["ours"]]["peak_mb"] / res[best["hf"]]["peak_mb"], 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
