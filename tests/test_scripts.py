"""rollout.py and evaluate.py end to end on CPU with a tiny random model, and prefix sharing in rollouts."""
import json
import os
from pathlib import Path

import pytest

import evaluate as evaluate_script
import rollout as rollout_script
from minir1ci.inference import checkpoint
from minir1ci.inference.engine import Sampler
from minir1ci.env.interpreter import RolloutParams, run_rollouts
from minir1ci.presets import tiny_dir
from minir1ci.env.sandbox import Sandbox

KEYS = {"prompt_ids", "response_ids", "loss_mask", "logprobs", "reward", "task", "id", "num_code_calls",
        "finish_reason", "text"}
DATA = Path(os.environ.get("MINIR1CI_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model, tok = checkpoint.init_from_config(tiny_dir(), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_pretrained(model, tok, path)
    return path


def test_rollout_script_writes_valid_jsonl(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = rollout_script.main(["--model", str(tiny_ckpt), "--tasks", "builtin:mul,builtin:letters", "--n", "2",
                              "--limit", "2", "--max_new_tokens", "24", "--out", str(out), "--exec_timeout", "2"])
    assert rc == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2                       # tasks x questions x samples
    for rec in lines:
        assert KEYS <= rec.keys()
        assert len(rec["response_ids"]) == len(rec["loss_mask"]) == len(rec["logprobs"]) <= 24
        assert rec["finish_reason"] in ("eos", "answer", "max_code_calls", "length")
        assert all(lp <= 0.0 for lp in rec["logprobs"])
    assert lines[0]["prompt_ids"] == lines[1]["prompt_ids"] and lines[0]["id"] == lines[1]["id"]
    summary = capsys.readouterr().out
    assert "tokens/s" in summary and "code calls" in summary and "accuracy" in summary


def test_rollout_reward_plain_is_correctness_alone(tiny_ckpt, tmp_path):
    """--reward_plain reaches the reward: 1.0 for a correct trajectory, 0.0 otherwise (no format terms)."""
    out = tmp_path / "r.jsonl"
    assert rollout_script.main(["--model", str(tiny_ckpt), "--tasks", "builtin:mul", "--n", "2", "--limit", "2",
                                "--max_new_tokens", "16", "--out", str(out), "--exec_timeout", "2",
                                "--reward_plain"]) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 4 and all(rec["reward"] == float(rec["score"] >= 1.0) for rec in lines)


def test_group_samples_share_the_prompt_pages(tiny_ckpt):
    model, tok = checkpoint.load_pretrained(tiny_ckpt)
    sampler = Sampler(model, tok, kv_cache_bytes=64 << 20)
    cached = []
    allocate = sampler.block_manager.allocate

    def spy(seq):
        fresh = not seq.block_table
        ok = allocate(seq)
        if ok and fresh:
            cached.append(seq.num_cached)
        return ok

    sampler.block_manager.allocate = spy
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True)
    with Sandbox(timeout=2.0) as sb:
        trajs = run_rollouts(model, tok, sb, [prompt], 3, RolloutParams(max_new_tokens=8), sampler=sampler)
    full = (len(prompt) // sampler.block_manager.block_size) * sampler.block_manager.block_size
    assert len(trajs) == 3 and full > 0
    assert cached[0] == 0 and cached[1:] == [full, full]   # samples 2 and 3 reuse the prompt's pages


def test_evaluate_script_writes_table_and_json(tiny_ckpt, tmp_path, capsys):
    spec = "builtin:mul,builtin:sort"
    if (DATA / "bbh").is_dir():
        spec += ",bbh:navigate"
    out = tmp_path / "eval.json"
    rc = evaluate_script.main(["--model", str(tiny_ckpt), "--tasks", spec, "--split", "all", "--data", str(DATA),
                               "--limit", "2", "--max_new_tokens", "16", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    names = {t.strip() for t in spec.split(",")}
    assert set(res["tasks"]) == names
    for m in res["tasks"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["questions"] == 2 and m["truncated"] <= 1.0
    assert res["average"]["accuracy"] == pytest.approx(sum(m["accuracy"] for m in res["tasks"].values()) / len(names))
    table = capsys.readouterr().out
    assert "AVERAGE" in table and "builtin:mul" in table
    rc = evaluate_script.main(["--compare", str(out), str(out)])
    assert rc == 0 and "+0.000" in capsys.readouterr().out


def test_evaluate_reports_a_bad_model_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_script.main(["--model", str(tmp_path / "missing"), "--tasks", "builtin:mul", "--limit", "1"])
    assert exc.value.code == 1
    assert capsys.readouterr().err == f"evaluate.py: error: checkpoint directory not found: {tmp_path / 'missing'}\n"


class Crash(Exception):
    pass


def test_rollout_writes_each_trajectory_as_it_finishes(tiny_ckpt, tmp_path, monkeypatch):
    """A crash after three trajectories keeps exactly those three lines, each whole."""
    from minir1ci.env import interpreter
    real, finished = interpreter._finish, []

    def finish_then_crash(tr, *a, **k):
        if len(finished) == 3:
            raise Crash
        real(tr, *a, **k)
        finished.append(tr)

    monkeypatch.setattr(interpreter, "_finish", finish_then_crash)
    out = tmp_path / "r.jsonl"
    with pytest.raises(Crash):
        rollout_script.main(["--model", str(tiny_ckpt), "--tasks", "builtin:mul", "--n", "4", "--limit", "2",
                             "--max_new_tokens", "24", "--out", str(out), "--exec_timeout", "2"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["response_ids"] for l in lines] == [tr.response_ids for tr in finished]
    assert all(KEYS <= l.keys() for l in lines)


@pytest.mark.parametrize("body", ["import sys; print('args', sys.argv[1:]); print('err', file=sys.stderr)",
                                  "import sys; print('partial'); sys.exit(3)",
                                  "import sys; sys.exit('script.py: error: a message')",
                                  "raise ValueError('boom')",
                                  "import sys; print(__name__, sys.path[0] == __file__.rsplit('/', 1)[0])"])
def test_demo_jobs_run_in_a_fork_as_python_runs_them(body, tmp_path):
    """demo.py starts each stage in a fork of its own process (torch imported once): the exit status and
    the output are those of `python script args` (a traceback's frames aside)."""
    import subprocess
    import sys
    import demo
    script = tmp_path / "script.py"
    script.write_text(body + "\n")
    want = subprocess.run([sys.executable, str(script), "--a=1", "b"], capture_output=True, text=True)
    pid = demo.fork_job([str(script), "--a=1", "b"], tmp_path / "job.log")
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    got = (tmp_path / "job.log").read_text()
    assert status == want.returncode
    if "raise" in body:
        assert got.strip().splitlines()[-1] == want.stderr.strip().splitlines()[-1] == "ValueError: boom"
    else:
        assert sorted(got.splitlines()) == sorted((want.stdout + want.stderr).splitlines())


def test_demo_evaluates_a_checkpoint_of_the_same_bytes_once(tiny_ckpt, tmp_path, monkeypatch):
    """demo.evaluate keeps each result under the digest of the checkpoint's files too: another run's
    checkpoint of the same bytes (a cold-start RL run that never updated) reads it; other weights, or
    the same weights without code, are evaluated."""
    import shutil

    import demo
    from minir1ci.env import evaluation

    calls = []

    def fake_evaluate(model, tok, sandbox, examples, n, params):
        calls.append((n, params.use_code))
        return {"average": {"accuracy": len(calls) / 10}}, []

    monkeypatch.setattr(evaluation, "evaluate_examples", fake_evaluate)
    a, b, c = (tmp_path / "out" / run / "step-000029" for run in ("pretrain", "abl-cold-s0", "abl-cold-s1"))
    shutil.copytree(tiny_ckpt, a)
    shutil.copytree(tiny_ckpt, b)
    model, tok = checkpoint.init_from_config(tiny_dir(), seed=1)
    checkpoint.save_pretrained(model, tok, c)
    first = demo.evaluate(a, True, 2, "sampled")
    assert calls == [(3, True)] and first["sampled"]["average"]["accuracy"] == 0.1
    assert demo.evaluate(b, True, 2, "sampled") == first and len(calls) == 1        # same bytes: read
    assert demo.evaluate(c, True, 2, "sampled")["sampled"]["average"]["accuracy"] == 0.2   # other weights
    assert demo.evaluate(b, False, 2, "sampled")["sampled"]["average"]["accuracy"] == 0.3  # no code
    assert demo.evaluate(a, True, 2, "sampled") == first and len(calls) == 3
    # LoRA checkpoints hold only their adapters (their other files would all hash alike): two seeds' adapters
    # are two evaluations, and an adapter whose base changed is evaluated again
    import torch

    from minir1ci.inference import lora
    base = tmp_path / "out" / "sft-teacher" / "step-000399"
    shutil.copytree(tiny_ckpt, base)
    adapters = [tmp_path / "out" / f"abl-lora-s{seed}" / "step-000029" for seed in (0, 1)]
    for seed, path in enumerate(adapters):
        torch.manual_seed(seed)
        m = lora.apply_lora(checkpoint.init_from_config(tiny_dir(), seed=0)[0], 2, 4)
        for layer in lora.lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_B.weight)
        lora.save_adapter(m, path, base)
    acc = [demo.evaluate(p, True, 2, "sampled")["sampled"]["average"]["accuracy"] for p in adapters]
    assert acc == [0.4, 0.5] and len(calls) == 5
    (adapters[0] / "demo-eval-2-sampled.json").unlink()
    shutil.copy(c / "model.safetensors", base / "model.safetensors")
    assert demo.evaluate(adapters[0], True, 2, "sampled")["sampled"]["average"]["accuracy"] == 0.6
    assert not list((tmp_path / "out" / "evals").glob("*.tmp*"))


def test_ablation_runs_are_valid_commands_whose_seeds_share_questions_and_measurements(tmp_path):
    """Every ablation run's arguments are a train.py command line; a row's two seeds train on seed 0's
    questions (one curriculum measurement per start, dtype and sample count), and each measurement is
    made by a seed-0 run that starts before every run reading it."""
    import ablations
    from minir1ci.config import resolve
    runs = ablations.ablation_runs(tmp_path, ablations.ABLATIONS)
    assert len(runs) == 2 * len(ablations.ABLATIONS)
    order = ablations.job_order(runs, tmp_path)
    assert sorted(map(str, order)) == sorted(map(str, runs))
    first = {}   # a measurement's key -> the seed of the run that makes it
    for key, seed, run, args in order:
        if not args:   # the demo's GRPO and PPO, seed 0
            assert key in ("grpo", "ppo") and seed == 0
            continue
        cfg = resolve(args)
        assert (cfg.seed, cfg.questions_seed(), cfg.steps) == (seed, 0, 30) and cfg.out == str(run)
        if cfg.curriculum:
            first.setdefault((cfg.model, cfg.questions_seed(), cfg.rollout_dtype, cfg.curriculum_samples), seed)
    assert len(first) == 6 and set(first.values()) == {0}   # no seed-1 run measures
    # The jobs: each run trained once (but the demo's), evaluated once, every evaluation after every training
    # job (the short jobs last), and each waiting only for jobs in the list.
    jobs = ablations.ablation_jobs(tmp_path, ablations.ABLATIONS, runs, 100)
    names = [name for name, _, _ in jobs]
    trains = [n for n in names if not n.startswith("eval-")]
    assert len(set(names)) == len(names) and names == trains + [n for n in names if n.startswith("eval-")]
    assert set(trains) == {r.name for _, _, r, a in runs if a} | {"sft-teacher-0.7", "sft-teacher-s1", "sft-oracle-s1"}
    evaluated = {r.name for *_, r, _ in runs} | set(trains) - {"sft-teacher-0.7"}
    assert set(names) - set(trains) == {f"eval-{n}" for n in evaluated}
    assert all(after <= set(trains) for _, _, after in jobs)
    assert dict((n, a) for n, _, a in jobs)["abl-mix-0.7-s1"] == {"sft-teacher-0.7"}


def test_sft_seed_jobs_vary_only_the_sft_seed(tmp_path):
    """`demo.py --sft_seeds`: per seed, a teacher and an oracle SFT with that seed (the same commands as the
    ablations' seed-1 SFT runs, so either reuses the other's), GRPO and PPO from that teacher with the
    demo's RL seed and questions; seed 0 is the demo's runs, trained by nothing here; evaluations last."""
    import ablations
    import sft_seeds
    from minir1ci.config import resolve
    jobs = sft_seeds.seed_jobs(tmp_path, [0, 1, 2], 100)
    names = [n for n, _, _ in jobs]
    trains = [n for n in names if not n.startswith("eval-")]
    assert names[:len(trains)] == trains and len(set(names)) == len(names)
    assert set(trains) == {f"{r}-s{s}" for r in ("sft-teacher", "sft-oracle", "grpo-teacher", "ppo-teacher")
                           for s in (1, 2)}
    assert set(names) - set(trains) == {f"eval-{n}" for n in trains}
    for name, cmd, after in jobs[:len(trains)]:
        cfg = resolve(cmd[1:-1])   # train.py's arguments, without the script and --threads
        seed = int(name[-1])
        assert cfg.out == str(tmp_path / name) and cfg.steps in (400, 30)
        if cfg.stage == "sft":
            assert (cfg.seed, cfg.questions_seed()) == (seed, seed) and after == set()
            assert cfg.text_fraction == (0.4 if "teacher" in name else 0.0)
        else:
            assert cfg.stage == name.split("-")[0] and (cfg.seed, cfg.questions_seed()) == (0, 0)
            assert cfg.model == str(tmp_path / f"sft-teacher-s{seed}") and after == {f"sft-teacher-s{seed}"}
    abl = {n: c for n, c, _ in ablations.ablation_jobs(tmp_path, ablations.ABLATIONS, [], 100)}
    assert all(abl[n] == c for n, c, _ in jobs if n in ("sft-teacher-s1", "sft-oracle-s1"))
    assert sft_seeds.seed_runs(tmp_path, 0) == {r: tmp_path / r for r in ("sft-teacher", "grpo", "ppo", "sft-oracle")}
