#!/usr/bin/env bash
# One prepared GPU session: the tests marked gpu (FSDP2 under torchrun among them), the sampler
# benchmark in bf16 against HF generate, a short SFT + GRPO run on CUDA (bf16 autocast, Triton
# kernels in the sampler), SFT under torchrun with FSDP2 whose gathered checkpoint is then
# evaluated by a plain process, and GRPO under torchrun (rollouts from the gathered copy).
# Usage on a CUDA machine from the repo root: bash bench/gpu_check.sh [OUTDIR]
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "== gpu tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sampler_gpu.py tests/test_kernels_gpu.py tests/test_checkpoint.py tests/test_logprobs.py tests/test_distributed.py 2>&1 | tail -15
  echo "== sampler benchmark (bf16, CUDA)"
  timeout 120 python3 bench/sampler.py --device cuda --dtype bfloat16 --reps 2 2>&1 | tail -16
  echo "== SFT then GRPO on CUDA (tiny preset)"
  timeout 60 python3 train.py --stage sft --steps 30 --save_every 30 --out /tmp/g/sft 2>&1 | tail -3
  timeout 60 python3 train.py --stage grpo --preset tiny --model /tmp/g/sft/step-000029 --steps 3 --save_every 3 --out /tmp/g/grpo 2>&1 | tail -4
  echo "== SFT under torchrun (FSDP2 on every GPU), then its checkpoint in one plain process"
  timeout 90 torchrun --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" train.py --stage sft --steps 30 --save_every 30 --out /tmp/g/fsdp 2>&1 | grep -v "^\[#" | tail -3
  timeout 60 python3 evaluate.py --model /tmp/g/fsdp/step-000029 --tasks builtin:all --limit 5 2>&1 | tail -4
  echo "== GRPO under torchrun (FSDP2): the sampler runs on each rank's unsharded copy"
  timeout 90 torchrun --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" train.py --stage grpo --preset tiny --model /tmp/g/fsdp/step-000029 --steps 2 --save_every 2 --out /tmp/g/fsdp_grpo 2>&1 | grep -v "^\[#" | tail -3
} 2>&1 | tee "$out/gpu_check.log"
