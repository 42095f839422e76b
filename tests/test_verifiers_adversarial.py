"""Verifiers against adversarial answers: every task family accepts the formats its question
admits (with harmless slack: whitespace, brackets and quotes around lists) and refuses answers
that only look right once digits are split or joined ('7.5' for [7, 5], '1,7' for 17).

Every refused answer below was hand-checked to be wrong under the question's format; most
were accepted by the earlier, more lenient parsing. SymBench and BBH cases skip without the
shared data ($MINIR1CI_DATA or ../shared/data).
"""
import warnings

import pytest

from minir1ci.env.tasks import Example, bbh, builtin, resolve_data_dir, symbench
from minir1ci.env.tasks import symbench_plan as plan
from minir1ci.env.tasks import symbench_verify as v
from minir1ci.env.tasks.answers import int_list, list_items, parse_int, parse_number

try:
    ROOT = resolve_data_dir()
except FileNotFoundError:
    ROOT = None
needs_symbench = pytest.mark.skipif(ROOT is None or not (ROOT / "symbench").is_dir(), reason="SymBench data absent")
needs_bbh = pytest.mark.skipif(ROOT is None or not (ROOT / "bbh").is_dir(), reason="BBH data absent")

_cache: dict = {}


def first(name: str, pred=lambda ex: True) -> Example:
    if name not in _cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cache[name] = symbench.load(ROOT, name)
    return next(ex for ex in _cache[name] if pred(ex))


def scores(ex: Example, answers: list[str]) -> list[float]:
    return [ex.score(f"<<<{a}>>>") for a in answers]


# ---- the parsing rules ----------------------------------------------------------------------------

def test_a_number_is_one_number():
    assert parse_number("1,234,567.5") == 1234567.5 and parse_number("-3/4") == -0.75
    assert parse_number("$12.") == 12 and parse_number("50%") == 50
    for not_one in ("1,7", "1 7", "12,34", "1234,567", "1,2345", "7.5.1", "1_000", "- 5", "0.0, 0.7"):
        assert parse_number(not_one) is None, not_one
    assert parse_int("-514,828") == -514828 and parse_int("12.0") == 12 and parse_int("7.5") is None
    assert parse_int("1 7") is None and parse_int("1,7") is None and parse_int("-23040/2") is None
    assert parse_int("1" * 40) == int("1" * 40)  # exact, beyond float precision


def test_a_list_is_its_elements():
    assert list_items('[["A", 1], [2]]') == ["A", "1", "2"]
    assert list_items("16, 0\n4, 2") == ["16", "0", "4", "2"]
    assert list_items("1,,2") is None and list_items('"1", "2') is None
    assert int_list("7.5") is None and int_list("[7, 5]") == [7, 5] and int_list("1,000") == [1, 0]
    assert int_list("0.0, 0.7, 0.9") is None


# ---- SymBench, every task family (the first sample of each task, golds shown) ----------------------

# name: (gold of the sample used, answers accepted, answers refused); sudoku and the
# two-digit counts are built from their golds in the tests below.
LETTER_ROWS = ["c,g,e,f,b,a,d", "g,e,f,b,a,d,c", "e,f,b,a,d,c,g", "f,b,a,d,c,g,e", "b,a,d,c,g,e,f", "a,d,c,g,e,f,b",
               "d,c,g,e,f,b,a"]
