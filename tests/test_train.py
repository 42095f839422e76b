"""train.py end to end on CPU with the tiny preset: SFT, then GRPO and PPO from its checkpoint;
resuming an interrupted run reproduces the uninterrupted metrics; bad runs stop cleanly."""
import dataclasses
import json

import pytest

import train as train_script
from minir1ci.training import rl, sft, runs
from minir1ci.config import resolve

TINY = ["--max_seq_len=320", "--num_train_examples=16", "--batch_size=4", "--micro_batch_size=2", "--save_every=2",
        "--warmup_steps=1", "--tasks=builtin:mul,builtin:letters"]
RL = ["--prompts_per_step=2", "--n_samples=2", "--batch_size=4", "--micro_batch_size=2", "--max_new_tokens=24",
      "--save_every=2", "--exec_timeout=2", "--tasks=builtin:mul,builtin:letters",
      "--num_train_examples=8"]   # the tiny preset's curriculum measures every training question first


def metrics(run) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("tok_s", "step_s", "rollout_s", "passes_s", "update_s")} for r in rows]


class Interrupt(Exception):
    pass


def run_interrupted(cfg, runner, monkeypatch, after_saves: int = 1):
    """Run until `after_saves` checkpoints are written, then die as a killed process would."""
    real = runs.save_run_checkpoint
    count = {"n": 0}

    def save_then_die(*a, **k):
        out = real(*a, **k)
        count["n"] += 1
        if count["n"] == after_saves:
            raise Interrupt
        return out

    for mod in (sft, rl):
        monkeypatch.setattr(mod, "save_run_checkpoint", save_then_die)
    with pytest.raises(Interrupt):
        runner(cfg)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert train_script.main(["--stage=sft", "--steps=4", f"--out={out}", *TINY]) == 0
    return out


def test_copy_corpus_trains_exactly_the_copies():
    from minir1ci.training.data import copy_corpus
    from minir1ci.inference.tokenizer import Tokenizer
    from minir1ci.presets import tiny_dir

    tok = Tokenizer.from_pretrained(tiny_dir())
    samples = copy_corpus(tok, 20, seed=3, min_len=60)
    assert [s.ids for s in samples] == [s.ids for s in copy_corpus(tok, 20, seed=3, min_len=60)]
    assert samples[0].ids != copy_corpus(tok, 1, seed=4, min_len=60)[0].ids
    newline = tok.encode("\n")
    for s in samples:
        assert len(s.ids) >= 60 and len(s.mask) == len(s.ids)
        text = tok.decode(s.ids)
        lines = text.split("\n")[:-1]
        assert len(lines) % 2 == 0 and all(a == b for a, b in zip(lines[::2], lines[1::2]))
        # the trained tokens are exactly the second copy of each line, with its newline
        trained = tok.decode([t for t, m in zip(s.ids, s.mask) if m])
        assert trained == "".join(b + "\n" for b in lines[1::2])
        assert s.ids[-len(newline):] == newline


def test_text_fraction_mixes_text_answers_under_the_code_prompt():
    from minir1ci.training.data import oracle_samples
    from minir1ci.presets import tiny_dir
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_dir())
    examples = load_tasks("builtin:mul,builtin:date", split="train", limit=100, seed=0)
    code = oracle_samples(examples, tok, use_code=True)
    text = oracle_samples(examples, tok, use_code=False)
    mixed = oracle_samples(examples, tok, use_code=True, text_fraction=0.4, seed=5)
    assert [s.ids for s in mixed] == [s.ids for s in oracle_samples(examples, tok, True, 0.4, 5)]
    assert [s.ids for s in mixed] != [s.ids for s in oracle_samples(examples, tok, True, 0.4, 6)]
    n_text = 0
    for ex, c, t, m in zip(examples, code, text, mixed):
        prompt_len = c.mask.index(1)                   # the code prompt, as in every code sample
        assert m.ids[:prompt_len] == c.ids[:prompt_len]
        if m.ids == c.ids:
            continue
        n_text += 1                                    # the text-only answer, after the code prompt
        answer = tok.decode([i for i, k in zip(m.ids, m.mask) if k])
        assert answer.startswith(ex.oracle.text_only) and "```" not in answer
        assert tok.decode([i for i, k in zip(t.ids, t.mask) if k]) == answer
    assert 60 <= n_text <= 100                          # 40% of 200 questions, binomial sd ~7
    assert [s.ids for s in oracle_samples(examples, tok, True, 1.0)] != [s.ids for s in text]  # prompts differ


