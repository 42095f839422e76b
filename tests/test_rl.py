"""The RL loop's own pieces: dynamic sampling's refill, the trajectory filters, and GRPO and PPO end
to end with every new option on (two steps, then a resume for a third) on the tiny preset, CPU."""
import dataclasses
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from minir1ci.training import experience, rl
from minir1ci.config import resolve
from minir1ci.env.interpreter import Trajectory
from minir1ci.training.losses import grpo_advantages

MISMATCH = ("mismatch_kl", "mismatch_abs", "mismatch_frac_out", "tis_weight_mean", "mis_dropped")
FILTERS = ("void_dropped", "truncated_dropped", "ds_dropped_groups", "ds_extra_rounds")


def traj(text: str, turns=None, finish="eos", logps=(-1.0, -1.0)) -> Trajectory:
    return Trajectory(prompt_ids=[1, 2], response_ids=[5] * len(logps), loss_mask=[1] * len(logps),
                      logprobs=list(logps), turns=[text] if turns is None else turns, finish_reason=finish, text=text)


# ----------------------------------------------------------------------------- dynamic sampling

def fake_rounds(monkeypatch, flat_by_round: list[list[bool]]):
    """Round r's group g has equal rewards when flat_by_round[r][g]; a trajectory's text names its
    round, group and sample, and ends in 'right' (score 1) or 'wrong' (score 0)."""
    calls = []

    def sample(model, tokenizer, sandbox, prompts, n, params, dtype=None):
        r = len(calls)
        calls.append(params.seed)
        return [traj(f"r{r}g{g}s{j} " + ("wrong" if flat_by_round[r][g] or j else "right"))
                for g in range(len(prompts)) for j in range(n)]

    monkeypatch.setattr(experience, "run_rollouts", sample)
    monkeypatch.setattr(experience, "prompt_ids", lambda tok, exs, use_code: [[0] for _ in exs])
    return calls


EXAMPLES = [SimpleNamespace(score=lambda text: float(text.endswith("right")))] * 6


def run_collect(rounds: int | None, cfg_args=()):
    cfg = resolve(["--stage=grpo", "--prompts_per_step=2", "--n_samples=2", *cfg_args])
    if rounds is not None:
        cfg = dataclasses.replace(cfg, dynamic_sampling=True, dynamic_sampling_rounds=rounds)
    trajs, batch, counts = experience.collect(torch.nn.Linear(1, 1), None, None, EXAMPLES, cfg, step=0)
    return [t.text.split()[0] for t in trajs], batch, counts["ds_dropped_groups"], counts["ds_extra_rounds"]


def test_dynamic_sampling_refills_the_batch_from_extra_rounds(monkeypatch):
    calls = fake_rounds(monkeypatch, [[True, False], [False, False]])
    names, batch, dropped, extra = run_collect(rounds=3)
    # round 0: group 0 flat (set aside), group 1 kept; round 1 fills the second place; no round 2
    assert names == ["r0g1s0", "r0g1s1", "r1g0s0", "r1g0s1"]
    assert (dropped, extra, len(calls)) == (1, 1, 2)
    assert len(set(calls)) == 2                                   # each round samples with its own seed
    assert batch.scores.tolist() == pytest.approx([0.9, -0.1, 0.9, -0.1])   # right / wrong, both malformed
    assert batch.correct.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_dynamic_sampling_tops_up_with_flat_groups_when_the_rounds_run_out(monkeypatch):
    calls = fake_rounds(monkeypatch, [[True, True]] * 3)
    names, batch, dropped, extra = run_collect(rounds=2)
    assert names == ["r0g0s0", "r0g0s1", "r0g1s0", "r0g1s1"]     # the first flat groups fill the batch
    assert (dropped, extra, len(calls)) == (4, 2, 3)              # 6 flat groups sampled, 2 used
    assert torch.equal(grpo_advantages(batch.scores, 2), torch.zeros(4))


