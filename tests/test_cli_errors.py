"""Every command-line failure ends the same way: a non-zero exit and one stderr line naming the
problem, with no traceback and nothing written (a run or output directory is unchanged, a fresh
--out stays absent). Then the run directory's life: one training at a time (a lock the kernel drops
with its process), no re-run over a run without --resume, Ctrl-C, stale save directories."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as train_script
from minir1ci.inference import checkpoint
from minir1ci.presets import tiny_dir

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# a pretrain run of a few 50 ms steps
PRETRAIN = ["--stage=pretrain", "--num_train_examples=8", "--batch_size=4", "--micro_batch_size=4",
            "--max_seq_len=256", "--warmup_steps=1"]
SAMPLE = ["--tasks", "builtin:mul", "--limit", "1", "--max_new_tokens", "8"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    out.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return out


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=180)


def start(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def listing(path: Path) -> dict | None:
    """Every entry under `path` with its kind, mode, mtime and (files) content hash; None if absent."""
    if not path.exists():
        return None
    out = {}
    for p in sorted([path, *path.rglob("*")]):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(path))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Paths the command lines below refer to: good and broken checkpoints, bad data files, an empty
    data folder, a finished run, and places that must stay as they are."""
    root = tmp_path_factory.mktemp("inputs")
    model, tok = checkpoint.init_from_config(tiny_dir(), seed=0)
    good = checkpoint.save_pretrained(model, tok, root / "good")
    bad_types = root / "bad_types"
    shutil.copytree(good, bad_types)
    config = json.loads((good / "config.json").read_text())
    (bad_types / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    no_tok = root / "no_tok"
    shutil.copytree(good, no_tok)
    (no_tok / "tokenizer.json").unlink()
    (root / "empty_data").mkdir()
    ok = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5], "loss_mask": [1, 1]}
    (root / "vocab.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "response_ids": [4, 10**6]}) + "\n")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}
    (root / "content.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (chat, chat, bad_chat)))
    summary = {"tasks": {"builtin:mul": {c: 0.5 for c in ("accuracy", "pass@k", "code_use", "code_calls",
                                                             "response_tokens", "truncated")}}}
    summary["average"] = summary["tasks"]["builtin:mul"]
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "wrong_shape.json").write_text(json.dumps({"tasks": [0.5], "average": 0.5}))
    (root / "a_file").write_text("not a run directory\n")
    from minir1ci.inference import lora
    lora.save_adapter(lora.apply_lora(model, 2, 4), root / "orphan_adapter", root / "gone")   # its base missing
    finished = root / "finished_run"
    assert train_script.main([*PRETRAIN, "--steps=2", "--save_every=1", f"--out={finished}"]) == 0
    assert (finished / "latest").is_file() and (finished / "step-000001").is_dir()
    return {"good": good, "bad_types": bad_types, "no_tok": no_tok, "empty": root / "empty_data",
            "vocab": root / "vocab.jsonl", "content": root / "content.jsonl", "summary": root / "summary.json",
            "wrong_shape": root / "wrong_shape.json", "file": root / "a_file", "run": finished,
            "missing": root / "missing", "orphan": root / "orphan_adapter"}


NO_CUDA_7 = pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
TINY_SFT = ["--stage=sft", "--preset=tiny", "--steps=2", "--batch_size=4", "--micro_batch_size=4"]
# (script, arguments, what the one line must name, the directory that must not change).
# {out} is a fresh run directory for train.py; for rollout.py and evaluate.py a folder holding --out.
CASES = {
    "train config.json wrong types": ("train.py", [*TINY_SFT, "--model={bad_types}", "--out={out}"], "hidden_size"),
    "train no tokenizer.json": ("train.py", [*TINY_SFT, "--model={no_tok}", "--out={out}"], "tokenizer.json"),
    "train missing model dir": ("train.py", [*TINY_SFT, "--model={missing}", "--out={out}"], "not found"),
    "train sft_data token outside vocab": ("train.py", [*TINY_SFT, "--model={good}", "--sft_data={vocab}",
                                                         "--out={out}"], "vocab.jsonl:2"),
    "train sft_data non-string content": ("train.py", [*TINY_SFT, "--model={good}", "--sft_data={content}",
                                                        "--out={out}"], "content.jsonl:3"),
    "train sft_data missing": ("train.py", [*TINY_SFT, "--model={good}", "--sft_data={missing}", "--out={out}"],
                               "not found"),
    "train symbench:all empty data": ("train.py", [*TINY_SFT, "--model={good}", "--tasks=symbench:all",
                                                   "--data={empty}", "--out={out}"], "symbench:all"),
    "train grpo symbench:all empty data": ("train.py", ["--stage=grpo", "--preset=tiny", "--model={good}",
                                                        "--tasks=symbench:all", "--data={empty}", "--out={out}"],
                                           "symbench:all"),
    "train grpo no sft run": ("train.py", ["--stage=grpo", "--out={out}"], "no sft checkpoint"),
    "train device cuda:7": ("train.py", [*PRETRAIN, "--device=cuda:7", "--out={out}"], "cuda:7"),
    "train unknown dtype": ("train.py", [*PRETRAIN, "--dtype=fp8", "--out={out}"], "dtype"),
    "train grpo unknown loss_agg": ("train.py", ["--stage=grpo", "--preset=tiny", "--model={good}",
                                                 "--loss_agg=token-sum", "--out={out}"], "loss_agg"),
    "train lora rank larger than a layer": ("train.py", [*TINY_SFT, "--model={good}", "--lora_rank=100",
                                                        "--out={out}"],
                                            "rank 100 exceeds min(in, out) = 64 of model.layers.0.self_attn.k_proj"),
    "train lora unknown target": ("train.py", [*TINY_SFT, "--model={good}", "--lora_rank=2",
                                               "--lora_targets=q_proj,qkv_proj", "--out={out}"], "['qkv_proj']"),
    "train lora adapter without its base": ("train.py", ["--stage=grpo", "--preset=tiny", "--model={orphan}",
                                                         "--lora_rank=2", "--out={out}"], "base model of adapter"),
    "train lora from scratch": ("train.py", [*TINY_SFT, "--lora_rank=2", "--out={out}"], "start checkpoint"),
    "train lora pretrain": ("train.py", [*PRETRAIN, "--lora_rank=2", "--out={out}"], "--stage sft, grpo or ppo"),
    "train merge_lora not an adapter": ("train.py", ["--merge_lora={good}", "--out={out}"], "not a LoRA adapter"),
    "train out is a file": ("train.py", [*PRETRAIN, "--out={file}"], "not a directory"),
    "train re-run without --resume": ("train.py", [*PRETRAIN, "--steps=3", "--out={run}"], "--resume"),
    "rollout config.json wrong types": ("rollout.py", ["--model", "{bad_types}", *SAMPLE, "--out", "{out}/r.jsonl"],
                                        "hidden_size"),
    "rollout no tokenizer.json": ("rollout.py", ["--model", "{no_tok}", *SAMPLE, "--out", "{out}/r.jsonl"],
                                  "tokenizer.json"),
    "rollout max_new_tokens 0": ("rollout.py", ["--model", "{good}", "--tasks", "builtin:mul", "--max_new_tokens",
                                                "0", "--out", "{out}/r.jsonl"], "--max_new_tokens"),
    "rollout n -3": ("rollout.py", ["--model", "{good}", *SAMPLE, "--n", "-3", "--out", "{out}/r.jsonl"], "--n"),
    "rollout top_p 0": ("rollout.py", ["--model", "{good}", *SAMPLE, "--top_p", "0", "--out", "{out}/r.jsonl"],
                        "--top_p"),
    "rollout out in a missing dir": ("rollout.py", ["--model", "{good}", *SAMPLE, "--out", "{out}/no/r.jsonl"],
                                     "does not exist"),
    "rollout symbench:all empty data": ("rollout.py", ["--model", "{good}", "--tasks", "symbench:all", "--data",
                                                       "{empty}", "--out", "{out}/r.jsonl"], "symbench:all"),
    "rollout device cuda:7": ("rollout.py", ["--model", "{good}", *SAMPLE, "--device", "cuda:7", "--out",
                                             "{out}/r.jsonl"], "cuda:7"),
    "evaluate n 0": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--n", "0"], "--n"),
    "evaluate temperature -1": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--temperature", "-1"],
                                "--temperature"),
    "evaluate exec_timeout -5": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--exec_timeout", "-5"],
                                 "--exec_timeout"),
    "evaluate temperature nan": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--temperature", "nan"],
                                 "--temperature"),
    "rollout max_code_calls -1": ("rollout.py", ["--model", "{good}", *SAMPLE, "--max_code_calls", "-1", "--out",
                                                 "{out}/r.jsonl"], "--max_code_calls"),
    "evaluate limit not a number": ("evaluate.py", ["--model", "{good}", "--limit", "many"], "--limit"),
    "evaluate compare wrong shape": ("evaluate.py", ["--compare", "{summary}", "{wrong_shape}"], "wrong_shape.json"),
    "evaluate compare missing file": ("evaluate.py", ["--compare", "{summary}", "{missing}"], "missing"),
    "evaluate device cuda:7": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--device", "cuda:7"], "cuda:7"),
    "evaluate config.json wrong types": ("evaluate.py", ["--model", "{bad_types}", *SAMPLE], "hidden_size"),
    "evaluate out in a missing dir": ("evaluate.py", ["--model", "{good}", *SAMPLE, "--out", "{out}/no/e.json"],
                                      "does not exist"),
    "evaluate adapter without its base": ("evaluate.py", ["--model", "{orphan}", *SAMPLE], "base model of adapter"),
    "evaluate symbench:all empty data": ("evaluate.py", ["--model", "{good}", "--tasks", "symbench:all", "--data",
                                                         "{empty}"], "symbench:all"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=NO_CUDA_7 if "cuda:7" in n else ()) for n in CASES])
