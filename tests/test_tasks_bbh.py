"""BIG-Bench-Hard: all 27 files load, gold answers score 1, and the normalisation of choices,
yes/no, numbers, Dyck sequences and word lists accepts the usual spellings and nothing else.

Skipped where the shared data is absent ($MINIR1CI_DATA or ../shared/data).
"""
import json

import pytest

from minir1ci.env.tasks import bbh, load_tasks, resolve_data_dir

try:
    ROOT = resolve_data_dir()
except FileNotFoundError:
    ROOT = None
pytestmark = pytest.mark.skipif(ROOT is None or not (ROOT / "bbh").is_dir(), reason="shared BBH data absent")

NAMES = bbh.task_names(ROOT) if ROOT is not None and (ROOT / "bbh").is_dir() else []
_cache: dict = {}


def loaded(name):
    if name not in _cache:
        _cache[name] = bbh.load(ROOT, name)
    return _cache[name]


def test_all_27_tasks_are_present():
    assert len(NAMES) == 27 and "navigate" in NAMES and "word_sorting" in NAMES


def _wrong(ex):
    kind, target = ex.metadata["kind"], ex.answer
    if kind == "choice":
        return "(A)" if target != "(A)" else "(B)"
    if kind == "yesno":
        flip = {"yes": "no", "no": "yes", "true": "false", "false": "true", "valid": "invalid", "invalid": "valid"}
        return flip[target.lower()]
    if kind == "number":
        return str(int(target) + 1)
    if kind == "dyck":
        return " ".join(target.split()[:-1]) or ")"
    if kind == "words":
        words = target.split()
        return " ".join(words[1:] + words[:1]) if len(set(words)) > 1 else words[0] + " extra"
    return target + " extra"


@pytest.mark.parametrize("name", NAMES)
def test_gold_scores_one_and_wrong_scores_zero(name):
    examples = loaded(name)
    raw = json.loads((ROOT / "bbh" / f"{name}.json").read_text())["examples"]
    assert [ex.answer for ex in examples] == [row["target"] for row in raw]
    for ex in examples:
        assert ex.score(ex.gold_response()) == 1.0
    for ex in examples[:3] + examples[-2:]:
        assert ex.score(f"<<<{_wrong(ex)}>>>") == 0.0, (ex.id, _wrong(ex))
        assert ex.score(ex.answer) == 0.0 or ex.answer in ("<<<", ">>>")  # no <<<>>>
        assert ex.score("<<<>>>") == 0.0


def test_choice_spellings():
    ex = next(e for e in loaded("date_understanding") if e.answer == "(B)")
    option_b = ex.metadata["options"]["B"]
    for spelling in ("(B)", "B", "B)", f"(B) {option_b}", option_b, " 'B' "):
        assert ex.score(f"<<<{spelling}>>>") == 1.0, spelling
    for spelling in ("(C)", "Both", "(B or C)", ""):
        assert ex.score(f"<<<{spelling}>>>") == 0.0, spelling


def test_yes_no_true_false_ignore_case_and_period():
    nav = next(e for e in loaded("navigate") if e.answer == "No")
    assert nav.score("<<<no>>>") == nav.score("<<<No.>>>") == nav.score('<<<"NO">>>') == 1.0
    assert nav.score("<<<Yes>>>") == 0.0
    boolean = next(e for e in loaded("boolean_expressions") if e.answer == "True")
    assert boolean.score("<<<true>>>") == 1.0 and boolean.score("<<<1>>>") == 0.0


def test_numbers_dyck_and_word_lists():
    arith = next(e for e in loaded("multistep_arithmetic_two") if e.answer == "-11520")
    assert arith.score("<<<-11,520>>>") == arith.score("<<<-11520.0>>>") == 1.0
    assert arith.score("<<<11520>>>") == 0.0
    dyck = next(e for e in loaded("dyck_languages") if e.answer == "] ] >")
    assert dyck.score("<<<]]> >>>") == dyck.score("<<< ] ] > >>>") == 1.0
    assert dyck.score("<<<] ] ) >>>") == 0.0
    words = next(e for e in loaded("word_sorting") if e.answer == "syndrome therefrom")
    assert words.score("<<<syndrome, therefrom>>>") == words.score("<<<Syndrome therefrom>>>") == 1.0
    assert words.score("<<<therefrom syndrome>>>") == 0.0


def test_free_text_target_in_a_choice_task():
    ex = next(e for e in loaded("movie_recommendation") if e.answer == "Monsters, Inc")
    assert ex.metadata["kind"] == "text"
    assert ex.score("<<<monsters, inc.>>>") == 1.0 and ex.score("<<<(A)>>>") == 0.0


def test_task_level_split_and_errors(tmp_path):
    test_tasks = {e.task for e in load_tasks("bbh:all", split="test", limit=1)}
    assert "bbh:navigate" in test_tasks and "bbh:snarks" not in test_tasks
    assert len(load_tasks("bbh:all", split="train", limit=1)) + len(test_tasks) == 27
    with pytest.raises(ValueError, match="boolean_expressions"):
        load_tasks("bbh:navigation")
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "broken.json").write_text('{"examples": [{"input": "q"}]}')
    with pytest.raises(ValueError, match="broken.json"):
        bbh.load(tmp_path, "broken")
