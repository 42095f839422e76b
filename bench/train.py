"""SFT training throughput and peak memory: our step against a plain loop over HF Qwen2ForCausalLM, and our
step with LoRA (rank 8 on every decoder linear, alpha 32) against our full fine-tuning.

Both sides train the same weights on the same batches with AdamW (fp32 weights and optimizer state),
in fp32 and with bf16 autocast: forward, masked next-token loss (a mean over the step's trained
tokens), backward, step. HF's loop is the usual one: the batch right-padded to its longest sample with
an attention mask, `labels=` (-100 off the trained tokens) -> full [B, T, V] logits. Ours is the SFT
stage's own step (`training/sft.py`): the step's samples in micro-batches of like lengths, each padded
to its longest, the loss through the LM head in chunks (`inference/logprobs.py`) inside the forward.
Each side runs in its own fresh process so its peak resident memory is its own; the peak (VmHWM) is
reset after the model is built, so it covers training; `train_mb` is that peak less the memory the
process held before training (the torch runtime, weights, data), what the step itself needs.

Shapes: `--shape tiny`, the tiny preset (0.9M parameters, 1,024-token vocabulary) on its SFT batches
(32 oracle trajectories of the built-in tasks per step, 40% answered in text as the demo's teacher;
up to 320 tokens); `--shape 151k` (default), hidden 256 and 4 layers with the real 151,936-token
vocabulary, batches of 4 x 512 random tokens (the first quarter untrained); `--shape 0.5b`, Qwen2.5-0.5B's
shape (494M parameters, random weights), 1 x 512 random tokens per step: where weights, gradients and AdamW
state, not activations, hold the memory, as in the paper's models (what LoRA saves).

    python bench/train.py [--shape tiny|151k|0.5b] [--steps 6] [--dtypes float32,bfloat16]

Prints a table and a final JSON line with every side and dtype; last, our best dtype against HF's
best in tokens/s (`tok_s_ratio`) and peak memory (`peak_mem_ratio`, and `train_mem_ratio`), and LoRA
against full fine-tuning at that dtype (`lora_tok_s_ratio`, `lora_peak_mem_ratio`, `lora_train_mem_ratio`).
LoRA's optimizer holds its adapters alone; the frozen base stays fp32, as train.py keeps it on a CPU.
"""
import argparse
import contextlib
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
VOCAB = 151936