def test_without_dynamic_sampling_flat_groups_stay_and_one_round_runs(monkeypatch):
    calls = fake_rounds(monkeypatch, [[True, False]])
    names, _, dropped, extra = run_collect(rounds=None)
    assert names == ["r0g0s0", "r0g0s1", "r0g1s0", "r0g1s1"] and (dropped, extra, len(calls)) == (0, 0, 1)


def test_training_scores_the_models_turns_not_the_inserted_output(monkeypatch):
    """A trajectory whose inserted output ends in 'right' but whose model turns do not scores 0."""
    monkeypatch.setattr(experience, "run_rollouts", lambda model, tok, sb, prompts, n, params: [
        traj("Code Execution Results:\nright", turns=["```python\nprint('right')\n```", "wrong"])
        for _ in range(len(prompts) * n)])
    monkeypatch.setattr(experience, "prompt_ids", lambda tok, exs, use_code: [[0] for _ in exs])
    _, batch, _ = experience.collect(None, None, None, EXAMPLES, resolve(["--stage=grpo", "--prompts_per_step=2",
                                                                          "--n_samples=2"]), step=0)
    assert batch.correct.tolist() == [0.0] * 4


# ----------------------------------------------------------------------------- filters

def test_void_turn_is_a_turn_with_neither_a_closed_block_nor_an_answer():
    code = "Let me compute.\n```python\nprint(6 * 7)\n```"
    assert not experience.has_void_turn([code, "So <<<42>>>"])
    assert experience.has_void_turn(["I think about it.", "So <<<42>>>"])           # a first turn with no code
    assert experience.has_void_turn([code, "The answer is 42."])                   # a final turn with no answer
    assert experience.has_void_turn(["```python\nprint(1)"])                       # an unclosed block
    assert not experience.has_void_turn([])


def test_filters_drop_void_truncated_and_mismatched_trajectories():
    trajs = [traj("ok <<<1>>>"), traj("void", finish="eos"), traj("cut <<<1>>>", finish="length"),
             traj("far <<<1>>>", logps=(-1.0, -3.0))]
    batch = experience.to_batch(trajs, [0.0] * 4, [0.0] * 4)
    batch.old_logp = batch.sampler_logp.clone()
    batch.old_logp[3][batch.mask[3].bool()] = -1.0   # row 3: pi_old / mu = 1 and e^2: geometric mean e = 2.72 > 2
    cfg = resolve(["--stage=grpo"])
    keep, counts = experience.loss_filter(trajs, cfg)
    assert keep.all() and counts == {"void_dropped": 0, "truncated_dropped": 0}
    on = dataclasses.replace(cfg, filter_void_turns=True, mask_truncated=True)
    keep, counts = experience.loss_filter(trajs, on)
    assert keep.tolist() == [True, False, False, True] and list(counts.values()) == [1, 1]
    off = rl.correct_mismatch(dataclasses.replace(batch), dataclasses.replace(cfg, mis_low=0.0, mis_high=0.0))
    assert off["mis_dropped"] == 0
    sums = rl.correct_mismatch(batch, cfg)                        # sequence masking zeroes row 3's mask
    assert sums["mis_dropped"] == 1 and batch.mask.any(dim=1).tolist() == [True, True, True, False]
    assert sums["mismatch_tokens"] == 8 and sums["mismatch_abs"] == pytest.approx(2.0)   # |-1 - -3| once
    assert sums["tis_sum"] == pytest.approx(9.0)          # 8 tokens of weight 1, but the e^2 one capped at 2