LIGHTS = "0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0"
QUEENS = "0 0, 1 4, 2 7, 3 5, 4 2, 5 6, 6 1, 7 3"
PLAN = "Move A from 2 to 1\nMove B from 2 to 3\nMove A from 1 to 2\nMove B from 3 to 2"
CASES = {
    "2048": ("16, 0\n4, 2",
             ["[[16, 0], [4, 2]]", "16 0\n4 2", "16,0,4,2"],
             ["16.0, 4.2", "160, 42", "1,6,0,4,2", "16, 0, 4, 2, 0"]),
    "pattern_recognition": ("[5, 6]",
                            ["[5, 6]", "5, 6", "(5, 6)", " [ 5 , 6 ] ", "[5, 6].", "[5.0, 6]"],
                            ["5.6", "[5.6]", "56", "5, 6, 0", "row 5, column 6", "[5%, 6%]", "[5e0, 6]",
                             "[10/2, 6]"]),
    "synthesis_decomposition": ("[1, 0, 2]",
                                ["1 0 2", "(1, 0, 2)"],
                                ["1.0, 2", "10, 2", "102", "1, 0, 2.5"]),
    "string_splitting": ('["0", "0", "1", "2", "0", "3"]',
                         ["0, 0, 1, 2, 0, 3", "['0','0','1','2','0','3']"],
                         ["0.0, 1.2, 0.3", "001203", "0, 0, 12, 0, 3", "0, 0, 1, 2, 0"]),
    "string_synthesis": ("2 0 1 1 0 0 0 0 0",
                         ["201100000", "'201100000'", "[2, 0, 1, 1, 0, 0, 0, 0, 0]", "2,0,1,1,0,0,0,0,0"],
                         ["2.0, 1.1, 0.0, 0.0, 0", "2011 00000", "20110000", "201100000.0", "2 0 1 1 0 0 0 0 0 0"]),
    "mahjong_pattern": ("0",
                        ["0", "[0]", "'0'"],
                        ["0 0", "0.1", "0, 1", "00 0"]),
    "light_puzzles": (LIGHTS,
                      [f"[{LIGHTS.replace(' ', '')}]", "0 0 1 0 0\n0 1 1 1 0\n1 0 0 1 1\n1 0 1 1 1\n0 1 1 0 0"],
                      ["0.0, 1.0, 0.0, 1.1, 1.0, 1.0, 0.1, 1.1, 0.1, 1.1, 0.1, 1.0, 0", "0010001110100111011101100"]),
    "number_multiply": ("-171229311",
                        ["-171,229,311", "-171229311.", "$-171229311"],
                        ["-171,2293,11", "-1 71229311", "-171229311.5", "-17,1229311", "-342458622/2"]),
    "number_multiply_varied": ("4199830",
                               ["4,199,830", "4199830.0"],
                               ["41,99,830", "4 199 830", "4199,830"]),
    "gsm_hard": ("-9867630",
                 ["-9,867,630", "-9867630.0"],
                 ["-9,86,7630", "-98 67630", "-9867630.5"]),
    "new_operator": ("90",
                     ["90", "90.0", "'90'"],
                     ["9,0", "9 0", "[9, 0]", "90.5"]),
    "pooling": ("16, 20, 16, 16",
                ["[[16, 20], [16, 16]]", "16 20\n16 16", "16.0, 20.0, 16.0, 16.0"],
                ["a16 b20 c16 d16", "16, 20, 16, 16, x", "16.20, 16.16", "1620, 1616", "$16, 20, 16, 16",
                 "32/2, 20, 16, 16"]),
    "matrix_transformation": ("J,Q,H,R",
                              ["[[J, Q], [H, R]]", "J Q\nH R", '["J","Q","H","R"]', "j,q,h,r"],
                              ["JQ,HR", "JQHR", "J,Q,H,R,X", "J,Q,R,H", "J`Q`H`R"]),
    "reversi": ("*,*,*,*,*,1,0,*,*,0,0,*,*,*,0,*",
                ["[*,*,*,*],[*,1,0,*],[*,0,0,*],[*,*,0,*]", "* * * *\n* 1 0 *\n* 0 0 *\n* * 0 *"],
                ["****\n*10*\n*00*\n**0*", "*,*,*,*,*,10,*,*,0,0,*,*,*,0,*", "*,*,*,*,*,1,0,*,*,0,0,*,*,*,0",
                 "*'*'*'*'*'1'0'*'*'0'0'*'*'*'0'*"]),
    "cryptanalysis": ('["5", "3", "F", "A"]',
                      ["5, 3, F, A", "['5','3','F','A']", '["5", "3", "f", "a"]'],
                      ['["53", "FA"]', "53FA", '["5", "3", "FA"]', '["5", "3", "A", "F"]']),
    "permutations_and_combinations": ('["A", "C", "E", "F", "B", "D"]',
                                      ["A, C, E, F, B, D", "[A,C,E,F,B,D]"],
                                      ["ACEFBD", '["AC", "E", "F", "B", "D"]', "A, C, E, F, B, D, D", 'A"C"E"F"B"D']),
    "constrained_linear_arrangement": ("D,E,B",
                                       ["[D, E, B]", '["D", "E", "B"]', "D E B"],
                                       ["DEB", "D,E", "D,E,B,A", "D'E'B"]),
    "letter_logic_diagram": ("\n".join(LETTER_ROWS),
                             [str([row.split(",") for row in LETTER_ROWS])],
                             ["c1" + "\n".join(LETTER_ROWS)[1:],  # 'c1' read as the letter c before
                              "\n".join(row.replace(",", "") for row in LETTER_ROWS)]),
    "logical_equation": ("[36, 1, 80, 3, 4, 121, 16, 27, 9]",
                         ["36, 1, 80, 3, 4, 121, 16, 27, 9", "[36.0, 1, 80, 3, 4, 121, 16, 27, 9]"],
                         ["A=36, B=1, C=80, D=3, E=4, F=121, G=16, H=27, I=9", "[361, 80, 3, 4, 121, 16, 27, 9]",
                          "[1, 36, 80, 3, 4, 121, 16, 27, 9]"]),
    "eight_queens": (QUEENS,
                     ["(0, 0), (1, 4), (2, 7), (3, 5), (4, 2), (5, 6), (6, 1), (7, 3)",
                      "[[0, 0], [1, 4], [2, 7], [3, 5], [4, 2], [5, 6], [6, 1], [7, 3]]", QUEENS.replace(", ", "\n")],
                     ["0.0, 1.4, 2.7, 3.5, 4.2, 5.6, 6.1, 7.3", QUEENS.replace(",", ""),
                      "00, 14, 27, 35, 42, 56, 61, 73", QUEENS + ", 7 3"]),
    "logic_puzzle": ("0 1, 1 0, 0 0",
                     ["(0, 1), (1, 0), (0, 0)", "0 1, 0 0, 1 0"],
                     ["0.1, 1.0, 0.0", "0 1 1 0 0 0", "01, 10, 00"]),
    "combinatorial_calculation": ("[6, /, 2, +, 7]",
                                  ["6/2+7", "[6, /, 2, +, 7]", "['6', '/', '2', '+', '7']"],
                                  ["[6/2, +, 7]", "[6, /, 2, +, 7, =, 11]", "[6, /, 2, +, 7.0]", "[7, +, 6, /, 2]"]),
    "game24_varied": ("(356-332)",
                      ["356-332", "356 - 332 = 24"],
                      ["(356-33_2)", "0x164-332", "356-332.0", "24"]),
    "letters": ("Count: 1, Positions: [2]",
                ["count: 1, positions: [2]", "Count: 1 Positions: [2]."],
                ["Count: 1 or 2, Positions: [2]", "Count: 1.5, Positions: [2]", "Count: 1, Positions: [2], [3]",
                 "1, [2]"]),
    "math_counting_and_probability": ("1000",
                                      ["1,000", "\\boxed{1000}", "1000.0"],
                                      ["1 000", "10,00", "1,0,0,0"]),
    "math_geometry": ("(18, -18)",
                      ["(18,-18)", "\\left(18, -18\\right)"],
                      ["(1 8, -18)", "(18, -1 8)", "(18, 18)"]),
    "string_insertion": ("DBCDEBDCDEACECDEAC",
                         ['"DBCDEBDCDEACECDEAC"', " DBCDEBDCDEACECDEAC "],
                         ["DBCDEB DCDEACECDEAC", "dbcdebdcdeacecdeac", "['DBCDEBDCDEACECDEAC']x"]),
    "string_deletion_and_modification": ("bbccbbbbacbabbba",
                                         ['"bbccbbbbacbabbba"'],
                                         ["bbcc bbbbacbabbba", "bbccbbbbacbabbb"]),
    "blocksworld": (PLAN,
                    ["move A from stack 2 to stack 1" + PLAN[len("Move A from 2 to 1"):] + "."],
                    [PLAN.replace("\n", ", "), PLAN.replace("A", "a").replace("B", "b"),
                     PLAN.replace("1 to 2", "1.5 to 2")]),
}