def test_pretrain_stage_then_sft_from_it(tmp_path, capsys):
    pre = tmp_path / "pretrain"
    assert train_script.main(["--stage=pretrain", "--steps=2", f"--out={pre}", "--num_train_examples=8",
                              "--batch_size=4", "--micro_batch_size=4", "--save_every=2"]) == 0
    assert json.loads((pre / "config.json").read_text())["stage"] == "pretrain"
    start = runs.latest_checkpoint(pre)
    out = tmp_path / "sft"
    assert train_script.main(["--stage=sft", "--steps=1", f"--model={start}", "--preset=tiny", f"--out={out}",
                              *TINY]) == 0
    assert metrics(out)[0]["loss"] > 0
    # without --model, SFT finds the pretrain run beside its own run directory
    capsys.readouterr()
    assert train_script.main(["--stage=sft", "--steps=1", f"--out={tmp_path / 'sft2'}", *TINY]) == 0
    assert f"from {start}" in capsys.readouterr().out
    assert metrics(tmp_path / "sft2")[0]["loss"] == metrics(out)[0]["loss"]


def test_pretrain_refuses_the_paper_preset():
    with pytest.raises(ValueError, match="pretrained already"):
        resolve(["--stage=pretrain", "--preset=paper"])


def test_sft_runs_and_writes_a_loadable_checkpoint(sft_run):
    from minir1ci.inference.checkpoint import load_pretrained
    rows = metrics(sft_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((sft_run / "config.json").read_text())["stage"] == "sft"
    model, tok = load_pretrained(runs.latest_checkpoint(sft_run))
    assert model.num_params() > 5e5 and tok is not None


def test_sft_resume_reproduces_the_uninterrupted_metrics(sft_run, tmp_path, monkeypatch):
    cfg = resolve(["--stage=sft", "--steps=4", f"--out={tmp_path / 'sft'}", *TINY])
    run_interrupted(cfg, sft.train_sft, monkeypatch)
    assert [r["step"] for r in metrics(tmp_path / "sft")] == [0, 1]
    sft.train_sft(dataclasses.replace(cfg, resume=True))
    assert comparable(metrics(tmp_path / "sft")) == comparable(metrics(sft_run))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_stages_run_from_the_sft_checkpoint_and_resume_exactly(stage, sft_run, tmp_path, monkeypatch):
    runner = rl.train_rl
    start = runs.latest_checkpoint(sft_run)
    args = [f"--stage={stage}", "--steps=4", f"--model={start}", "--preset=tiny", *RL]
    full = tmp_path / "full"
    runner(resolve(args + [f"--out={full}"]))
    rows = metrics(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["response_len"] > 0
        assert all(v == v for v in r.values() if isinstance(v, float))      # no NaN
    if stage == "grpo":
        assert rows[0]["mismatch_abs"] < 1e-3                                 # sampler and trainer agree
    cfg = resolve(args + [f"--out={tmp_path / 'cut'}"])
    run_interrupted(cfg, runner, monkeypatch)
    runner(dataclasses.replace(cfg, resume=True))
    assert comparable(metrics(tmp_path / "cut")) == comparable(rows)


def test_rl_resume_regularises_towards_the_recorded_start_and_logs_every_nth_step(sft_run, tmp_path, monkeypatch):
    """GRPO started without --model records the SFT checkpoint it found; SFT then trains on, and the
    resumed GRPO run keeps that checkpoint as its KL reference (not SFT's newest). --log_every=2 writes
    steps 0 and 2 and the last."""
    import shutil
    import torch
    from minir1ci.inference.checkpoint import load_model

    sft = tmp_path / "runs" / "sft"
    shutil.copytree(sft_run, sft)
    start = runs.latest_checkpoint(sft)
    grpo = tmp_path / "runs" / "grpo"
    args = ["--stage=grpo", "--preset=tiny", "--log_every=2", f"--out={grpo}", *RL]
    rl.train_rl(resolve([*args, "--steps=3"]))
    assert [r["step"] for r in metrics(grpo)] == [0, 2]
    assert json.loads((grpo / "config.json").read_text())["model"] == str(start)
    assert train_script.main(["--stage=sft", "--steps=6", "--resume", f"--out={sft}", *TINY]) == 0
    assert runs.latest_checkpoint(sft) != start                        # SFT has moved on
    refs = []
    real = rl.frozen_reference
    monkeypatch.setattr(rl, "frozen_reference", lambda *a: refs.append(real(*a)) or refs[-1])
    rl.train_rl(resolve([*args, "--steps=5", "--resume"]))
    assert [r["step"] for r in metrics(grpo)] == [0, 2, 4]
    want = load_model(start).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in refs[0].state_dict().items())
    assert json.loads((grpo / "config.json").read_text())["model"] == str(start)
    with pytest.raises(ValueError, match="started from"):                # a resume cannot change its start
        rl.train_rl(resolve([*args, "--steps=6", "--resume", f"--model={runs.latest_checkpoint(sft)}"]))
    # nor its seeds: the steps' seed, or the questions' (the same questions under another name resume)
    with pytest.raises(ValueError, match="was trained with --seed=0"):
        rl.train_rl(resolve([*args, "--steps=6", "--resume", "--seed=1"]))
    with pytest.raises(ValueError, match="was trained on the questions of --data_seed=0"):
        rl.train_rl(resolve([*args, "--steps=6", "--resume", "--data_seed=2"]))
    rl.train_rl(resolve([*args, "--steps=6", "--resume", "--data_seed=0"]))
    assert [r["step"] for r in metrics(grpo)] == [0, 2, 4, 5]


def test_model_may_name_a_run_directory_whose_newest_checkpoint_starts_the_run(sft_run, tmp_path):
    start, resumed = runs.start_source(resolve(["--stage=grpo", f"--model={sft_run}", f"--out={tmp_path / 'g'}"]))
    assert (start, resumed) == (str(runs.latest_checkpoint(sft_run)), None)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "latest").write_text("step-000009\n")
    with pytest.raises(FileNotFoundError, match="without a complete checkpoint"):
        runs.start_source(resolve(["--stage=grpo", f"--model={empty}", f"--out={tmp_path / 'g2'}"]))