def test_unmasked_tool_output_enters_the_mask_without_a_sampler_logprob():
    """--mask_tool_output=false (ablation): response [s, o, o, s] with o inserted output; by
    position P+k-1 = 1..4 the mask is 1 on all four, and the inserted ones hold NaN (no sampler)."""
    tr = Trajectory(prompt_ids=[1, 2], response_ids=[5, 6, 7, 8], loss_mask=[1, 0, 0, 1],
                    logprobs=[-1.0, 0.0, 0.0, -2.0])
    masked = experience.to_batch([tr], [1.0], [1.0])
    assert masked.mask[0].tolist() == [0, 1, 0, 0, 1, 0] and masked.sampler_logp[0, 2:4].tolist() == [0.0, 0.0]
    full = experience.to_batch([tr], [1.0], [1.0], mask_tool_output=False)
    assert full.mask[0].tolist() == [0, 1, 1, 1, 1, 0]
    assert full.sampler_logp[0, [1, 4]].tolist() == [-1.0, -2.0] and full.sampler_logp[0, 2:4].isnan().all()
    with pytest.raises(ValueError, match="mask_tool_output=false needs --old_logprobs=trainer"):
        resolve(["--stage=grpo", "--mask_tool_output=false", "--old_logprobs=sampler"])


def test_pi_old_from_the_update_equals_a_pass_of_its_own():
    """GRPO with one update per step takes pi_old from the update's own forward instead of a pass of its
    own: the same gradient (an SGD step of lr 1 shows it) and measurements within 1e-6, also when
    sequence masking drops a trajectory there (the denominator is rescaled after) and TIS weights are off 1."""
    import copy
    from contextlib import nullcontext
    from minir1ci.inference.checkpoint import init_from_config
    from minir1ci.presets import tiny_dir

    model, _ = init_from_config(tiny_dir(), seed=0)
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(6):
        n = 5 + 3 * i
        mask = [1] * n
        mask[2:4] = [0, 0]                                   # inserted interpreter output
        trajs.append(Trajectory(prompt_ids=torch.randint(0, 1000, (4 + i,), generator=g).tolist(),
                                response_ids=torch.randint(0, 1000, (n,), generator=g).tolist(), loss_mask=mask,
                                logprobs=[0.0] * n, turns=["x"], finish_reason="eos"))
    cfg = resolve(["--stage=grpo", "--n_samples=3", "--prompts_per_step=2", "--batch_size=6", "--micro_batch_size=2",
                   "--kl_coef=0.01", "--tis_cap=1.5", "--loss_agg=seq-mean-token-mean", "--grad_clip=1e9"])
    batch = experience.to_batch(trajs, [1.0, 0.0, 0.5, 1.0, 1.0, 0.0], [0.0] * 6)
    true = experience.no_grad_pass(lambda x: rl.token_logp(model, x, cfg)[0], batch, 2, "cpu", nullcontext())
    noise = torch.randn(batch.mask.shape, generator=g) * 0.3
    noise[4] += 2.0                                          # row 4: pi_old / mu = e^-2 on average, dropped
    batch.sampler_logp = (true + noise) * batch.mask
    batch.ref_logp = true - 0.1
    batch.adv = rl.grpo_advantages(batch.scores, 3)[:, None] * batch.mask
    results = []
    for in_update in (False, True):
        b, net = dataclasses.replace(batch), copy.deepcopy(model)
        if in_update:
            assert rl.pi_old_in_update(cfg, len(b)) and b.old_logp is None
            sums = {}
        else:
            b.old_logp = true
            sums = rl.correct_mismatch(b, cfg)
        before = [p.detach().clone() for p in net.parameters()]
        sums.update(rl.update(net, None, {"policy": torch.optim.SGD(net.parameters(), lr=1.0)}, b, cfg, "cpu",
                              nullcontext(), step=0))
        results.append(([p.detach() - q for p, q in zip(net.parameters(), before)], sums))
    (grads_pass, sums_pass), (grads_fused, sums_fused) = results
    assert sums_pass["mis_dropped"] == sums_fused["mis_dropped"] == 1
    for gp, gf in zip(grads_pass, grads_fused):
        torch.testing.assert_close(gf, gp, atol=1e-6, rtol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads_pass)
    for k in ("pg_loss", "kl", "clipfrac", "grad_norm", "mismatch_kl", "mismatch_abs", "tis_sum", "mismatch_tokens"):
        assert sums_fused[k] == pytest.approx(sums_pass[k], rel=1e-5, abs=1e-6), k


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_start(tmp_path_factory):
    from minir1ci.inference.checkpoint import init_from_config, save_pretrained
    from minir1ci.presets import tiny_dir
    model, tok = init_from_config(tiny_dir(), seed=0)
    path = tmp_path_factory.mktemp("start") / "tiny"
    save_pretrained(model, tok, path)
    return path