@needs_symbench
@pytest.mark.parametrize("name", sorted(CASES))
def test_symbench_accepts_the_asked_format_and_refuses_tricks(name):
    gold, accepted, refused = CASES[name]
    ex = first(name)
    assert ex.answer == gold  # the hand-made answers below are built for this gold
    assert scores(ex, accepted) == [1.0] * len(accepted), accepted
    assert scores(ex, refused) == [0.0] * len(refused), refused


@needs_symbench
def test_string_synthesis_answer_is_a_string_leading_zeros_included():
    ex = first("string_synthesis", lambda e: e.answer.startswith("0"))
    digits = ex.answer.replace(" ", "")  # e.g. '030210001'
    assert ex.score(f"<<<{digits}>>>") == 1.0
    assert ex.score(f"<<<{digits.lstrip('0')}>>>") == 0.0  # the number, not the string
    assert ex.score(f"<<<{ex.answer}>>>") == 1.0


@needs_symbench
def test_a_two_digit_count_is_not_two_numbers():
    ex = first("statistical_counting", lambda e: len(e.answer) == 2)
    a, b = ex.answer
    assert scores(ex, [ex.answer, f"{ex.answer}.0", f"[{ex.answer}]"]) == [1.0] * 3
    assert scores(ex, [f"{a},{b}", f"{a} {b}", f"{a}.{b}", f"[{a}, {b}]"]) == [0.0] * 4


