"""SymBench: every task folder in the shared data loads, its gold answers score 1, wrong, missing
and malformed answers score 0, and the constraint verifiers agree with hand-solved instances.

Skipped where the shared data is absent ($MINIR1CI_DATA or ../shared/data).
"""
import json
import re
import shutil
import warnings

import pytest

from minir1ci.env.tasks import Example, load_tasks, resolve_data_dir, symbench
from minir1ci.env.tasks import symbench_plan as plan
from minir1ci.env.tasks import symbench_verify as v

try:
    ROOT = resolve_data_dir()
except FileNotFoundError:
    ROOT = None
pytestmark = pytest.mark.skipif(ROOT is None or not (ROOT / "symbench").is_dir(), reason="shared SymBench data absent")

# Samples per task in the shared copy (counted with ls / wc -l; pattern_recognition: 70 folders
# repeated in its json with 30 more), and those whose reference
# answer breaks the question's rules: (rejected, re-solved by a solver).
COUNTS = {
    "2048": 140, "blocksworld": 120, "boxlift": 40, "boxlift_sft": 200, "boxnet": 50, "boxnet_sft": 150,
    "combinatorial_calculation": 105, "combinatorial_calculation_varied": 73, "constrained_linear_arrangement": 140,
    "cryptanalysis": 70, "eight_queens": 105, "eight_queens_2": 244, "eight_queens_hard": 14,
    "eight_queens_varied": 70, "game24": 1362, "game24_varied": 11777, "gsm_hard": 1319,
    "letter_logic_diagram": 140, "letters": 6620, "light_puzzles": 140, "logic_puzzle": 140,
    "logical_equation": 150, "mahjong_pattern": 140, "math_counting_and_probability": 771, "math_geometry": 870,
    "matrix_transformation": 140, "new_operator": 140, "number_multiply": 300, "number_multiply_varied": 250,
    "pattern_recognition": 100, "permutations_and_combinations": 140, "pooling": 140, "reversi": 140,
    "standard_sudoku": 84, "statistical_counting": 140, "string_deletion_and_modification": 70,
    "string_insertion": 140, "string_splitting": 140, "string_synthesis": 140, "synthesis_decomposition": 140,
}
REJECTED = {"constrained_linear_arrangement": (35, 23), "logic_puzzle": (27, 21), "game24_varied": (35, 0)}

_cache: dict[str, tuple[list[Example], list[str]]] = {}


def loaded(name: str) -> tuple[list[Example], list[str]]:
    if name not in _cache:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            examples = symbench.load(ROOT, name)
        _cache[name] = examples, [str(w.message) for w in caught]
    return _cache[name]


