"""Rewards as in R1-CI v2, against hand-computed values; and the paper split's counts."""
import pytest

from minir1ci.env.rewards import RewardConfig, compute_reward, turn_well_formed, well_formed
from minir1ci.env.tasks import split as paper_split

CODE_TURN = "Let me compute.\n```python\nprint(6 * 7)\n```"
FINAL = "The result is <<<42>>>."


def test_correct_well_formed_trajectory_gets_one_point_one():
    assert compute_reward(1.0, [CODE_TURN, FINAL]) == pytest.approx(1.1)
    assert compute_reward(1.0, ["Easy: <<<42>>>"]) == pytest.approx(1.1)  # no code at all


def test_wrong_answer_keeps_only_the_format_term():
    assert compute_reward(0.0, [CODE_TURN, FINAL]) == pytest.approx(0.1)
    assert compute_reward(0.0, [CODE_TURN, "I give up."]) == pytest.approx(-0.1)  # no <<<>>>


def test_partial_credit_is_not_correct():
    assert compute_reward(0.5, [FINAL]) == pytest.approx(0.1)


def test_more_than_six_turns_costs_a_tenth():
    six = [CODE_TURN] * 5 + [FINAL]
    seven = [CODE_TURN] * 6 + [FINAL]
    assert compute_reward(1.0, six) == pytest.approx(1.1)
    assert compute_reward(1.0, seven) == pytest.approx(1.0)  # 1 + 0.1 - 0.1
    assert compute_reward(0.0, [CODE_TURN] * 7 + ["no answer"]) == pytest.approx(-0.2)


@pytest.mark.parametrize("turn", [
    "Two blocks.\n```python\nprint(1)\n```\n```python\nprint(2)\n```",  # two blocks in one turn
    "Text only, no code.",  # a non-final turn must end with code
    "```python\nprint(1)\n``` and then more text",  # does not end with the block
    "```py\nprint(1)\n```",  # not a python fence
])
def test_malformed_non_final_turns(turn):
    assert not turn_well_formed(turn, final=False)
    assert compute_reward(1.0, [turn, FINAL]) == pytest.approx(0.9)


def test_final_turn_rules():
    assert turn_well_formed("Answer <<<1>>>", final=True)
    assert turn_well_formed("Check:\n```python\nprint(1)\n```\nSo <<<1>>>", final=True)  # a closed block is fine
    assert not turn_well_formed("<<<1>>>\n```python\nprint(1)", final=True)  # unclosed block
    assert not turn_well_formed("<<<1", final=True)
    assert turn_well_formed(CODE_TURN + "\n", final=False)  # trailing whitespace after the fence
    assert not well_formed([])


def test_configurable_and_plain_rewards():
    cfg = RewardConfig(correct=2.0, format_bonus=0.5, format_penalty=-1.0, max_turns=2, turn_penalty=-0.25)
    assert compute_reward(1.0, [CODE_TURN, CODE_TURN, FINAL], cfg) == pytest.approx(2.0 + 0.5 - 0.25)
    assert compute_reward(0.0, ["oops"], cfg) == pytest.approx(-1.0)
    plain = RewardConfig(plain=True)
    assert compute_reward(1.0, ["no format at all"], plain) == 1.0
    assert compute_reward(0.99, [CODE_TURN, FINAL], plain) == 0.0


def test_paper_split_is_107_train_37_test():
    assert len(paper_split.ALL_TASKS) == len(set(paper_split.ALL_TASKS)) == 144
    assert len(paper_split.TEST_TASKS) == len(set(paper_split.TEST_TASKS)) == 37
    assert set(paper_split.TEST_TASKS) <= set(paper_split.ALL_TASKS)
    assert len(paper_split.TRAIN_TASKS) == 107
    assert paper_split.split_of("symbench:eight_queens_hard") == paper_split.split_of("symbench:eight_queens") == "test"
    assert paper_split.split_of("bbh:snarks") == "train" and paper_split.split_of("gym:rubiks_cube") is None