@needs_symbench
def test_sudoku_digits_must_be_separate_integers():
    ex = first("standard_sudoku")
    digits = int_list(ex.answer)
    rows = "\n".join(",".join(map(str, digits[i:i + 9])) for i in range(0, 81, 9))
    assert ex.score(f"<<<{rows}>>>") == 1.0
    pairs = ", ".join(f"{digits[i]}.{digits[i + 1]}" for i in range(0, 80, 2)) + f", {digits[80]}"
    assert ex.score(f"<<<{pairs}>>>") == 0.0  # 41 decimals are not 81 digits
    assert ex.score(f"<<<{''.join(map(str, digits))}>>>") == 0.0  # one 81-digit number


@needs_symbench
@pytest.mark.parametrize("name", ["eight_queens_2", "eight_queens_hard", "eight_queens_varied"])
def test_queen_variants_refuse_decimal_cells(name):
    ex = first(name)
    assert ex.score(f"<<<{ex.answer.replace(' ', '.').replace(',.', ', ')}>>>") == 0.0
    assert ex.score(f"<<<{ex.answer.replace(', ', ' ')}>>>") == 0.0  # no commas: not 'r c, r c'
    assert ex.score(f"<<<[{ex.answer}]>>>") == 1.0


@needs_symbench
def test_game24_numbers_are_plain_decimal_integers():
    ex = first("game24")  # 1 1 4 6: ((1-1)+(4*6))
    assert scores(ex, ["(1-1)+4*6", "4*6+1-1 = 24"]) == [1.0, 1.0]
    assert scores(ex, ["(1-1)+4*0x6", "(1-1)+4*6.0", "(1-1)+4*6 = 25", "11+4*6"]) == [0.0] * 4


def test_arithmetic_list_items_are_single_tokens():
    ex = Example("t", "symbench:combinatorial_calculation", "", "[12, +, 3]",
                 {"solution": {"numbers": [12, 3], "target": 15}}, v.check_arithmetic_list)
    assert scores(ex, ["[12, +, 3]", "12+3", "[(, 12, +, 3, )]"]) == [1.0] * 3
    assert scores(ex, ["[1, 2, +, 3]", "[12+3]x", "[12, +, 3, +, 0]"]) == [0.0] * 3


def test_boxlift_lifters_are_integers_not_booleans():
    ex = Example("t", "symbench:boxlift", "", "", {"boxes": [50, 30], "lifters": [40, 20], "max_steps": 2},
                 plan.check_boxlift)
    assert ex.score("<<<Step 1: [(50, (0, 1))]\nStep 2: [(30, [0])]>>>") == 1.0
    assert ex.score("<<<Step 1: [(50, [False, 1])]\nStep 2: [(30, [0])]>>>") == 0.0  # False == 0 in python
    assert ex.score("<<<Step 1: [(50, [0, 1])]\nStep 2: [(30, [0.0])]>>>") == 0.0
    assert ex.score("<<<Step 1: [(50, '01')]\nStep 2: [(30, [0])]>>>") == 0.0
    assert ex.score("<<<Step 1: [(True, [0]), (50, [0, 1])]\nStep 2: [(30, [0])]>>>") == 0.0


