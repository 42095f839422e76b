"""`make ablations` (`python demo.py --ablations`, after `make demo`): the RL runs that change one thing
against the demo's GRPO, each with two seeds, from the demo's run directory; their evaluation, the table
with each row's seed spread and the paper's finding, and the README's ablation section.

Each row trains GRPO (or what the row names) for the demo's RL steps from its teacher SFT with seeds 0
and 1 (the demo's GRPO and PPO are seed 0 of their rows), both on seed 0's training questions
(`--data_seed=0`: a seed draws the order of questions and the samples, as seeds over one fixed dataset
do, and a row's two seeds share one curriculum measurement); the SFT runs the rows start from (a 70%-text
teacher) and the second SFT seeds (the `date` family's question) are trained first. Jobs run as the
demo's do (demo.run_jobs), and every evaluation is the demo's, cached in the checkpoint directory.
"""
import json
import time
from pathlib import Path

from demo import (EVAL_SAMPLES, EVAL_TEMPERATURE, LANES, RL_STEPS, TEACHER_TEXT_SHARE, eval_job, evaluate,
                  fmt_times, host_note, latest, require_demo, run_jobs, sft_job, train, update_readme)


# The ablations: (key, row, how it differs from the demo's GRPO, the paper's finding). Every row runs
# seeds 0 and 1 from the teacher SFT unless its change says otherwise; the demo's GRPO and PPO runs
# are seed 0 of their rows.
ABLATIONS = [
    ("grpo", "GRPO (demo: masked, curriculum, teacher SFT start, fp32 rollouts)", [], ""),
    ("lora", "GRPO with LoRA (rank 8, lr 4e-4: 10x full fine-tuning's)", ["--lora_rank=8", "--lr=4e-4"],
     "LoRA Without Regret: LoRA matches full fine-tuning in RL at about 10x the learning rate"),
    ("unmasked", "interpreter output unmasked (`--mask_tool_output=false`)", ["--mask_tool_output=false"],
     "masking the interpreter output helps (R1-CI v1: training on it lowers accuracy and stability)"),
    ("no-curriculum", "curriculum off (`--curriculum=false`)", ["--curriculum=false"],
     "the curriculum matters: GRPO 66.5 without, 72.4 with (v2, 14B; SFT 63.1)"),
    ("ppo", "PPO instead of GRPO", ["--stage=ppo"], "GRPO beats PPO (v1)"),
    ("mix-0.0", "teacher with 0% text (the oracle SFT), then GRPO", ["start:sft-oracle"],
     "the paper's SFT data mixes text and code (GPT-4o)"),
    ("cold", "cold start: RL from the pretrain checkpoint", ["start:pretrain"],
     "warm start (SFT, then RL) beats RL from the base model (v1)"),
    ("dynamic", "dynamic sampling (`--dynamic_sampling`, DAPO)", ["--dynamic_sampling"],
     "not in the paper (DAPO: more signal per step)"),
    ("mix-0.7", "teacher with 70% text, then GRPO", ["start:sft-teacher-0.7"], "as above"),
    ("bf16-tis", "bf16 rollouts, TIS on (cap 2)", ["--rollout_dtype=bfloat16"],
     "not in the paper (sampler/trainer mismatch correction: veRL and others)"),
    ("bf16-notis", "bf16 rollouts, TIS off (`--tis_cap=0`)", ["--rollout_dtype=bfloat16", "--tis_cap=0"],
     "not in the paper (as above)"),
    ("curriculum-20", "curriculum from 20 samples per question, all four stages filled", ["--curriculum_samples=20"],
     "the paper measures p from 20 samples"),
]
SEEDS = (0, 1)


def ablation_runs(out: Path, rows: list) -> list[tuple[str, int, Path, list[str]]]:
    """(key, seed, run dir, train.py arguments) of every run of `rows` (ABLATIONS entries); the demo's GRPO
    and PPO are seed 0 (no arguments: nothing to train)."""
    runs = []
    for key, _, change, _ in rows:
        for seed in SEEDS:
            if key in ("grpo", "ppo") and seed == 0:
                runs.append((key, seed, out / key, []))
                continue
            start = next((c.removeprefix("start:") for c in change if c.startswith("start:")), "sft-teacher")
            stage = next((c for c in change if c.startswith("--stage=")), "--stage=grpo")
            extra = [c for c in change if not c.startswith(("start:", "--stage="))]
            if "--curriculum=false" not in extra:   # a row's seeds, and rows from one start, share one measurement
                extra.append(f"--curriculum_cache={out / 'curriculum'}")
            run = out / f"abl-{key}-s{seed}"
            runs.append((key, seed, run, [stage, "--preset=tiny", f"--seed={seed}", f"--data_seed={SEEDS[0]}",
                                          "--resume", f"--steps={RL_STEPS}", f"--model={out / start}", f"--out={run}",
                                          *extra]))
    return runs


def job_order(runs: list, out: Path) -> list:
    """`runs` in the order their jobs start: seed 0's, then seed 1's; in each, first the runs that make a
    curriculum measurement (the first from their start, rollout dtype and sample count: both seeds train
    on the questions of `--data_seed`; the demo's GRPO made the teacher SFT's), which are also the long
    ones, then those that read it, so a run rarely waits on the cache's lock while another measures."""
    def measured(args):
        if "--curriculum=false" in args:
            return None
        return frozenset(a for a in args if a.startswith(("--model=", "--data_seed=", "--rollout_dtype=",
                                                          "--curriculum_samples=")))

    demo = measured([f"--model={out / 'sft-teacher'}", f"--data_seed={SEEDS[0]}"])
    seen, order = {None, frozenset(), demo}, []
    for seed in SEEDS:
        first, rest = [], []
        for r in (r for r in runs if r[1] == seed):
            (rest if measured(r[3]) in seen else first).append(r)
            seen.add(measured(r[3]))
        order += first + rest
    return order