def test_every_folder_has_a_task():
    folders = {p.name for p in (ROOT / "symbench").iterdir() if p.is_dir()} - {"BIG-Bench-Hard"}
    used = {symbench._location(n).split("/")[0] for n in symbench.task_names()}
    assert folders <= used
    assert set(symbench.task_names(ROOT)) == set(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_gold_answers_score_one(name):
    examples, messages = loaded(name)
    rejected, resolved = REJECTED.get(name, (0, 0))
    assert len(examples) == COUNTS[name] - rejected + resolved
    assert len(messages) == (1 if rejected else 0)
    if rejected:
        assert f"{rejected} have a reference" in messages[0] and f"{resolved} re-solved" in messages[0]
    assert sum(ex.metadata.get("reference_rejected") is not None for ex in examples) == resolved
    for ex in examples:
        assert ex.score(ex.gold_response()) == 1.0
    assert len({ex.id for ex in examples}) == len(examples)


def _bump_last_int(answer: str) -> str:
    m = list(re.finditer(r"\d+", answer))[-1]
    return answer[:m.start()] + str(int(m.group()) + 1) + answer[m.end():]


def _swap_first_two(items: list) -> list:
    i = next(k for k in range(1, len(items)) if items[k] != items[0])
    items = list(items)
    items[0], items[i] = items[i], items[0]
    return items


def _drop_last_line(answer: str) -> str:
    return "\n".join(answer.splitlines()[:-1]) or "Move A from 9 to 9"


# A certainly-wrong answer per task, made from the gold one.
WRONG = {
    "cryptanalysis": lambda ex: ex.answer[:-3] + ("Z" if ex.answer[-3] != "Z" else "Y") + ex.answer[-2:],
    "string_deletion_and_modification": lambda ex: ex.answer + "a",
    "string_insertion": lambda ex: ex.answer[:-1],
    "matrix_transformation": lambda ex: ",".join(_swap_first_two(ex.answer.split(","))),
    "reversi": lambda ex: ",".join(_swap_first_two(ex.answer.split(","))),
    "permutations_and_combinations": lambda ex: json.dumps(json.loads(ex.answer)[::-1]),
    "logical_equation": lambda ex: str(_swap_first_two(json.loads(ex.answer))),
    "letter_logic_diagram": lambda ex: "\n".join([",".join(_swap_first_two(ex.answer.splitlines()[0].split(",")))]
                                                 + ex.answer.splitlines()[1:]),
    "standard_sudoku": lambda ex: "[[" + str(10 - int(ex.answer[2])) + ex.answer[3:],
    "constrained_linear_arrangement": lambda ex: ",".join([ex.answer.split(",")[0]] * len(ex.answer.split(","))),
    "logic_puzzle": lambda ex: ex.answer.rsplit(",", 1)[0],
    "combinatorial_calculation": lambda ex: ex.answer[:-1] + ", +, 0]",
    "combinatorial_calculation_varied": lambda ex: ex.answer[:-1] + ", +, 0]",
    "game24": lambda ex: ex.answer + "+1",
    "game24_varied": lambda ex: ex.answer + "+1",
    "blocksworld": lambda ex: _drop_last_line(ex.answer),
    "boxlift": lambda ex: _drop_last_line(ex.answer),
    "boxlift_sft": lambda ex: _drop_last_line(ex.answer),
    "boxnet": lambda ex: json.dumps(json.loads(ex.answer)[:-1]),
    "boxnet_sft": lambda ex: json.dumps(json.loads(ex.answer)[:-1]),
    "math_counting_and_probability": lambda ex: ex.answer + "1",
    "math_geometry": lambda ex: ex.answer + "1",
}
for _queens in ("eight_queens", "eight_queens_2", "eight_queens_hard", "eight_queens_varied"):
    # move the last queen one column: its column is then used twice (or falls off the board)
    WRONG[_queens] = lambda ex: _bump_last_int(ex.answer)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_wrong_missing_and_malformed_answers_score_zero(name):
    examples, _ = loaded(name)
    picks = [examples[0], examples[len(examples) // 2], examples[-1]]
    for ex in picks:
        wrong = WRONG.get(name, lambda e: _bump_last_int(e.answer))(ex)
        assert ex.score(f"<<<{wrong}>>>") == 0.0, (ex.id, wrong)
        assert ex.score(ex.answer) == 0.0  # no <<<>>>
        assert ex.score("<<<I cannot solve this>>>") == 0.0
        assert ex.score("<<<" + ex.answer[: len(ex.answer) // 2]) == 0.0  # unclosed


# ---- hand-solved instances --------------------------------------------------------------------

def by_id(name: str, suffix: str) -> Example:
    return next(ex for ex in loaded(name)[0] if ex.id.endswith(suffix))


def test_card_game_follows_the_stated_rules_not_the_rejected_reference():
    # Rounds: B loss, C draw, A draw. Stated rules (symmetric): C draws only with C, A only with A,
    # and B loses to C (B generates C) or E (E overcomes B); cards are used once -> E,C,A.
    ex = by_id("constrained_linear_arrangement", ":sample_1")
    assert ex.metadata["reference_rejected"] == "C,B,E"
    assert ex.score("<<<E,C,A>>>") == 1.0
    assert ex.score("<<<C,B,E>>>") == 0.0
    assert ex.score("<<<C,C,A>>>") == 0.0  # C twice


def test_logic_puzzle_accepts_any_valid_selection():
    # grid [[3, 1], [2, 3]], 3 cells with (0,1), every row and column sum <= 4:
    # (0,1),(1,1),(0,0) sums rows 4,3 and columns 3,4; the reference (0,1),(1,0),(0,0) has column 0 = 5.
    ex = by_id("logic_puzzle", ":sample_2")
    assert ex.score("<<<0 1, 1 1, 0 0>>>") == 1.0
    assert ex.score("<<<0 1, 1 0, 0 0>>>") == 0.0
    assert ex.score("<<<1 1, 0 0, 1 0>>>") == 0.0  # does not start from (0,1)


def test_arithmetic_list_keeps_the_given_order():
    ex = by_id("combinatorial_calculation", ":sample_0")  # numbers 6, 2, 7 -> 10
    assert ex.score("<<<[6, /, 2, +, 7]>>>") == 1.0
    assert ex.score("<<<6/2+7>>>") == 1.0
    assert ex.score("<<<[7, +, 6, /, 2]>>>") == 0.0  # right value, numbers reordered


def test_queens_on_ten_by_ten_boards():
    ex = by_id("eight_queens_varied", "complexity2/sample_13")  # 10x10, (3,8) blocked
    assert ex.score("<<<0 0, 1 2, 2 5, 3 7, 4 9, 5 4, 6 8, 7 1, 8 3, 9 6>>>") == 1.0
    assert ex.score("<<<0 0, 1 4, 2 7, 3 5, 4 2, 5 6, 6 1, 7 3>>>") == 0.0  # only 8 queens


def test_blocksworld_simulates_moves_and_accepts_no_moves():
    done = by_id("blocksworld", ":2_3_2_2")  # initial already equals the goal
    assert done.answer == "No moves" and done.score("<<<No moves>>>") == 1.0
    ex = by_id("blocksworld", ":2_3_2_0")  # stack2: B A  ->  stack2: A B
    assert ex.score("<<<Move A from 2 to 1\nMove B from 2 to 3\nMove A from 1 to 2\nMove B from 3 to 2>>>") == 1.0
    assert ex.score("<<<Move B from 2 to 1\nMove A from 2 to 3>>>") == 0.0  # B is not on top
    assert ex.score("<<<Move A from 2 to table\nMove B from 2 to 1>>>") == 0.0  # no new stacks


def test_boxlift_enforces_capacity_and_step_budget():
    ex = Example("t", "symbench:boxlift", "", "", {"boxes": [50, 30], "lifters": [40, 20], "max_steps": 2},
                 plan.check_boxlift)
    assert ex.score("<<<Step 1: [(50, [0, 1])]\nStep 2: [(30, [0])]>>>") == 1.0
    assert ex.score("<<<Step 1: [(50, [0])]\nStep 2: [(30, [0])]>>>") == 0.0  # 40 < 50
    assert ex.score("<<<Step 1: [(50, [0, 1]), (30, [1])]>>>") == 0.0  # lifter 1 twice in a step
    assert ex.score("<<<Step 1: [(30, [0])]\nStep 2: [(50, [0, 1])]\nStep 3: [(30, [0])]>>>") == 0.0  # 3 steps
    assert plan.plan_boxlift([50, 30], [40, 20]) == [[(50, [0, 1])], [(30, [0])]]


def test_boxnet_rejects_moves_that_break_the_rules():
    grid = {"0.5_0.5": ["box_red"], "0.5_1.5": ["target_red"], "1.5_0.5": [], "1.5_1.5": []}
    ex = Example("t", "symbench:boxnet", "", "", {"grid": grid}, plan.check_boxnet)
    move = '{"Agent[0.5, 0.5]": "move(box_red, square[0.5, 1.5])"}'
    assert ex.score(f'<<<[{move}, {{"Agent[0.5, 1.5]": "move(box_red, target_red)"}}]>>>') == 1.0
    assert ex.score(f"<<<[{move}]>>>") == 0.0  # not matched
    assert ex.score('<<<[{"Agent[0.5, 0.5]": "move(box_red, square[1.5, 1.5])"}]>>>') == 0.0  # diagonal
    assert ex.score('<<<[{"Agent[0.5, 0.5]": "move(box_red, target_red)"}]>>>') == 0.0  # target elsewhere
    assert ex.score(f'<<<[{plan.plan_boxnet(grid)[1:-1]}]>>>') == 1.0


def test_number_answers_with_rounding_and_big_integers():
    ex = next(e for e in loaded("new_operator")[0] if abs(e.metadata["target_number"] - 11 / 6) < 1e-9)
    assert ex.score("<<<1.83>>>") == ex.score("<<<11/6>>>") == 1.0
    assert ex.score("<<<1.8>>>") == 0.0
    big = next(e for e in loaded("number_multiply_varied")[0] if len(e.answer) > 30)
    assert big.score(f"<<<{int(big.answer):,}>>>") == 1.0
    assert big.score(f"<<<{int(big.answer) + 1}>>>") == 0.0  # a float would not tell these apart


def test_math_answers_compare_after_latex_normalisation():
    ex = Example("t", "symbench:math_geometry", "", "\\frac{8}{9}", {}, v.check_math)
    for same in ("\\dfrac{8}{9}", "\\frac89", "8/9", "$\\boxed{\\frac{8}{9}}$", "0.888888889"):
        assert ex.score(f"<<<{same}>>>") == 1.0, same
    assert ex.score("<<<\\frac{9}{8}>>>") == 0.0
    deg = Example("t", "symbench:math_geometry", "", "45^\\circ", {}, v.check_math)
    assert deg.score("<<<45>>>") == 1.0 and deg.score("<<<\\text{45 degrees}>>>") == 0.0


def test_letters_checks_count_and_positions():
    ex = Example("t", "symbench:letters", "", "", {"word": "banana", "letter": "a"}, v.check_letters)
    assert ex.score("<<<Count: 3, Positions: [2, 4, 6]>>>") == 1.0
    assert ex.score("<<<Count: 3, Positions: [1, 3, 5]>>>") == 0.0  # 0-based
    assert ex.score("<<<3>>>") == 0.0


# ---- loading errors name the file ---------------------------------------------------------------

def test_malformed_files_are_named(tmp_path):
    task = tmp_path / "symbench" / "2048_dataset" / "sample_0"
    task.mkdir(parents=True)
    (task / "question.txt").write_text("q")
    (task / "solution.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(task / "solution.json"))):
        symbench.load(tmp_path, "2048")
    (tmp_path / "symbench" / "gsmhardv2.jsonl").write_text('{"input": "q", "target": 1}\n{"input": \n')
    with pytest.raises(ValueError, match=r"gsmhardv2\.jsonl:2"):
        symbench.load(tmp_path, "gsm_hard")
    blocks = tmp_path / "symbench" / "Blocksworld_dataset" / "x"
    blocks.mkdir(parents=True)
    (blocks / "blocksworld_task.txt").write_text("Initial State:\nstack1: A\nnonsense\n")
    with pytest.raises(ValueError, match=r"blocksworld_task\.txt:3"):
        symbench.load(tmp_path, "blocksworld")


def test_missing_task_folder_is_named(tmp_path):
    shutil.copytree(ROOT / "symbench" / "reversi_dataset", tmp_path / "symbench" / "reversi_dataset")
    assert symbench.task_names(tmp_path) == ["reversi"]
    assert len(load_tasks("symbench:all", data_dir=tmp_path, limit=3)) == 3
    with pytest.raises(FileNotFoundError, match="string_insertion"):
        load_tasks("symbench:string_insertion", data_dir=tmp_path)
    with pytest.raises(ValueError, match="valid: all, 2048"):
        load_tasks("symbench:path_plan", data_dir=tmp_path)