def test_sft_on_tasks_without_oracle_code_is_refused_before_anything_is_written(tmp_path, capsys):
    from minir1ci.env.tasks import gym
    if not gym.available():
        pytest.skip("reasoning-gym (minir1ci[gym]) not installed")
    out = tmp_path / "sft"
    assert train_script.main(["--stage=sft", "--tasks=builtin:mul,gym:basic_arithmetic", "--num_train_examples=2",
                              f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert "gym:basic_arithmetic have no oracle code trajectories" in err and "--sft_data" in err
    assert not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = sft.sft_step_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, n = real(*a, **k)
        return (float("nan") if calls["n"] > 4 else loss), n      # steps 0-1 fine (2 micro-batches each)

    monkeypatch.setattr(sft, "sft_step_loss", poisoned)
    out = tmp_path / "bad"
    rc = train_script.main(["--stage=sft", "--steps=4", f"--out={out}", *TINY])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step-000001" in err
    assert runs.latest_checkpoint(out).name == "step-000001"


def test_unknown_options_and_missing_data_are_refused(tmp_path, capsys):
    assert train_script.main(["--stage=sft", "--lerning_rate=1"]) == 2
    assert "unknown option --lerning_rate" in capsys.readouterr().err
    assert train_script.main(["--stage=sft", f"--sft_data={tmp_path / 'none.jsonl'}", f"--out={tmp_path}"]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert train_script.main(["--stage=sft", f"--sft_data={bad}", f"--out={tmp_path / 'o'}"]) == 1
    assert f"{bad}:2" in capsys.readouterr().err


def test_sft_on_rollouts_keeps_only_the_trajectories_at_the_reward_floor(tmp_path, capsys):
    """Rejection sampling: `--sft_data rollouts.jsonl --sft_min_reward 1` trains on the lines of
    rollout.py's format whose reward reaches 1, with their loss masks; the others never enter."""
    rows = [{"task": "builtin:mul", "id": f"q{i}", "prompt_ids": [5, 6, 7], "response_ids": [10 + i, 20 + i, 30 + i],
             "loss_mask": [1, 0, 1], "logprobs": [-1.0, 0.0, -1.0], "reward": r, "score": float(r >= 1)}
            for i, r in enumerate([1.1, 0.9, -0.1, 1.0])]
    data = tmp_path / "rollouts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--stage=sft", f"--sft_data={data}", *TINY]
    samples, dropped = sft.build_samples(resolve([*args, "--sft_min_reward=1"]), tokenizer=None)
    assert [s.ids for s in samples] == [[5, 6, 7, 10, 20, 30], [5, 6, 7, 13, 23, 33]]
    assert [s.mask for s in samples] == [[0, 0, 0, 1, 0, 1]] * 2 and dropped == 0
    assert len(sft.build_samples(resolve(args), tokenizer=None)[0]) == 4      # no floor: every line
    assert train_script.main([*args, "--sft_min_reward=1", "--steps=2", f"--out={tmp_path / 'sft'}"]) == 0
    assert runs.latest_checkpoint(tmp_path / "sft").name == "step-000001"
    capsys.readouterr()
    assert train_script.main([*args, "--sft_min_reward=2", "--steps=2", f"--out={tmp_path / 'none'}"]) == 1
    assert capsys.readouterr().err.strip() == f"train.py: error: {data}: no training samples"
    with pytest.raises(ValueError, match="--sft_min_reward applies only to --stage sft with --sft_data"):
        resolve(["--stage=grpo", "--sft_min_reward=1"])


def test_data_seed_draws_the_questions_and_seed_the_rest(monkeypatch, tmp_path):
    """Seeds over one fixed dataset (the ablations' two seeds): `--data_seed` picks the training
    questions (and for SFT which get the teacher's text answer), `--seed` everything else; -1 is --seed."""
    from minir1ci.inference.tokenizer import Tokenizer
    from minir1ci.presets import tiny_dir
    tok = Tokenizer.from_pretrained(tiny_dir())
    ids = lambda *argv: [s.ids for s in sft.build_samples(resolve(["--stage=sft", *TINY, "--text_fraction=0.5",
                                                                    *argv]), tok)[0]]
    assert ids("--seed=1", "--data_seed=0") == ids("--seed=0") == ids("--seed=5", "--data_seed=0")
    assert ids("--seed=1") == ids("--seed=0", "--data_seed=1") != ids("--seed=0")
    with pytest.raises(ValueError, match=r"data_seed must lie in \[-1, inf\)"):
        resolve(["--stage=grpo", "--data_seed=-2"])

    seen = []

    def questions(*args, seed, **kw):   # the RL run asks for its training questions, then stops here
        seen.append(seed)
        raise KeyboardInterrupt

    from minir1ci.inference.checkpoint import init_from_config, save_pretrained
    save_pretrained(*init_from_config(tiny_dir(), seed=0), tmp_path / "start")
    monkeypatch.setattr(rl, "load_tasks", questions)
    for argv, want in ((["--seed=1", "--data_seed=0"], 0), (["--seed=1"], 1), (["--seed=0", "--data_seed=3"], 3)):
        with pytest.raises(KeyboardInterrupt):
            rl.train_rl(resolve(["--stage=grpo", "--preset=tiny", *RL, f"--model={tmp_path / 'start'}",
                                 f"--out={tmp_path / str(len(seen))}", *argv]))
        assert seen[-1] == want


def test_metrics_keep_six_significant_digits(tmp_path):
    """metrics.jsonl keeps small values (a bf16 sampler's mismatch KL is ~1e-7 on a CPU with bf16 units), not
    6 decimals that log them as 0."""
    from minir1ci.training import progress
    progress.RUN.last_step = -1
    log = progress.MetricsLog(tmp_path, total_steps=1, resume=False)
    log.log(0, {"mismatch_kl": 1.234567891e-7, "loss": 2.718281828, "count": 3})
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec == {"step": 0, "mismatch_kl": 1.23457e-7, "loss": 2.71828, "count": 3}
