"""SymBench / R1-CI task folders under <data>/symbench (CodeSteer's release, Apache-2.0), read where
they lie. Layouts: <folder>/[<group>/]sample_i/ with question.txt + solution.json (number multiplying:
input_prompt_1.txt + target_answer.txt); game24_dataset/<target>/*.csv; Blocksworld, BoxLift and
BoxNet instances (the prompt and gold plan are made here); Letters/; gsmhardv2.jsonl; MATH/.

Every gold answer is checked by its verifier (symbench_verify.py, symbench_plan.py) at load: one
that breaks its question's rules is re-solved where a solver exists, else dropped, with one warning
per task. Not covered: Path Plan (no data in this copy), BIG-Bench-Hard/ (bbh.py reads bbh/).
"""
from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

from minir1ci.env.tasks.example import Example
import minir1ci.env.tasks.symbench_plan as plan
import minir1ci.env.tasks.symbench_verify as v
from minir1ci.env.tasks.builtin import solve_game24
from minir1ci.env.tasks.symbench_verify import last_boxed

ANSWER_HINT = "\nReturn your final answer with the format <<<answer>>>."


def _glob(folder: Path, pattern: str) -> list[Path]:
    """`folder.glob(pattern)` with numbers in names in numeric order (sample_2 before sample_10)."""
    def natural(path: Path) -> list:
        return [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)]
                for part in path.relative_to(folder).parts]
    return sorted(folder.glob(pattern), key=natural)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from err