def build(args, side: str):
    import torch
    import transformers

    from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM
    from minir1ci.presets import tiny_dir

    torch.manual_seed(0)
    if args.shape == "tiny":
        kw = {k: v for k, v in ModelConfig.from_json(tiny_dir()).to_hf_dict().items()
              if k not in ("architectures", "model_type")}
    elif args.shape == "0.5b":   # Qwen2.5-0.5B's config.json
        kw = dict(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                  use_sliding_window=False)
    else:
        kw = dict(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if side == "hf":
        return hf
    ours = Qwen2ForCausalLM(ModelConfig.from_json({**kw, "model_type": "qwen2"}))
    ours.load_state_dict(hf.state_dict())
    del hf
    return ours


def batches(args, steps: int) -> list[list]:
    """`steps` batches of samples (ids, mask); the same on both sides."""
    from minir1ci.training.data import Sample

    if args.shape == "tiny":
        from minir1ci.config import TINY_TASKS
        from minir1ci.env.tasks import load_tasks
        from minir1ci.inference.tokenizer import Tokenizer
        from minir1ci.presets import tiny_dir
        from minir1ci.training.data import oracle_samples

        tok = Tokenizer.from_pretrained(tiny_dir())
        examples = load_tasks(TINY_TASKS, split="train", limit=200, seed=0)
        samples = [s for s in oracle_samples(examples, tok, True, 0.4, seed=0) if len(s.ids) <= 320]
        rng = random.Random(0)
        return [[samples[rng.randrange(len(samples))] for _ in range(args.batch)] for _ in range(steps)]
    rng = random.Random(1)
    return [[Sample([rng.randrange(VOCAB) for _ in range(args.seq)], [0] * (args.seq // 4) + [1] * (args.seq - args.seq // 4))
             for _ in range(args.batch)] for _ in range(steps)]


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

    from minir1ci.config import tiny
    from minir1ci.training.data import pad_batch
    from minir1ci.training.sft import sft_step_loss

    torch.set_num_threads(args.threads)
    model = build(args, side).train()
    if args.grad_checkpointing:   # each decoder layer recomputed in the backward, on every side
        if side == "hf":
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing = True
    if side == "lora":
        from minir1ci.inference.lora import apply_lora
        apply_lora(model, rank=8, alpha=32.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batches(args, args.steps + 1)
    cfg = tiny("sft") if args.shape == "tiny" else None
    micro = cfg.micro_batch_size if cfg else args.batch
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else contextlib.nullcontext

    def step(batch) -> float:
        denom = sum(sum(s.mask[1:]) for s in batch)        # trained tokens of the step (targets shift left)
        if side == "hf":
            ids, attn, mask = pad_batch([s.ids for s in batch], [s.mask for s in batch])
            with amp():
                loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            loss = float(loss)
        else:   # the SFT stage's step: like lengths together, each micro-batch's loss over the whole step's tokens
            ordered = sorted(batch, key=lambda s: len(s.ids))
            loss = sum(sft_step_loss(model, ordered[i:i + micro], denom, cfg or argparse.Namespace(loss_chunk_size=args.chunk),
                                     "cpu", amp())[0] for i in range(0, len(ordered), micro)) / denom
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step(data[0])                      # warm-up (also allocates the optimizer state)
    gc.collect()
    base = rss_mb("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    losses = [step(b) for b in data[1:]]
    dt = time.perf_counter() - t0
    tokens = sum(len(s.ids) for b in data[1:] for s in b)
    peak = rss_mb("VmHWM")
    return {"tok_s": tokens / dt, "peak_mb": peak, "train_mb": peak - base, "first_loss": first,
            "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "151k", "0.5b"], default="151k")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="samples per step (tiny: 32, 151k: 4, 0.5b: 1)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="fp32, and bf16 autocast over fp32 weights")
    ap.add_argument("--grad_checkpointing", action="store_true", help="recompute each layer in the backward")
    ap.add_argument("--side", choices=["hf", "ours", "lora"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    args.batch = args.batch or {"tiny": 32, "151k": 4, "0.5b": 1}[args.shape]
    if args.side:
        print(json.dumps(run_side(args, args.side)))
        return
    import torch
    caps = {k: v for k, v in torch.cpu.get_capabilities().items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    res = {}
    for dtype in args.dtypes.split(","):
        for side in ("hf", "ours", "lora"):
            cmd = [sys.executable, __file__, "--side", side, "--dtype", dtype] + [
                f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
                if k not in ("side", "dtype", "dtypes") and v is not False]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[side, dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    shape = {"tiny": "the tiny preset, its SFT batches", "0.5b": f"Qwen2.5-0.5B's shape, {args.seq} tokens"}.get(
        args.shape, f"vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers, {args.seq} tokens")
    print(f"SFT step, CPU {caps}, {shape}, {args.batch} samples per step, {args.threads} threads; "
          f"bf16 = autocast over fp32 weights")
    print(f"{'':16s} {'tokens/s':>10s} {'peak MB':>10s} {'train MB':>10s} {'loss first->last':>20s}")
    for (side, dtype), r in res.items():
        print(f"{side + ' ' + dtype:16s} {r['tok_s']:10.1f} {r['peak_mb']:10.0f} {r['train_mb']:10.0f} "
              f"{r['first_loss']:9.4f} -> {r['last_loss']:.4f}")
    best = {side: max((k for k in res if k[0] == side), key=lambda k: res[k]["tok_s"]) for side in ("hf", "ours")}
    summary = {"shape": args.shape, "cpu": caps, **{f"{side}_{dtype}_{m}": round(r[m], 1) for (side, dtype), r in res.items()
                                                    for m in ("tok_s", "peak_mb", "train_mb")}}
    ours, hf, lora = res[best["ours"]], res[best["hf"]], res["lora", best["ours"][1]]
    summary.update(hf_best=best["hf"][1], ours_best=best["ours"][1], tok_s_ratio=round(ours["tok_s"] / hf["tok_s"], 3),
                   peak_mem_ratio=round(ours["peak_mb"] / hf["peak_mb"], 3),
                   train_mem_ratio=round(ours["train_mb"] / max(hf["train_mb"], 1e-9), 3),
                   lora_tok_s_ratio=round(lora["tok_s"] / ours["tok_s"], 3),
                   lora_peak_mem_ratio=round(lora["peak_mb"] / ours["peak_mb"], 3),
                   lora_train_mem_ratio=round(lora["train_mb"] / max(ours["train_mb"], 1e-9), 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
