"""Trajectory rewards as in R1-Code-Interpreter v2, from a task score and the model's turns.

    reward = correct * [score == 1]
           + (format_bonus if every turn is well formed else format_penalty)
           + (turn_penalty if there are more than max_turns turns else 0)

With the defaults: +1 correct, +0.1 well formed / -0.1 not, -0.1 past 6 turns; `plain=True` gives
1.0 or 0.0 for correctness only. A turn is the model's text between interpreter outputs. Well formed:
every non-final turn ends with exactly one closed ```python block and holds no other fence; the final
turn holds <<<...>>> and leaves no block unclosed.

Simplified: "correct" is binary (partial credit below 1 counts as incorrect), the paper's "+1 if correct".
"""
from __future__ import annotations

from dataclasses import dataclass

from minir1ci.env import prompts


@dataclass(frozen=True)
class RewardConfig:
    correct: float = 1.0
    format_bonus: float = 0.1
    format_penalty: float = -0.1
    max_turns: int = 6
    turn_penalty: float = -0.1
    plain: bool = False


def turn_well_formed(turn: str, final: bool) -> bool:
    fences = turn.count("```")
    if final:
        # an even number of fences: every ``` opened is closed again
        return prompts.extract_answer(turn) is not None and fences % 2 == 0
    return (prompts.pending_code(turn) is not None and fences == 2
            and turn.count(prompts.CODE_OPEN.rstrip("\n")) == 1)


def well_formed(turns: list[str]) -> bool:
    return bool(turns) and all(turn_well_formed(t, final=i == len(turns) - 1) for i, t in enumerate(turns))


def compute_reward(score: float, turns: list[str], cfg: RewardConfig = RewardConfig()) -> float:
    """Scalar reward of one trajectory; `score` is the task's score of the full response."""
    correct = score >= 1.0 - 1e-9
    if cfg.plain:
        return 1.0 if correct else 0.0
    reward = cfg.correct if correct else 0.0
    reward += cfg.format_bonus if well_formed(turns) else cfg.format_penalty
    if len(turns) > cfg.max_turns:
        reward += cfg.turn_penalty
    return reward
