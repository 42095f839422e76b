"""The model and its inference: Qwen2 (model.py), checkpoints, tokenizer, device choice, kernels, the sampler."""
