"""reasoning-gym adapter: on a dozen datasets the gold answer scores exactly what the dataset's own
`score_answer` gives it (1.0), a missing <<<>>> scores 0, and a wrong answer scores what the
dataset says (below 1). Skipped when the optional extra is not installed."""
import pickle

import pytest

from minir1ci.env.tasks import gym, load_tasks
from minir1ci.env.tasks import split as paper_split

pytestmark = pytest.mark.skipif(not gym.available(), reason="reasoning-gym (minir1ci[gym]) not installed")

DATASETS = ["countdown", "puzzle24", "basic_arithmetic", "letter_counting", "word_sorting", "base_conversion",
            "calendar_arithmetic", "maze", "n_queens", "mini_sudoku", "gcd", "spell_backward", "tower_of_hanoi"]


@pytest.mark.parametrize("name", DATASETS)
def test_gold_scores_one_and_matches_the_dataset_scorer(name):
    import reasoning_gym

    examples = load_tasks(f"gym:{name}", limit=8, seed=1)
    reference = reasoning_gym.create_dataset(name, size=8, seed=1)  # independent copy
    assert len(examples) == 8
    for i, ex in enumerate(examples):
        entry = reference[i]
        assert ex.prompt.startswith(entry["question"].strip())
        assert ex.score(ex.gold_response()) == reference.score_answer(entry["answer"], entry) == 1.0
        assert ex.score(entry["answer"]) == 0.0  # no <<<>>>
        wrong = "definitely not the answer"
        assert ex.score(f"<<<{wrong}>>>") == reference.score_answer(wrong, entry) < 1.0


def test_examples_pickle_and_rebuild_their_dataset():
    ex = load_tasks("gym:countdown", limit=3)[2]
    gym.dataset.cache_clear()
    again = pickle.loads(pickle.dumps(ex))
    assert again.score(ex.gold_response()) == 1.0


def test_dataset_without_gold_answer_loads_but_has_no_gold():
    ex = load_tasks("gym:rubiks_cube", limit=1)[0]
    assert ex.answer == "" and ex.metadata["no_gold"]
    with pytest.raises(ValueError, match="no gold answer"):
        ex.gold_response()
    empty = load_tasks("gym:ab", limit=20)[18]  # this item's answer is the empty program
    assert empty.answer == "" and empty.score(empty.gold_response()) == 1.0


def test_all_means_the_papers_84_and_unknown_names_fail():
    assert len(paper_split.GYM_84) == 84 and set(paper_split.GYM_84) <= set(gym.task_names())
    with pytest.raises(ValueError, match="countdown"):
        load_tasks("gym:countdwn")
    test = [t for t in paper_split.TEST_TASKS if t.startswith("gym:")]
    assert len(load_tasks("gym:all", split="test", limit=1)) == len(test) == 21