def ablation_jobs(out: Path, rows: list, runs: list, limit: int) -> list:
    """demo.run_jobs' (name, command, what it waits for) for `rows` and their `runs`: the SFT runs first
    (the third teacher of the mix sweep, whose rows wait for it, and a second seed of the teacher and the
    oracle, for the `date` family's question), then the RL runs in `job_order`, then every evaluation:
    the long jobs first and the short ones last, so the two lanes end within about one evaluation of
    each other (an evaluation started as soon as its run ended left a lane idle for minutes at the end)."""
    trains, evals = [], []
    if any(a[0] == "mix-0.7" for a in rows):
        trains.append(("sft-teacher-0.7", sft_job(out, 0, 0.7, out / "sft-teacher-0.7"), set()))
    for name, share in (("sft-teacher", TEACHER_TEXT_SHARE), ("sft-oracle", 0.0)):
        trains.append((f"{name}-s1", sft_job(out, 1, share, out / f"{name}-s1"), set()))
        evals.append((f"eval-{name}-s1", eval_job(out / f"{name}-s1", True, limit, "sampled"), {f"{name}-s1"}))
    sft_runs = {j[0] for j in trains}
    for key, seed, run, args in job_order(runs, out):
        # --model names the SFT run: train.py starts from its newest checkpoint when the job starts
        if args:
            after = {a.removeprefix(f"--model={out}/") for a in args if a.startswith("--model=")} & sft_runs
            trains.append((run.name, train(args), after))
        evals.append((f"eval-{run.name}", eval_job(run, True, limit, "sampled"), {run.name} if args else set()))
    return trains + evals


def ablations(out: Path, limit: int, readme: bool, keys: str = "") -> int:
    """Train every ablation run (and the SFT runs they start from), evaluate them, write the table; `keys`
    (comma list) limits it to those rows and GRPO's, the rest named as not run."""
    rows = [a for a in ABLATIONS if not keys or a[0] in keys.split(",") + ["grpo"]]
    skipped = [a[0] for a in ABLATIONS if a not in rows]
    require_demo(out)
    t_start = time.time()
    runs = ablation_runs(out, rows)
    times = run_jobs(ablation_jobs(out, rows, runs, limit), out / "logs")
    acc = {(key, seed): evaluate(latest(run), True, limit, "sampled")["sampled"]["average"]
           for key, seed, run, _ in runs}
    sft_seeds = {f"{name} seed {s}": evaluate(latest(out / (name + ("-s1" if s else ""))), True, limit,
                                              "sampled")["sampled"]
                 for name in ("sft-teacher", "sft-oracle") for s in SEEDS}
    total = time.time() - t_start

    def spread(key):   # (mean, half-range) of a row's accuracy over its seeds, in points
        xs = [100 * acc[key, s]["accuracy"] for s in SEEDS]
        return sum(xs) / len(xs), (max(xs) - min(xs)) / 2

    ref_mean, ref_half = spread("grpo")
    lines = ["| run | seed 0 | seed 1 | mean ± half-range | Δ vs GRPO | beyond the spread | code use | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label, _, paper in rows:
        mean, half = spread(key)
        seeds = " | ".join(f"{100 * acc[key, s]['accuracy']:.1f}" for s in SEEDS)
        delta = "" if key == "grpo" else f"{mean - ref_mean:+.1f}"
        beyond = "" if key == "grpo" else ("yes" if abs(mean - ref_mean) > half + ref_half else "no")
        code = sum(100 * acc[key, s]["code_use"] for s in SEEDS) / len(SEEDS)
        lines.append(f"| {label} | {seeds} | {mean:.1f} ± {half:.1f} | {delta} | {beyond} | {code:.0f} | {paper} |")
    date = ", ".join(f"{name} {100 * s['tasks']['builtin:date']['accuracy']:.1f} (average "
                     f"{100 * s['average']['accuracy']:.1f})" for name, s in sft_seeds.items())
    tbl = "\n".join(lines) + (f"\n\nNot run in this table: {', '.join(skipped)} (`--rows`)." if skipped else "")
    (out / "ablations.json").write_text(json.dumps({"runs": {f"{k} seed {s}": {"run": str(r), "args": a, **acc[k, s]}
                                                             for k, s, r, a in runs},
                                                    "sft_seeds": sft_seeds, "times": times}, indent=2))
    print(f"\nAblations (held-out, {limit} per family, T={EVAL_TEMPERATURE} x {EVAL_SAMPLES}):\n{tbl}")
    print(f"\nSFT seeds, `date` accuracy (T={EVAL_TEMPERATURE}): {date}")
    print(f"\ntimes: {fmt_times(times)}; total {total / 60:.1f} min; {host_note()}")
    if readme:
        update_readme(f"`make ablations` (`python demo.py --ablations`), after `make demo`: each row trains GRPO "
                      f"(or what the row names) for {RL_STEPS} steps from the demo's teacher SFT, changing one "
                      f"thing, with seeds 0 and 1 over seed 0's training questions (the demo's runs are seed 0), "
                      f"and is evaluated as the main table ({limit} held-out questions per family, "
                      f"T={EVAL_TEMPERATURE} x {EVAL_SAMPLES}). A difference is beyond the spread when it exceeds "
                      f"the two rows' half-ranges added. Total "
                      f"{total / 60:.1f} min, {LANES} runs at a time ({fmt_times(times)}; {host_note()}).\n\n{tbl}"
                      f"\n\nSFT seeds, `date` accuracy (T={EVAL_TEMPERATURE}): {date}.", "ablations")
    return 0