# The tiny preset from scratch never answers: the filters drop every trajectory (GRPO checks that an
# empty loss is safe; its entropy term keeps the steps from being skipped as signal-free); PPO keeps
# them all and trains with the sampler's log-probs as pi_old.
ALL_ON = {
    "grpo": ["--policy_loss=gspo", "--loss_agg=seq-mean-token-mean", "--dynamic_sampling", "--dynamic_sampling_rounds=1",
             "--tis_cap=2", "--mis_low=0.5", "--mis_high=2", "--filter_void_turns", "--mask_truncated",
             "--entropy_coef=0.01"],
    "ppo": ["--policy_loss=cispo", "--old_logprobs=sampler", "--critic_warmup_steps=1", "--entropy_coef=0.01"],
}


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_runs_two_steps_with_every_new_option_and_resumes_a_third(stage, tiny_start, tmp_path):
    out = tmp_path / stage
    args = [f"--stage={stage}", f"--model={tiny_start}", "--preset=tiny", "--prompts_per_step=2", "--n_samples=2",
            "--batch_size=4", "--micro_batch_size=2", "--max_new_tokens=16", "--save_every=1", "--exec_timeout=2",
            "--tasks=builtin:mul,builtin:letters", "--num_train_examples=4", "--device=cpu", f"--out={out}",
            "--rollout_dtype=bfloat16", "--kl_coef=0.01", *ALL_ON[stage]]
    rl.train_rl(resolve(args + ["--steps=2"]))
    rl.train_rl(resolve(args + ["--steps=3", "--resume"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # the tiny preset keeps every checkpoint (keep_checkpoints=0), for the demo's curves
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{s:06d}" for s in range(3)]
    for r in rows:
        assert set(MISMATCH + FILTERS) <= r.keys()
        assert all(v == v for v in r.values() if isinstance(v, float))          # no NaN
    # bf16 rollouts against the fp32 trainer: a real mismatch, measured (PPO: in the first forward
    # pass, once the policy trains after one critic-only step)
    measured = rows if stage == "grpo" else rows[1:]
    assert all(r["mismatch_abs"] > 0 and r["mismatch_kl"] > 0 for r in measured)
    if stage == "grpo":
        assert all(r["tis_weight_mean"] != 1.0 and r["ds_extra_rounds"] == 1 for r in rows)   # every group flat
        assert all(r["void_dropped"] == 4 and r["truncated"] * 4 == r["truncated_dropped"] for r in rows)
        assert all(r["grad_norm"] == 0.0 for r in rows)                        # nothing left in the loss
    else:
        assert rows[0]["grad_norm"] == 0.0 and all(r["grad_norm"] > 0 for r in rows[1:])


# ----------------------------------------------------------------------------- curriculum cache

def test_curriculum_cache_measures_once_per_start_questions_and_settings(monkeypatch, tmp_path):
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.checkpoint import init_from_config
    from minir1ci.presets import tiny_dir
    model, tok = init_from_config(tiny_dir(), seed=0)
    examples = load_tasks("builtin:mul,builtin:letters", split="train", limit=3, seed=0)
    calls = []

    def sample(model, tokenizer, sandbox, prompts, n, params, dtype=None):   # question i: i of n samples right
        calls.append((len(prompts), n, params.seed))
        return [traj(examples[i].gold_response() if j < i else "no answer") for i in range(len(prompts))
                for j in range(n)]

    monkeypatch.setattr(experience, "run_rollouts", sample)
    cfg = resolve(["--stage=grpo", "--curriculum", "--curriculum_samples=4", f"--curriculum_cache={tmp_path}"])
    measure = lambda m=model, exs=examples, c=cfg: experience.cached_success(m, tok, None, exs, c)
    want = [min(i, 4) / 4 for i in range(6)]
    assert measure() == want and len(calls) == 1
    assert len(list(tmp_path.glob("curriculum-*.json"))) == 1
    copy, _ = init_from_config(tiny_dir(), seed=0)                  # the same weights in another model: read back
    assert measure(copy) == want and len(calls) == 1
    # PPO from the same start, with the same rollout settings, reads it too
    assert measure(c=dataclasses.replace(cfg, stage="ppo")) == want and len(calls) == 1
    # another seed over seed 0's questions (--data_seed=0, the ablations' second seed) reads it too
    assert measure(c=dataclasses.replace(cfg, seed=1, data_seed=0)) == want and len(calls) == 1
    with torch.no_grad():
        copy.model.norm.weight[0] += 1e-3                          # other weights: measured again
    assert measure(copy) == want and len(calls) == 2
    for change in ({"seed": 1}, {"curriculum_samples": 2}, {"temperature": 0.5}, {"max_new_tokens": 64}):
        measure(c=dataclasses.replace(cfg, **change))
    assert len(calls) == 6 and calls[2][2] == 18 and calls[3][1] == 2
    measure(c=dataclasses.replace(cfg, seed=0, data_seed=1))      # seed 0 over seed 1's: seed 1's, cached above
    assert len(calls) == 6
    measure(exs=examples[:5])                                      # other questions
    assert len(calls) == 7 and len(list(tmp_path.glob("curriculum-*.json"))) == 7
    for path in tmp_path.glob("curriculum-*.json"):                # a damaged file is measured again and rewritten
        path.write_text("{not json")
    assert measure() == want and len(calls) == 8
    assert measure() == want and len(calls) == 8
    off = dataclasses.replace(cfg, curriculum_cache="")
    assert measure(c=off) == want and measure(c=off) == want and len(calls) == 10
    assert not list(tmp_path.glob("*.tmp*"))


def test_curriculum_cache_lets_a_run_wait_for_one_measuring_the_same_key(monkeypatch, tmp_path):
    """Two runs from one start and seed (GRPO and PPO, rows of an ablation) started together: one
    measures, the other waits on the key's lock and reads the result; neither measures twice."""
    import multiprocessing
    from minir1ci.env.tasks import load_tasks
    from minir1ci.inference.checkpoint import init_from_config
    from minir1ci.presets import tiny_dir
    model, tok = init_from_config(tiny_dir(), seed=0)
    examples = load_tasks("builtin:mul", split="train", limit=3, seed=0)
    marks = tmp_path / "marks"
    marks.mkdir()

    def slow(model, tokenizer, sandbox, prompts, n, params, dtype=None):
        (marks / str(os.getpid())).touch()
        time.sleep(1.0)
        return [traj(examples[i].gold_response() if j <= i else "no answer") for i in range(len(prompts))
                for j in range(n)]

    monkeypatch.setattr(experience, "run_rollouts", slow)
    cache = tmp_path / "cache"

    def run(stage, out):
        cfg = resolve([f"--stage={stage}", "--curriculum", "--curriculum_samples=2", f"--curriculum_cache={cache}"])
        out.put(experience.cached_success(model, tok, None, examples, cfg))

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=run, args=(stage, out)) for stage in ("grpo", "ppo")]
    for p in procs:
        p.start()
        time.sleep(0.2)
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [[0.5, 1.0, 1.0]] * 2
    assert len(list(marks.iterdir())) == 1 and len(list(cache.glob("curriculum-*.json"))) == 1


def test_curriculum_cache_is_refused_where_nothing_measures():
    with pytest.raises(ValueError, match="--curriculum_cache applies only"):
        resolve(["--stage=sft", "--curriculum_cache=x"])
    with pytest.raises(ValueError, match="--curriculum_cache applies only"):
        resolve(["--stage=grpo", "--preset=tiny", "--curriculum=false", "--curriculum_cache=x"])
    with pytest.raises(ValueError, match="--curriculum_samples applies only"):
        resolve(["--stage=grpo", "--preset=tiny", "--curriculum=false", "--curriculum_samples=20"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_grpo_steps_without_signal_skip_passes_and_update_with_the_same_result(weight_decay, tiny_start, tmp_path,
                                                                             monkeypatch):
    """The untrained model never answers, so every group's rewards are equal: the first steps are
    skipped (no passes, no backward; the optimizer steps on zeros), and the run's weights and optimizer
    state after a third step that has a signal are bit-identical to those of the run that computes
    every step in full. With weight decay the policy leaves its reference after one step, so only the
    first is skipped."""
    from safetensors.torch import load_file
    collect = rl.collect

    def with_signal_at_step_2(sampling, tokenizer, sandbox, examples, cfg, step, pools):
        trajs, batch, sums = collect(sampling, tokenizer, sandbox, examples, cfg, step, pools)
        if step == 2:
            batch.scores[0] += 1.0
        return trajs, batch, sums

    monkeypatch.setattr(rl, "collect", with_signal_at_step_2)
    args = [f"--model={tiny_start}", "--stage=grpo", "--preset=tiny", "--prompts_per_step=2", "--n_samples=2",
            "--batch_size=4", "--micro_batch_size=2", "--max_new_tokens=12", "--exec_timeout=2", "--steps=3",
            "--tasks=builtin:mul", "--num_train_examples=4", "--device=cpu", "--curriculum=false", "--kl_coef=0.01",
            "--lr=1e-2", f"--weight_decay={weight_decay}"]
    rl.train_rl(resolve(args + [f"--out={tmp_path / 'skip'}"]))
    monkeypatch.setattr(rl, "no_signal", lambda *a: False)
    rl.train_rl(resolve(args + [f"--out={tmp_path / 'full'}"]))
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("skip", "full")}
    assert [r["no_signal"] for r in rows["skip"]] == ([1.0, 1.0, 0.0] if weight_decay == 0 else [1.0, 0.0, 0.0])
    assert [r["no_signal"] for r in rows["full"]] == [0.0, 0.0, 0.0]
    # computed in full, a skipped step's gradient is exactly zero (with decay, step 1's KL term is not)
    assert all(r["grad_norm"] == 0.0 for r, s in zip(rows["full"], rows["skip"]) if s["no_signal"])
    assert rows["full"][2]["grad_norm"] > 0
    for k in ("reward", "pg_loss", "grad_norm", "kl"):
        assert [r[k] for r in rows["skip"]] == [r[k] for r in rows["full"]], k
    weights = {run: load_file(tmp_path / run / "step-000002" / "model.safetensors") for run in ("skip", "full")}
    start = load_file(tiny_start / "model.safetensors")
    assert any(not torch.equal(weights["full"][k], start[k]) for k in start)   # the third step trained
    for k in weights["full"]:
        assert torch.equal(weights["skip"][k], weights["full"][k]), k
    states = {run: torch.load(tmp_path / run / "step-000002" / "trainer_state.pt", weights_only=False)
              for run in ("skip", "full")}
    opt = {run: states[run]["optimizers"]["policy"]["state"] for run in states}
    assert opt["skip"].keys() == opt["full"].keys()
    for i in opt["full"]:
        for k, v in opt["full"][i].items():
            assert torch.equal(opt["skip"][i][k], v), (i, k)
