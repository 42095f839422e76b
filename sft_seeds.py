"""`python demo.py --sft_seeds 1,2` (after `make demo`): how much the demo's outcome depends on its SFT run.

For each listed seed: the teacher SFT and the all-code oracle SFT from the demo's pretrain checkpoint
with that seed (which draws the SFT questions, their order and which get the teacher's text answer),
then GRPO and PPO from that teacher with the demo's RL seed (0) and questions: only the start differs.
Seed 0 is the demo's own runs. Prints, per SFT seed, the RL start, GRPO, PPO and the oracle SFT
(held-out, as the demo's table), with the `date` and `letters` families, where SFT runs differ most,
and writes `<out>/sft_seeds.json`. A different CPU's floating-point sums change an SFT run as a
different seed does, so this is also the spread to expect from `make demo` on another machine.
"""
import json
import time
from pathlib import Path

from demo import (EVAL_SAMPLES, EVAL_TEMPERATURE, RL_STEPS, TEACHER_TEXT_SHARE, eval_job, evaluate, fmt_times,
                  host_note, latest, require_demo, run_jobs, sft_job, train)


def seed_runs(out: Path, seed: int) -> dict[str, Path]:
    """{role: run dir} of one SFT seed; seed 0's are the demo's (the ablations train seed 1's SFT runs
    under the same names and commands, so either reuses the other's)."""
    if seed == 0:
        return {r: out / r for r in ("sft-teacher", "grpo", "ppo", "sft-oracle")}
    return {"sft-teacher": out / f"sft-teacher-s{seed}", "grpo": out / f"grpo-teacher-s{seed}",
            "ppo": out / f"ppo-teacher-s{seed}", "sft-oracle": out / f"sft-oracle-s{seed}"}


def seed_jobs(out: Path, seeds: list[int], limit: int) -> list:
    """demo.run_jobs' jobs for the seeds other than 0: the SFT runs, the RL runs from each teacher, then
    every evaluation (the short jobs last)."""
    trains, evals = [], []
    for seed in (s for s in seeds if s != 0):
        runs = seed_runs(out, seed)
        for role, share in (("sft-teacher", TEACHER_TEXT_SHARE), ("sft-oracle", 0.0)):
            trains.append((runs[role].name, sft_job(out, seed, share, runs[role]), set()))
        for stage in ("grpo", "ppo"):   # the demo's RL seed and questions; one curriculum measurement per start
            trains.append((runs[stage].name, train([f"--stage={stage}", "--preset=tiny", "--seed=0", "--resume",
                                                    f"--steps={RL_STEPS}", f"--model={runs['sft-teacher']}",
                                                    f"--out={runs[stage]}", f"--curriculum_cache={out / 'curriculum'}"]),
                           {runs["sft-teacher"].name}))
        evals += [(f"eval-{r.name}", eval_job(r, True, limit, "sampled"), {r.name}) for r in runs.values()]
    return trains + evals


def sft_seeds(out: Path, seeds: list[int], limit: int) -> int:
    require_demo(out)
    t_start = time.time()
    times = run_jobs(seed_jobs(out, seeds, limit), out / "logs")
    res = {seed: {role: evaluate(latest(run), True, limit, "sampled")["sampled"]
                  for role, run in seed_runs(out, seed).items()} for seed in seeds}

    def cell(s, fams=("date",)):
        extra = ", ".join(f"{f} {100 * s['tasks'][f'builtin:{f}']['accuracy']:.1f}" for f in fams)
        return f"{100 * s['average']['accuracy']:.1f} / {100 * s['average']['code_use']:.0f} ({extra})"

    lines = ["| SFT seed | teacher SFT (RL start) | +GRPO | +PPO | oracle SFT | GRPO − oracle | PPO − oracle |",
             "|---|---|---|---|---|---|---|"]
    for seed, r in res.items():
        acc = {k: 100 * v["average"]["accuracy"] for k, v in r.items()}
        lines.append(f"| {seed} | {cell(r['sft-teacher'])} | {cell(r['grpo'])} | {cell(r['ppo'])} | "
                     f"{cell(r['sft-oracle'], ('date', 'letters'))} | {acc['grpo'] - acc['sft-oracle']:+.1f} | "
                     f"{acc['ppo'] - acc['sft-oracle']:+.1f} |")
    (out / "sft_seeds.json").write_text(json.dumps({"runs": {s: {k: str(v) for k, v in seed_runs(out, s).items()}
                                                             for s in seeds},
                                                    "results": res, "times": times}, indent=2))
    print(f"\nSFT seeds (held-out, {limit} per family, T={EVAL_TEMPERATURE} x {EVAL_SAMPLES}; each cell accuracy / "
          f"code use (%), with the families named):\n" + "\n".join(lines))
    print(f"\ntimes: {fmt_times(times)}; total {(time.time() - t_start) / 60:.1f} min; {host_note()}")
    return 0
