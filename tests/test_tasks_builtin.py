"""Built-in families: verifiers against hand-computed answers, oracles against a real python run,
train/test disjointness against an independent hash, and the task spec / load_tasks contract."""
import datetime
import hashlib
import pickle
import subprocess
import sys

import pytest

from minir1ci.env import prompts
from minir1ci.env.tasks import Example, builtin, load_tasks, parse_spec
from minir1ci.env.tasks.answers import eval_arith, expression_reaches, numbers_match, parse_number


def make(family: str, prompt: str, answer: str, **meta) -> Example:
    checks = {"mul": builtin.check_integer, "add": builtin.check_integer, "letters": builtin.check_integer,
              "sort": builtin.check_int_list, "base": builtin.check_base, "date": builtin.check_date,
              "game24": builtin.check_game24}
    return Example(f"t:{family}", f"builtin:{family}", prompt, answer, meta, checks[family])


# ---- verifiers on hand-computed questions ----------------------------------------------------------

def test_mul_accepts_separators_and_rejects_off_by_one():
    ex = make("mul", "What is 123 * 45?", "5535")
    assert ex.score("so <<<5535>>>") == 1.0
    assert ex.score("<<<5,535>>>") == 1.0
    assert ex.score("<<<5536>>>") == 0.0
    assert ex.score("5535") == 0.0  # no <<<>>>
    assert ex.score("<<<five thousand>>>") == 0.0


def test_last_answer_wins():
    ex = make("add", "What is 10 + 20 + 30?", "60")
    assert ex.score("<<<50>>> no wait <<<60>>>") == 1.0
    assert ex.score("<<<60>>> no wait <<<50>>>") == 0.0


def test_sort_reads_brackets_or_plain_commas():
    ex = make("sort", "Sort these numbers in ascending order: 52, 7, 91.", "[7, 52, 91]")
    assert ex.score("<<<[7, 52, 91]>>>") == 1.0
    assert ex.score("<<<7, 52, 91>>>") == 1.0
    assert ex.score("<<<[52, 7, 91]>>>") == 0.0
    assert ex.score("<<<[]>>>") == 0.0


def test_base_accepts_prefix_and_case():
    ex = make("base", "Write 255 in base 16.", "ff", n=255, base=16)
    assert ex.score("<<<ff>>>") == ex.score("<<<0xFF>>>") == 1.0
    assert ex.score("<<<fe>>>") == 0.0
    assert ex.score("<<<zz>>>") == 0.0  # not a base-16 number
    two = make("base", "Write 5 in base 2.", "101", n=5, base=2)
    assert two.score("<<<0b101>>>") == 1.0 and two.score("<<<5>>>") == 0.0


def test_date_crosses_leap_day():
    ex = make("date", "What date is 2 days after 2024-02-28?", "2024-03-01")
    assert ex.score("<<<2024-03-01>>>") == 1.0
    assert ex.score("<<<2024-02-30>>>") == 0.0  # not a date
    assert ex.score("<<<2024-03-02>>>") == 0.0


def test_game24_checks_numbers_and_value_exactly():
    ex = make("game24", "Use the numbers 3, 3, 8, 8 ...", "8/(3-8/3)", numbers=[3, 3, 8, 8])
    assert ex.score("<<<8/(3-8/3)>>>") == 1.0  # exact in fractions, 23.99.. in floats
    assert ex.score("<<<8/(3-8/3) = 24>>>") == 1.0
    assert ex.score("<<<(8+8)+3+3>>>") == 0.0  # 22
    assert ex.score("<<<8*3>>>") == 0.0  # numbers unused
    assert ex.score("<<<__import__('os')>>>") == 0.0  # never evaluated
    assert ex.score("<<<-3+3+8*3>>>") == 0.0  # unary minus is not an operation of the game


def test_arithmetic_helpers_against_hand_values():
    assert eval_arith("(1+2)*8") == (24, [1, 2, 8])
    assert eval_arith("1/0") is None and eval_arith("2**3") is None
    assert expression_reaches("6/2+7", [6, 2, 7], 10, ordered=True)
    assert not expression_reaches("7+6/2", [6, 2, 7], 10, ordered=True)
    assert parse_number("1,234.5") == 1234.5 and parse_number("-3/4") == -0.75 and parse_number("abc") is None
    assert numbers_match("1.83", 11 / 6) and numbers_match("11/6", 11 / 6) and not numbers_match("1.8", 11 / 6)