def test_bad_command_line_fails_with_one_line_and_writes_nothing(name, inputs, tmp_path):
    script, args, names = CASES[name]
    out = tmp_path / "out"
    if script != "train.py":
        out.mkdir()
    paths = {**inputs, "out": out}
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    watched = [out, inputs["run"], inputs["file"], inputs["good"]]
    before = [listing(p) for p in watched]
    proc = run(script, args, tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert names in lines[0], lines[0]
    assert [listing(p) for p in watched] == before
    if script == "train.py":
        assert not out.exists()       # a fresh --out stays absent


def test_a_second_training_into_a_running_run_dir_is_refused_and_the_lock_dies_with_the_first(tmp_path):
    out = tmp_path / "run"
    first = start("train.py", [*PRETRAIN, "--steps=100000", "--save_every=1000", f"--out={out}"], tmp_path)
    try:
        wait_for(lambda: len(metrics_steps(out)) >= 2, first)
        second = run("train.py", [*PRETRAIN, "--steps=2", "--resume", f"--out={out}"], tmp_path)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"(pid {first.pid}) is writing to {out}" in second.stderr
        assert first.poll() is None                                  # the first goes on, untouched
    finally:
        first.kill()                                                 # a crash: no cleanup runs
        first.communicate()
    third = run("train.py", [*PRETRAIN, "--steps=2", "--save_every=1", "--resume", f"--out={out}"], tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert metrics_steps(out) == [0, 1]         # the killed run had no checkpoint: started over, its lines dropped
    # a finished run's lock is free too: a third process can take it at once
    fourth = run("train.py", [*PRETRAIN, "--steps=3", "--save_every=1", "--resume", f"--out={out}"], tmp_path)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert metrics_steps(out) == [0, 1, 2]


def test_rerun_without_resume_is_refused_and_deletes_nothing(inputs, tmp_path):
    run_dir = inputs["run"]
    before = listing(run_dir)
    rc = train_script.main([*PRETRAIN, "--steps=2", f"--out={run_dir}"])
    assert rc == 1
    assert listing(run_dir) == before
    assert metrics_steps(run_dir) == [0, 1] and (run_dir / "step-000001").is_dir()


def test_ctrl_c_reports_the_step_and_the_checkpoint_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start("train.py", [*PRETRAIN, "--steps=100000", "--save_every=2", f"--out={out}"], tmp_path)
    try:
        wait_for(lambda: (out / "latest").is_file() and len(metrics_steps(out)) >= 3, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); last checkpoint (step-\d+); resume with --resume", last_line)
    assert match, err[-2000:]
    assert int(match[1]) == metrics_steps(out)[-1] + 1                  # the step that was running
    assert match[2] == (out / "latest").read_text().strip()             # what --resume continues from
    assert not list(out.glob(".step-*.tmp-*"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing, on purpose
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run_at_the_step_end(tmp_path):
    """Python drops a KeyboardInterrupt raised while a finalizer runs ("Exception ignored in ..."):
    the run must stop at the end of the step all the same, not train on."""
    from minir1ci.training import progress

    class RaisesInsideFinalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):   # the handler runs here, inside __del__, and its exception is dropped
                pass

    previous = signal.getsignal(signal.SIGINT)
    try:
        progress.catch_interrupts()
        RaisesInsideFinalizer()          # collected at once: the interrupt is swallowed
        log = progress.MetricsLog(tmp_path, total_steps=10, resume=False)
        with pytest.raises(KeyboardInterrupt):
            log.log(3, {"loss": 1.0})
        assert not (tmp_path / "metrics.jsonl").exists() and progress.RUN.last_step != 3
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.RUN.interrupted = False


def test_stale_save_directories_are_deleted_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    assert train_script.main([*PRETRAIN, "--steps=1", "--save_every=1", f"--out={out}"]) == 0
    stale = out / ".step-000003.tmp-k1ll3d"           # what a process killed inside save_pretrained leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (out / "latest.tmp").write_text("step-000003\n")
    keep = out / ".not-a-save"
    keep.mkdir()
    assert train_script.main([*PRETRAIN, "--steps=2", "--save_every=1", "--resume", f"--out={out}"]) == 0
    assert not stale.exists() and not (out / "latest.tmp").exists() and keep.is_dir()
    assert metrics_steps(out) == [0, 1]


def test_a_failed_start_leaves_no_run_directory(inputs, tmp_path):
    """In-process as the trainers are called by tests and the demo: a bad input raises before any write."""
    out = tmp_path / "run"
    assert train_script.main([*TINY_SFT, f"--model={inputs['good']}", f"--sft_data={inputs['vocab']}",
                              f"--out={out}"]) == 1
    assert train_script.main([*TINY_SFT, f"--model={inputs['good']}", "--max_seq_len=8", f"--out={out}",
                              "--tasks=builtin:mul"]) == 1
    assert not out.exists()