def test_boxnet_refuses_moves_to_unknown_squares():
    grid = {"0.5_0.5": ["box_red"], "0.5_1.5": ["target_red"]}
    ex = Example("t", "symbench:boxnet", "", "", {"grid": grid}, plan.check_boxnet)
    assert ex.score('<<<[{"Agent[0.5, 0.5]": "move(box_red, square[0.5, 1.5])"}, '
                    '{"Agent[0.5, 1.5]": "move(box_red, target_red)"}]>>>') == 1.0
    assert ex.score('<<<[{"Agent[0.5, 0.5]": "move(box_red, square[0.5, 1.5.0])"}]>>>') == 0.0
    assert ex.score('<<<[{"Agent[0.5, 0.5]": "move(box_red, square[0.5, -0.5])"}]>>>') == 0.0
    assert ex.score('<<<[{"Agent[0.5, 1.5]": "move(box_red, target_red)"}]>>>') == 0.0  # box is elsewhere


# ---- BIG-Bench-Hard ----------------------------------------------------------------------------------

@needs_bbh
def test_bbh_numbers_and_lists_refuse_tricks():
    arith = next(e for e in bbh.load(ROOT, "multistep_arithmetic_two") if e.answer == "-11520")
    assert scores(arith, ["-11,520", "-11520", "'-11520'"]) == [1.0] * 3
    assert scores(arith, ["-1,1520", "-11 520", "-115,20", "-11520.5", "-11520 or -11521", "-23040/2"]) == [0.0] * 6
    count = next(e for e in bbh.load(ROOT, "object_counting") if e.answer == "12")
    assert scores(count, ["12", "12."]) == [1.0, 1.0]
    assert scores(count, ["1,2", "1 2", "1.2", "twelve"]) == [0.0] * 4
    choice = next(e for e in bbh.load(ROOT, "date_understanding") if e.answer == "(B)")
    assert scores(choice, ["(B) or (C)", "(B)(C)", "B C"]) == [0.0] * 3
    nav = next(e for e in bbh.load(ROOT, "navigate") if e.answer == "No")
    assert scores(nav, ["No or Yes", "No, Yes"]) == [0.0, 0.0]
    words = next(e for e in bbh.load(ROOT, "word_sorting") if e.answer == "syndrome therefrom")
    assert scores(words, ["syndrome therefrom therefrom", "syndrometherefrom"]) == [0.0, 0.0]
    dyck = next(e for e in bbh.load(ROOT, "dyck_languages") if e.answer == "] ] >")
    assert scores(dyck, ["] ] > )", "] ]"]) == [0.0, 0.0]


# ---- built-in families ----------------------------------------------------------------------------

def _builtin(family, answer, **meta):
    check = {"mul": builtin.check_integer, "sort": builtin.check_int_list, "base": builtin.check_base,
             "date": builtin.check_date, "game24": builtin.check_game24}[family]
    return Example(f"t:{family}", f"builtin:{family}", "", answer, meta, check)


def test_builtin_families_refuse_tricks():
    mul = _builtin("mul", "5535")
    assert scores(mul, ["5535", "5,535", "5535.0"]) == [1.0] * 3
    assert scores(mul, ["55,35", "5 535", "5535.5", "5,5,3,5", "5_535", "11070/2", "123*45"]) == [0.0] * 7
    sort = _builtin("sort", "[7, 52, 91]")
    assert scores(sort, ["[7, 52, 91]", "7 52 91", "(7, 52, 91)"]) == [1.0] * 3
    assert scores(sort, ["[7.52, 91]", "[75, 2, 91]", "[7, 5.2, 91]", "[7, 52, 91, 91]"]) == [0.0] * 4
    base = _builtin("base", "ff", n=255, base=16)
    assert scores(base, ["ff", "0xFF", "'FF'"]) == [1.0] * 3
    assert scores(base, ["f f", "f_f", "+ff", "0xf f"]) == [0.0] * 4
    date = _builtin("date", "2024-03-01")
    assert scores(date, ["2024-03-01", "'2024-03-01'"]) == [1.0] * 2
    assert scores(date, ["20240301", "2024-W09-5", "2024-03-01T00:00"]) == [0.0] * 3
    g24 = _builtin("game24", "8/(3-8/3)", numbers=[3, 3, 8, 8])
    assert scores(g24, ["0x8/(3-8/3)", "8/(3-8/3_0)", "8.0/(3-8/3)"]) == [0.0] * 3