# ---- generated families ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", builtin.FAMILIES)
def test_generated_gold_scores_one_and_wrong_scores_zero(family):
    examples = builtin.generate(family, 40, split="train", seed=3)
    assert len(examples) == 40
    for ex in examples:
        assert ex.score(ex.gold_response()) == 1.0
        assert ex.score(ex.answer) == 0.0  # missing <<<>>>
        assert ex.score("<<<not an answer>>>") == 0.0


def test_gold_answers_match_an_independent_computation():
    for ex in builtin.generate("mul", 20) + builtin.generate("add", 20):
        assert int(ex.answer) == eval(ex.prompt[len("What is "):-1])  # our own generated prompt
    for ex in builtin.generate("letters", 20):
        assert int(ex.answer) == ex.metadata["word"].count(ex.metadata["letter"])
    for ex in builtin.generate("date", 20):
        start = datetime.date.fromisoformat(ex.metadata["start"])
        assert ex.answer == str(start + datetime.timedelta(days=ex.metadata["days"]))
    for ex in builtin.generate("base", 20):
        assert int(ex.answer, ex.metadata["base"]) == ex.metadata["n"]


@pytest.mark.parametrize("family", builtin.FAMILIES)
def test_oracle_output_is_what_python_prints(family):
    ex = builtin.generate(family, 2, seed=1)[1]
    text, output, conclusion = ex.oracle_segments(use_code=True)
    assert [s["type"] for s in (text, output, conclusion)] == ["text", "output", "text"]
    code = prompts.pending_code(text["text"])
    assert code == ex.oracle.code
    reference = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert output["text"] == prompts.render_output(reference.stdout, reference.stderr)
    assert prompts.extract_answer(conclusion["text"]) == ex.answer
    assert ex.score(text["text"] + output["text"] + conclusion["text"]) == 1.0
    (only,) = ex.oracle_segments(use_code=False)
    assert "```" not in only["text"] and ex.score(only["text"]) == 1.0


def test_train_and_test_questions_are_disjoint_by_hash():
    for family in builtin.FAMILIES:
        train = builtin.generate(family, 300, split="train")
        test = builtin.generate(family, 30, split="test")
        assert not {e.prompt for e in train} & {e.prompt for e in test}
        for ex in test:  # bucket 0 of 10 of an independently computed sha256
            assert int(hashlib.sha256(ex.prompt.encode()).hexdigest()[:8], 16) % 10 == 0
        assert len({e.prompt for e in train}) == len(train)


def test_generation_is_deterministic_per_seed():
    a = [e.prompt for e in builtin.generate("mul", 10, seed=5)]
    assert a == [e.prompt for e in builtin.generate("mul", 10, seed=5)]
    assert a != [e.prompt for e in builtin.generate("mul", 10, seed=6)]


def test_game24_test_split_runs_out_without_looping():
    test = builtin.generate("game24", 1000, split="test")
    assert 100 < len(test) < 200  # only about 1360 solvable 4-number puzzles from 1..13 exist


def test_examples_pickle_with_their_verifier():
    ex = builtin.generate("game24", 1)[0]
    again = pickle.loads(pickle.dumps(ex))
    assert again.score(ex.gold_response()) == 1.0


def test_messages_use_the_mode_system_prompt():
    ex = builtin.generate("sort", 1)[0]
    assert ex.messages(True) == [{"role": "system", "content": prompts.SYSTEM_PROMPT_CODE},
                                 {"role": "user", "content": ex.prompt}]
    assert ex.messages(False)[0]["content"] == prompts.SYSTEM_PROMPT_TEXT


# ---- spec and load_tasks --------------------------------------------------------------------------

def test_spec_parsing_keeps_order_and_drops_duplicates():
    assert parse_spec("builtin:mul, bbh:navigate,builtin:mul") == [("builtin", "mul"), ("bbh", "navigate")]
    with pytest.raises(ValueError, match="valid sources"):
        parse_spec("nope:mul")
    with pytest.raises(ValueError, match="source:name"):
        parse_spec("builtin")


def test_load_tasks_builtin_counts_and_errors():
    examples = load_tasks("builtin:mul,builtin:letters", split="test", limit=7)
    assert [e.task for e in examples] == ["builtin:mul"] * 7 + ["builtin:letters"] * 7
    assert all(e.metadata["split"] == "test" for e in examples)
    assert len(load_tasks("builtin:all", limit=2)) == 2 * len(builtin.FAMILIES)
    with pytest.raises(ValueError, match="mul, add, letters"):
        load_tasks("builtin:division")
    with pytest.raises(ValueError, match="split"):
        load_tasks("builtin:mul", split="validation")


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_tasks("bbh:navigate", data_dir=tmp_path / "absent")