def _sample_dirs(folder: Path) -> list[Path]:
    """sample_* under `folder`, or under each of its groups (the varied-complexity layout)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (is --data pointing at the folder holding symbench/?)")
    return _glob(folder, "sample_*") or _glob(folder, "*/sample_*")


def _two_levels(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"


# ---- per-task gold answers and metadata from (question, solution) ----
def _synthesis_target(question: str, sol: dict) -> list[int]:
    """The question asks for [A, B, X] (3 items) or the first 4 or 5 of the state list."""
    asked = re.findall(r"as a list showing \[([^\]]*)\]", question)
    n = len(asked[-1].split(",")) if asked else len(sol["solution"]["answer"])
    state = [int(x) for x in sol["solution"]["answer"]]  # [A, B, C, X, Y] whatever the question asks
    return state[:2] + [state[3]] if n == 3 else state[:n]


def _logic_puzzle_meta(question: str, sol: dict) -> dict:
    first = re.search(r"\((\d+),\s*(\d+)\) as the first selected number", question)
    count = re.search(r"select (\d+) different numbers", question)
    if not first or not count:
        raise ValueError("logic puzzle question without its first cell or count")
    return {"first": [int(first.group(1)), int(first.group(2))], "select": int(count.group(1))}


def _equation_meta(question: str, sol: list) -> dict:
    m = re.search(r"letters ([A-Z](?:, [A-Z])*), each representing one of the numbers ([\d., ]+?)\. ", question)
    if not m:
        raise ValueError("logical equation question without its letters and numbers")
    relations = [line.split(". ", 1)[1].strip() for line in question.splitlines() if re.match(r"^\d+\. ", line)]
    return {"letters": m.group(1).split(", "), "values": [float(x) for x in m.group(2).split(", ")],
            "relations": relations}


# name: (folder, verifier, gold answer from (question, solution), extra metadata from (question, solution))
_SAMPLE_TASKS = {
    "2048": ("2048_dataset", v.check_ints, lambda q, s: s["solution"], None),
    "combinatorial_calculation": ("combinatorial_calculation", v.check_arithmetic_list,
                                  lambda q, s: "[" + ", ".join(s["solution"]) + "]", None),
    "constrained_linear_arrangement": ("constrained_linear_arrangement", v.check_card_game,
                                       lambda q, s: ",".join(s["solution"]), None),
    "cryptanalysis": ("cryptanalysis", v.check_tokens, lambda q, s: json.dumps(s["answer"]), None),
    "eight_queens": ("eight_queens_dataset", v.check_queens,
                     lambda q, s: ", ".join(f"{r} {c}" for r, c in s["solution"]), None),
    "letter_logic_diagram": ("letter_logic_diagram", v.check_letter_grid,
                             lambda q, s: "\n".join(",".join(row) for row in s["solution"]), None),
    "light_puzzles": ("light_puzzles_dataset", v.check_ints, lambda q, s: ", ".join(map(str, s["solution"])), None),
    "logic_puzzle": ("logic_puzzle_dataset", v.check_logic_puzzle,
                     lambda q, s: ", ".join(f"{r} {c}" for r, c in s["solution"]), _logic_puzzle_meta),
    "logical_equation": ("logical_equation", v.check_equations, lambda q, s: str(s), _equation_meta),
    "mahjong_pattern": ("mahjong_pattern_dataset", v.check_ints, lambda q, s: str(s["solution"]), None),
    "matrix_transformation": ("matrix_transformation_dataset", v.check_tokens,
                              lambda q, s: s["formatted_solution"], None),
    "new_operator": ("new_operator_dataset", v.check_number, lambda q, s: f"{s['solution']:.10g}",
                     lambda q, s: {"target_number": s["solution"]}),
    "pattern_recognition": ("pattern_recognition", v.check_ints, lambda q, s: f"[{s['row']}, {s['column']}]", None),
    "permutations_and_combinations": ("permutations_and_combinations", v.check_arrangement,
                                      lambda q, s: json.dumps(s["correct_solution"]), None),
    "pooling": ("pooling_dataset", v.check_number_list,
                lambda q, s: ", ".join(str(x) for row in s["solution"] for x in row),
                lambda q, s: {"target_numbers": [float(x) for row in s["solution"] for x in row]}),
    "reversi": ("reversi_dataset", v.check_tokens, lambda q, s: s["solution"], None),
    "standard_sudoku": ("standard_sudoku", v.check_sudoku, lambda q, s: json.dumps(s["solution"]), None),
    "statistical_counting": ("statistical_counting_dataset", v.check_ints, lambda q, s: str(s["solution"]), None),
    "string_deletion_and_modification": ("string_deletion_and_modification", v.check_string,
                                         lambda q, s: s["final_string"], None),
    "string_insertion": ("string_insertion", v.check_string, lambda q, s: s["modified_string"], None),
    "string_splitting": ("string_splitting", v.check_ints, lambda q, s: json.dumps(s["expected_answer"]), None),
    "string_synthesis": ("string_synthesis", v.check_digit_string,
                         lambda q, s: " ".join(map(str, s["final_counts"])), None),
    "synthesis_decomposition": ("synthesis_decomposition_dataset", v.check_ints,
                                lambda q, s: str(_synthesis_target(q, s)), None),
}
_VARIANTS = {  # extra folders of the same task, same verifier
    "combinatorial_calculation_varied": ("combinatorial_calculation", "combinatorial_calculation_varied_complexity"),
    "eight_queens_2": ("eight_queens", "eight_queens_dataset_2"),
    "eight_queens_hard": ("eight_queens", "eight_queens_dataset_hard"),
    "eight_queens_varied": ("eight_queens", "eight_queens_dataset_varied_complexity"),
}
_OTHER_TASKS = {  # name: the file or folder it reads
    "number_multiply": "number_multiply", "number_multiply_varied": "number_multiply_varied_complexity",
    "game24": "game24_dataset/24/24.csv", "game24_varied": "game24_dataset", "blocksworld": "Blocksworld_dataset",
    "boxlift": "BoxLift_dataset", "boxlift_sft": "BoxLift_dataset_SFT", "boxnet": "BoxNet1_dataset",
    "boxnet_sft": "BoxNet1_dataset_SFT", "letters": "Letters", "gsm_hard": "gsmhardv2.jsonl",
    "math_geometry": "MATH/train/geometry", "math_counting_and_probability": "MATH/train/counting_and_probability",
}


def _location(name: str) -> str:
    if name in _VARIANTS:
        return _VARIANTS[name][1]
    return _SAMPLE_TASKS[name][0] if name in _SAMPLE_TASKS else _OTHER_TASKS[name]


def task_names(root: Path | None = None) -> list[str]:
    """Every task this module knows; with `root`, only those whose data is under <root>/symbench."""
    names = sorted([*_SAMPLE_TASKS, *_VARIANTS, *_OTHER_TASKS])
    if root is None:
        return names
    return [n for n in names if (Path(root) / "symbench" / _location(n)).exists()]


def _load_samples(root: Path, name: str) -> list[Example]:
    base, folder = _VARIANTS.get(name, (name, None))
    default_folder, check, gold, extra = _SAMPLE_TASKS[base]
    out = []
    for sample in _sample_dirs(root / (folder or default_folder)):
        question = (sample / "question.txt").read_text().strip()
        sol = _read_json(sample / "solution.json")
        meta = {"solution": sol, "source": str(sample.relative_to(root))}
        try:
            answer = gold(question, sol)
            meta.update(extra(question, sol) if extra else {})
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{sample}: question.txt / solution.json not as expected ({err!r})") from err
        if check in (v.check_ints, v.check_digit_string):
            meta["target_ints"] = v.int_list(answer)
        out.append(Example(f"symbench:{name}:{_two_levels(sample) if folder else sample.name}", f"symbench:{name}",
                           question, answer, meta, check))
    path = root / "pattern_recognition" / "pattern_recognition_dataset.json"
    if name == "pattern_recognition" and path.exists():  # the sample folders' puzzles and 30 more
        seen = {ex.prompt for ex in out}
        for i, item in enumerate(_read_json(path)):
            sol, answer = item["solution"], gold(None, item["solution"])
            if item["question"].strip() not in seen:
                out.append(Example(f"symbench:{name}:json_{i}", f"symbench:{name}", item["question"].strip(), answer,
                                   {"solution": sol, "target_ints": v.int_list(answer), "source": f"{path.name}[{i}]"},
                                   check))
    return out


def _load_other(root: Path, name: str) -> list[Example]:
    if name.startswith("game24"):
        return _load_game24(root, name)
    out: list[Example] = []
    task, location = f"symbench:{name}", root / _OTHER_TASKS[name]
    if name.startswith("number_multiply"):
        for sample in _sample_dirs(location):
            question = (sample / "input_prompt_1.txt").read_text().strip()
            answer = (sample / "target_answer.txt").read_text().strip()
            out.append(Example(f"{task}:{_two_levels(sample)}", task, question + ANSWER_HINT, answer,
                               {"target_ints": [int(answer)], "source": str(sample.relative_to(root))}, v.check_ints))
    elif name == "blocksworld":
        for folder in _glob(location, "*"):
            path = folder / "blocksworld_task.txt"
            initial, goal = plan.read_blocksworld(path.read_text(), str(path))
            out.append(Example(f"{task}:{folder.name}", task, plan.blocksworld_prompt(initial, goal),
                               plan.plan_blocksworld(initial, goal), {"initial": initial, "goal": goal},
                               plan.check_blocksworld))
    elif name.startswith("boxlift"):
        for path in _glob(location, "*/*/BoxLift.json"):
            data = _read_json(path)
            steps = plan.plan_boxlift(data["boxes"], data["lifters"])
            out.append(Example(f"{task}:{_two_levels(path.parent)}", task,
                               plan.boxlift_prompt(data["boxes"], data["lifters"], len(steps)),
                               plan.format_boxlift(steps), {**data, "max_steps": len(steps)}, plan.check_boxlift))
    elif name.startswith("boxnet"):
        for path in _glob(location, "*/*/pg_state*.json"):
            grid = _read_json(path)
            out.append(Example(f"{task}:{_two_levels(path.parent)}", task, plan.boxnet_prompt(grid),
                               plan.plan_boxnet(grid), {"grid": grid}, plan.check_boxnet))
    elif name == "letters":
        for path in _glob(location, "*/*/test_words.json"):
            word, letter = _read_json(path), path.parent.name.split("_")[0]
            positions = [i + 1 for i, ch in enumerate(word) if ch == letter]
            out.append(Example(f"{task}:{_two_levels(path.parent)}", task,
                               f"How many '{letter}'s are in the word '{word}' and what are their positions? "
                               "Positions count from 1. Answer in the format <<<Count: X, Positions: [Y, Z, ...]>>>.",
                               f"Count: {len(positions)}, Positions: {positions}", {"word": word, "letter": letter},
                               v.check_letters))
    elif name == "gsm_hard":
        for lineno, line in enumerate(location.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                target = float(row["target"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{location}:{lineno}: malformed line ({err})") from err
            out.append(Example(f"{task}:{lineno}", task, row["input"].strip() + ANSWER_HINT, f"{target:.10g}",
                               {"target_number": target}, v.check_number))
    elif name.startswith("math_"):
        for path in _glob(location, "*.json"):
            row = _read_json(path)
            answer = last_boxed(row.get("solution", ""))
            if answer is None:
                raise ValueError(f"{path}: solution has no \\boxed{{}} answer")
            out.append(Example(f"{task}:{path.stem}", task, row["problem"].strip() + ANSWER_HINT, answer,
                               {"level": row.get("level"), "type": row.get("type")}, v.check_math))
    return out


def _load_game24(root: Path, name: str) -> list[Example]:
    """game24: the 4nums.com list (24/24.csv, gold from a solver); game24_varied: n-number puzzles with solutions."""
    task, out = f"symbench:{name}", []
    files = ([root / "game24_dataset" / "24" / "24.csv"] if name == "game24" else
             _glob(root / "game24_dataset", "*/*_number.csv"))
    for path in files:
        target = int(path.parent.name)
        with path.open() as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):
                try:
                    numbers = [int(x) for x in row["Puzzles"].split()]
                except (KeyError, ValueError, AttributeError) as err:
                    raise ValueError(f"{path}:{lineno}: malformed puzzle row ({err})") from err
                answer = row.get("Solutions") or solve_game24([(n, str(n)) for n in numbers]) or ""
                listed = " ".join(map(str, numbers))
                prompt = (f"Use the numbers {listed} and basic arithmetic operations (+ - * /) with parentheses to "
                          f"obtain {target}. Each number must be used exactly once. Answer with the expression, "
                          f"for example <<<(1+2)*8>>> for the numbers 1 2 8 and target 24.")
                out.append(Example(f"{task}:{path.stem}:{lineno}", task, prompt, answer,
                                   {"numbers": numbers, "target": target}, v.check_game24))
    return out


# Constraint tasks whose reference answer sometimes breaks the question's rules: a solver
# supplies a valid gold answer instead (metadata "reference_rejected"); others are dropped.
_REPAIRS = {"constrained_linear_arrangement": v.solve_card_game, "logic_puzzle": v.solve_logic_puzzle}


def _repair(name: str, ex: Example) -> Example | None:
    answer = _REPAIRS[name](ex) if name in _REPAIRS else None
    return None if answer is None else Example(ex.id, ex.task, ex.prompt, answer,
                                               {**ex.metadata, "reference_rejected": ex.answer}, ex.check)


def load(root: Path, name: str) -> list[Example]:
    """Every usable sample of one SymBench task, in file order; reference answers that fail their
    question's rules are re-solved (`_REPAIRS`) or dropped, and counted in one warning."""
    if name not in task_names():
        raise ValueError(f"unknown symbench task {name!r}; valid: {', '.join(task_names())}")
    root = Path(root) / "symbench"
    if not (root / _location(name)).exists():
        raise FileNotFoundError(f"{root / _location(name)} does not exist (is --data pointing at the folder "
                                "holding symbench/?)")
    examples = _load_samples(root, name) if name in _SAMPLE_TASKS or name in _VARIANTS else _load_other(root, name)
    good, repaired = [], 0
    for ex in examples:
        if not (ex.answer and ex.score(ex.gold_response()) == 1.0):
            ex = _repair(name, ex)
            repaired += ex is not None
        if ex is not None:
            good.append(ex)
    if len(good) < len(examples) or repaired:
        warnings.warn(f"symbench:{name}: of {len(examples)} samples, {repaired + len(examples) - len(good)} have a "
                      f"reference answer that fails the question's own rules; {repaired} re-solved, "
                      f"{len(examples) - len(good)} dropped", stacklevel=2)
    return good
