"""Ranks under torchrun give the loss and gradients of one process on the same batch.

On CPU: two gloo ranks, replicated, exact to fp32 rounding. On CUDA (marked gpu): one rank per GPU
under FSDP2 with the bf16 mixed-precision policy against one plain process under bf16 autocast; the
two round differently (FSDP2 casts every parameter to bf16, autocast only the matmul inputs), so
the comparison is loose. With two or more GPUs a wrong gradient divisor or a lost shard is off by
far more; with one GPU the test exercises only the wrapping, the DTensor gradients and the gather.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_sft_worker.py")


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(args: list[str], tmp_path: Path, cpu_only: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}   # the baseline is one plain process
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def torchrun() -> str:
    path = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip("torchrun not found next to the interpreter")
    return path


def test_two_ranks_match_one_process(tmp_path):
    launcher = torchrun()
    run([sys.executable, str(WORKER), str(tmp_path / "one.pt")], tmp_path, cpu_only=True)
    run([launcher, "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "two.pt")], tmp_path,
        cpu_only=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["world"] == 1 and two["world"] == 2 and not two["sharded"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=1e-7)
    assert one["grads"].keys() == two["grads"].keys()
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp2_ranks_match_one_process(tmp_path):
    launcher = torchrun()
    n = torch.cuda.device_count()
    run([sys.executable, str(WORKER), str(tmp_path / "one.pt"), "cuda"], tmp_path)
    run([launcher, "--standalone", "--nproc_per_node", str(n), str(WORKER), str(tmp_path / "fsdp.pt"), "cuda"], tmp_path)
    one, fsdp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "fsdp.pt")
    assert one["world"] == 1 and not one["sharded"] and fsdp["world"] == n and fsdp["sharded"]
    assert fsdp["loss"] == pytest.approx(one["loss"], rel=2e-2)
    for name in one["grads"]:
        a, b = fsdp["grads"][name], one["grads"][name]
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, name
    assert fsdp["params"].keys() == one["params"].keys()     # the gathered state dict is the plain layout
    for name, p in one["params"].items():
        torch.testing.assert_close(fsdp["params"][name].float(), p.float().cpu(), msg=name)


ROLLOUT_WORKER = Path(__file__).with_name("dist_rollout_worker.py")


def check_rollouts(found: dict, world: int) -> None:
    assert found["world"] == world and found["sharded"]
    assert found["mismatched"] == []                    # the fp32 copy is the pre-sharding weights, exactly
    assert found["ref_ok"] and found["ref_frozen"] and found["critic_ok"]
    assert found["tied"] and found["param_dtypes"] == ["torch.bfloat16"] and found["buffer_dtypes"] == ["torch.float32"]
    assert len(found["got"]) == 6 and all(len(ids) > 0 for ids in found["got"])
    assert found["got"] == found["want"] and found["got_logp"] == found["want_logp"]
    assert found["lora_ok"]


def test_rollouts_from_sharded_policy_on_cpu(tmp_path):
    # The sampler cannot run FSDP2's DTensor shards; GRPO/PPO sample from a gathered copy.
    launcher = torchrun()
    run([launcher, "--standalone", "--nproc_per_node", "2", str(ROLLOUT_WORKER), str(tmp_path / "r.pt")], tmp_path,
        cpu_only=True)
    check_rollouts(torch.load(tmp_path / "r.pt"), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rollouts_from_sharded_policy_on_gpu(tmp_path):
    launcher = torchrun()
    n = torch.cuda.device_count()
    run([launcher, "--standalone", "--nproc_per_node", str(n), str(ROLLOUT_WORKER), str(tmp_path / "r.pt"), "cuda"],
        tmp_path)
    check_rollouts(torch.load(tmp_path / "r.pt"), n)


@pytest.mark.parametrize("stage,flag", [("sft", "--batch_size=3 --micro_batch_size=1"), ("grpo", "--prompts_per_step=5")])
def test_uneven_share_refused_before_anything_is_written(tmp_path, stage, flag):
    # Two ranks cannot split 3 samples (or 5 prompts) evenly; under FSDP2 the rank with more
    # micro-batches would hang in a collective, so the run stops at once with a clear error.
    train = WORKER.parent.parent / "train.py"
    proc = run([torchrun(), "--standalone", "--nproc_per_node", "2", str(train), "--stage", stage, *flag.split(),
                "--steps=1", f"--out={tmp_path / 'run'}"], tmp_path, cpu_only=True, check=False)
    assert proc.returncode != 0
    name, value = flag.split()[0][2:].split("=")
    assert f"{name}={value} is not divisible by the world size 2" in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


RL_WORKER = Path(__file__).with_name("dist_rl_worker.py")


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    """A two-step SFT checkpoint of the tiny preset, the RL runs' start."""
    from minir1ci.training import runs
    out = tmp_path_factory.mktemp("sft")
    run([sys.executable, str(WORKER.parent.parent / "train.py"), "--stage=sft", "--steps=2", "--save_every=2",
         "--batch_size=8", "--micro_batch_size=4", f"--out={out}", "--device=cpu"], out, cpu_only=True)
    return runs.latest_checkpoint(out)


@pytest.mark.parametrize("stage,lora", [("grpo", 0), ("ppo", 0), ("grpo", 4)], ids=["grpo", "ppo", "grpo-lora"])
def test_sharded_rl_runs_and_resumes_on_cpu(tmp_path, stage, lora, tiny_sft):
    # GRPO/PPO with an FSDP2-sharded policy (over gloo): two steps, then a resume for a third. With LoRA the
    # ranks shard the frozen base and the fp32 adapters, sample from the gathered and merged copy, and save
    # the adapters in PEFT's layout.
    from minir1ci.training import runs
    launcher = torchrun()
    args = [launcher, "--standalone", "--nproc_per_node", "2", str(RL_WORKER), f"--stage={stage}", "--preset=tiny",
            f"--model={tiny_sft}", "--prompts_per_step=2", "--n_samples=2", f"--lora_rank={lora}",
            "--max_new_tokens=24", "--kl_coef=0.01", "--save_every=1", "--num_train_examples=4", f"--out={tmp_path / stage}", "--device=cpu"]
    run(args + ["--steps=2"], tmp_path, cpu_only=True)
    run(args + ["--steps=3", "--resume"], tmp_path, cpu_only=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    latest = runs.latest_checkpoint(tmp_path / stage)
    assert latest.name == "step-000002"
    assert (latest / "adapter_model.safetensors").is_file() == bool(lora)
    assert (latest / "model.safetensors").is_file() != bool(lora)
