"""The SymBench planning tasks Blocksworld, BoxLift and BoxNet: prompts, plan simulators (the
verifiers) and planners.

The data holds only instances, so the gold plan comes from a planner here (breadth-first search, a
greedy lift schedule, a one-box-at-a-time route). Any valid plan scores 1; unlike CodeSteer's
checkers, an invalid action fails the whole plan instead of being skipped.

Simplified: the prompts paraphrase CodeSteer's; BoxNet has no step budget and BoxLift's is the length
of our greedy schedule.
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter, deque
from itertools import permutations

from minir1ci.env.tasks.example import Example


# ---- Blocksworld ----
def read_blocksworld(text: str, path: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """'Initial State:' / 'Goal State:' sections of 'stackN: A B' lines (bottom to top)."""
    initial: dict[str, list[str]] = {}
    goal: dict[str, list[str]] = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line in ("Initial State:", "Goal State:"):
            current = initial if line.startswith("Initial") else goal
        elif line:
            name, sep, blocks = line.partition(":")
            if current is None or not sep or not name.startswith("stack"):
                raise ValueError(f"{path}:{lineno}: expected 'stackN: blocks', got {line!r}")
            current[name.strip()] = blocks.split()
    if not initial or not goal:
        raise ValueError(f"{path}: missing Initial State or Goal State")
    return initial, goal


def blocksworld_prompt(initial: dict[str, list[str]], goal: dict[str, list[str]]) -> str:
    def show(state: dict[str, list[str]]) -> str:
        return "\n".join(f"{name}: {' '.join(blocks)}" for name, blocks in state.items())
    return ("Blocksworld task.\n\nInitial state:\n" + show(initial) + "\n\nGoal state:\n" + show(goal) + "\n\n"
            "In each stack the blocks are listed from bottom to top. Move one block at a time; only the top "
            "block of a stack can be moved, and only onto one of the existing stacks (no new stacks). Stacks "
            "missing from the goal must end empty.\nWrite each move on its own line as "
            "'Move [block] from [source] to [destination]' using stack numbers, and surround the plan with "
            "<<<>>>, for example <<<Move B from 2 to 1\nMove A from 3 to 2>>>.")


def _final_blocks(state: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    return {name: tuple(blocks) for name, blocks in state.items() if blocks}


def check_blocksworld(answer: str, ex: Example) -> float:
    state = {name: list(blocks) for name, blocks in ex.metadata["initial"].items()}
    lines = answer.strip().splitlines()
    if len(lines) == 1 and re.fullmatch(r"\s*no moves?( needed)?\.?\s*", lines[0], re.I):
        lines = []  # the instance already satisfies the goal
    for line in lines:
        m = re.fullmatch(r"\s*move\s+(\w+)\s+from\s+(?:stack\s*)?(\d+)\s+to\s+(?:stack\s*)?(\d+)\s*\.?\s*", line, re.I)
        if not m:
            return 0.0
        block, src, dst = m.group(1), f"stack{m.group(2)}", f"stack{m.group(3)}"
        if src not in state or dst not in state or not state[src] or state[src][-1] != block:
            return 0.0
        state[dst].append(state[src].pop())
    return float(_final_blocks(state) == _final_blocks(ex.metadata["goal"]))


def plan_blocksworld(initial: dict[str, list[str]], goal: dict[str, list[str]]) -> str:
    """A shortest plan by breadth-first search (at most a few thousand states here)."""
    names = list(initial)
    target = _final_blocks(goal)
    start = tuple(tuple(initial[n]) for n in names)
    parent: dict[tuple, tuple | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if {n: s for n, s in zip(names, state) if s} == target:
            moves = []
            while parent[state] is not None:
                state, move = parent[state]
                moves.append(move)
            return "\n".join(reversed(moves)) or "No moves"
        for i, j in permutations(range(len(state)), 2):
            if state[i]:
                nxt = list(state)
                nxt[i], nxt[j] = state[i][:-1], state[j] + (state[i][-1],)
                nxt = tuple(nxt)
                if nxt not in parent:
                    parent[nxt] = (state, f"Move {state[i][-1]} from {names[i][5:]} to {names[j][5:]}")
                    queue.append(nxt)
    raise ValueError("goal state unreachable")


# ---- BoxLift ----
def plan_boxlift(boxes: list[int], lifters: list[int]) -> list[list[tuple[int, list[int]]]]:
    """Greedy schedule: each step, heaviest boxes first, lifters taken in index order until strong enough."""
    remaining = sorted(boxes, reverse=True)
    steps = []
    while remaining:
        free = list(range(len(lifters)))
        step, i = [], 0
        while i < len(remaining) and free:
            if sum(lifters[k] for k in free) >= remaining[i]:
                used, strength = [], 0
                while strength < remaining[i]:
                    used.append(free.pop(0))
                    strength += lifters[used[-1]]
                step.append((remaining.pop(i), used))
            else:
                i += 1
        if not step:
            raise ValueError(f"box too heavy for all lifters together: {remaining[0]}")
        steps.append(step)
    return steps


def format_boxlift(steps: list[list[tuple[int, list[int]]]]) -> str:
    return "\n".join(f"Step {i + 1}: {[(w, used) for w, used in step]}" for i, step in enumerate(steps))


def boxlift_prompt(boxes: list[int], lifters: list[int], max_steps: int) -> str:
    return (f"BoxLift task.\n\nBox weights: {boxes}\nLifter capacities: {lifters}\n\n"
            "Lift all the boxes in steps. In one step several boxes can be lifted; each lifter lifts at most one "
            "box per step; several lifters can lift one box together if their capacities add up to at least its "
            f"weight. Use at most {max_steps} steps.\n"
            "Write one line per step as 'Step k: [(box weight, [lifter indices]), ...]' with 0-based lifter "
            "indices, and surround the plan with <<<>>>, for example "
            "<<<Step 1: [(50, [0, 2]), (30, [1])]\nStep 2: [(40, [0, 1])]>>>.")


def check_boxlift(answer: str, ex: Example) -> float:
    lifters, remaining = ex.metadata["lifters"], Counter(ex.metadata["boxes"])
    steps = re.findall(r"step\s*\d+\s*:\s*(\[.*?\])\s*(?=step\s*\d+\s*:|$)", answer.strip(), re.I | re.S)
    if not steps or len(steps) > ex.metadata["max_steps"]:
        return 0.0
    for step in steps:
        used: set[int] = set()
        for weight, who in ast.literal_eval(step):
            # literal_eval also yields bools, floats, strings and sets: True is not lifter 1
            if type(weight) is not int or not isinstance(who, (list, tuple)) or any(type(k) is not int for k in who):
                return 0.0
            if remaining[weight] <= 0 or not who or len(set(who)) != len(who) or used & set(who):
                return 0.0
            if any(not (0 <= k < len(lifters)) for k in who) or sum(lifters[k] for k in who) < weight:
                return 0.0
            remaining[weight] -= 1
            used |= set(who)
    return float(sum(remaining.values()) == 0)


# ---- BoxNet ----
def _square(key: str) -> tuple[float, float]:
    r, c = key.split("_")
    return float(r), float(c)


def boxnet_prompt(grid: dict[str, list[str]]) -> str:
    agents = "\n".join(f"Agent[{r}, {c}] is in square[{r}, {c}] and sees {items}"
                       for (r, c), items in zip(map(_square, grid), grid.values()))
    return ("BoxNet task.\n\nAgents on a grid must bring coloured boxes to targets of the same colour. Each agent "
            "stays in its square and acts only on the items there: it can move a box to a horizontally or "
            "vertically adjacent square, or onto a target of the box's colour in its own square, which removes "
            "both. A square may hold several boxes and targets.\n\n" + agents + "\n\n"
            "Give the plan as a JSON list of steps; each step maps an agent to one action, e.g. "
            '<<<[{"Agent[0.5, 0.5]": "move(box_blue, square[0.5, 1.5])"}, '
            '{"Agent[0.5, 1.5]": "move(box_blue, target_blue)"}]>>>. Match all the boxes.')


_ACTION_RE = re.compile(r"\s*move\(\s*(box_\w+)\s*,\s*(target_\w+|square\[\s*([\d.]+)\s*,\s*([\d.]+)\s*\])\s*\)\s*")


def check_boxnet(answer: str, ex: Example) -> float:
    grid = {_square(k): list(v) for k, v in ex.metadata["grid"].items()}
    plan = json.loads(answer)
    if not isinstance(plan, list) or not all(isinstance(step, dict) for step in plan):
        return 0.0
    for step in plan:
        for agent, action in step.items():
            m_agent = re.fullmatch(r"\s*Agent\[\s*([\d.]+)\s*,\s*([\d.]+)\s*\]\s*", agent)
            m = _ACTION_RE.fullmatch(str(action))
            if not m_agent or not m:
                return 0.0
            here = (float(m_agent.group(1)), float(m_agent.group(2)))
            box, dest = m.group(1), m.group(2)
            if here not in grid or box not in grid[here]:
                return 0.0
            if dest.startswith("target_"):
                if dest[len("target_"):] != box[len("box_"):] or dest not in grid[here]:
                    return 0.0
                grid[here].remove(dest)
            else:
                there = (float(m.group(3)), float(m.group(4)))
                if there not in grid or abs(here[0] - there[0]) + abs(here[1] - there[1]) != 1:
                    return 0.0
                grid[there].append(box)
            grid[here].remove(box)
    return float(not any(item.startswith("box_") for items in grid.values() for item in items))


def plan_boxnet(grid_in: dict[str, list[str]]) -> str:
    """One action per step: each box walks (rows, then columns) to the nearest free target of its colour."""
    grid = {_square(k): list(v) for k, v in grid_in.items()}
    free_targets = [(sq, item[len("target_"):]) for sq, items in grid.items() for item in items
                    if item.startswith("target_")]
    steps = []
    for sq, items in sorted(grid.items()):
        for item in [i for i in items if i.startswith("box_")]:
            colour = item[len("box_"):]
            goal = min((t for t in free_targets if t[1] == colour),
                       key=lambda t: abs(t[0][0] - sq[0]) + abs(t[0][1] - sq[1]))
            free_targets.remove(goal)
            pos = sq
            while pos != goal[0]:
                dr = (goal[0][0] > pos[0]) - (goal[0][0] < pos[0])
                nxt = (pos[0] + dr, pos[1]) if dr else (pos[0], pos[1] + (goal[0][1] > pos[1]) - (goal[0][1] < pos[1]))
                steps.append({f"Agent[{pos[0]}, {pos[1]}]": f"move({item}, square[{nxt[0]}, {nxt[1]}])"})
                pos = nxt
            steps.append({f"Agent[{pos[0]}, {pos[1]}]": f"move({item}, target_{colour})"})
    return json.dumps(steps)
