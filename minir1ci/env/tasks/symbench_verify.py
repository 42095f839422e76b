"""Verifiers for the SymBench fact and puzzle tasks (planning tasks: symbench_plan.py).

Each is `check(answer_text, example) -> float`, reading `example.metadata` (the sample's
solution.json is under "solution"). Exact checks want the one right answer; constraint checks
accept any answer that satisfies the puzzle's rules; MATH answers are compared after LaTeX
normalisation. Numbers and lists are read by answers.py's strict rules.
"""
from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

from minir1ci.env.tasks.answers import (expression_reaches, int_list, list_items, numbers_match, parse_int,
                                        parse_number, strip_quotes)
from minir1ci.env.tasks.example import Example


# ---- exact answers ----
def check_ints(answer: str, ex: Example) -> float:
    """The integer items, in order, equal the gold list (matrices read row by row); a single-number
    gold also takes one number with thousands separators ('-514,828')."""
    target = ex.metadata["target_ints"]
    if len(target) == 1 and parse_int(strip_quotes(answer)) == target[0]:
        return 1.0
    return float(int_list(answer) == target)


def check_digit_string(answer: str, ex: Example) -> float:
    """The counts as one string of digits ('201100000', leading zeros count), or as a list of
    integers (string_synthesis asks for "a string of the number of certain block")."""
    target = ex.metadata["target_ints"]
    return float(strip_quotes(answer) == "".join(map(str, target)) or int_list(answer) == target)


_PLAIN_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"  # a list item: no '$', '%', fraction or exponent


def check_number_list(answer: str, ex: Example) -> float:
    """Numbers in order, each equal to the gold or to it rounded to the digits written (pooling)."""
    written, target = list_items(answer), ex.metadata["target_numbers"]
    return float(written is not None and len(written) == len(target)
                 and all(re.fullmatch(_PLAIN_NUMBER, w) and numbers_match(w, t) for w, t in zip(written, target)))


def check_number(answer: str, ex: Example) -> float:
    return float(numbers_match(strip_quotes(answer), float(ex.metadata["target_number"])))


def check_tokens(answer: str, ex: Example) -> float:
    """List items equal one for one, ignoring brackets, quotes and case ('J,Q,H,R')."""
    items = list_items(answer)
    return float(items is not None and [t.upper() for t in items] == [t.upper() for t in list_items(ex.answer)])


def check_string(answer: str, ex: Example) -> float:
    """The string as written: only surrounding whitespace and quotes are ignored."""
    return float(strip_quotes(answer) == ex.answer)


# ---- constraint checks ----
_PAIR = r"[\(\[]\s*(\d+)\s*,\s*(\d+)\s*[\)\]]"


def _pairs(answer: str) -> list[tuple[int, int]] | None:
    """Cells written 'r c, r c' (the questions' format), or '(r, c), (r, c)' / '[[r, c], [r, c]]'."""
    s = strip_quotes(answer)
    if re.fullmatch(rf"\[?\s*{_PAIR}(?:\s*[,;]?\s*{_PAIR})*\s*\]?", s):
        return [(int(r), int(c)) for r, c in re.findall(_PAIR, s)]
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    cells = [re.fullmatch(r"\s*(\d+)\s+(\d+)\s*", item) for item in re.split(r"[,;\n]", s)]
    return None if not all(cells) else [(int(m.group(1)), int(m.group(2))) for m in cells]


def check_queens(answer: str, ex: Example) -> float:
    sol = ex.metadata["solution"]
    n = sol.get("board_size", 8)  # the varied-complexity folders use n queens on n x n
    queens = _pairs(answer)
    if not queens or len(queens) != n or len(set(queens)) != n:
        return 0.0
    blocked = {tuple(p) for p in sol["blocked_positions"]}
    if any(not (0 <= r < n and 0 <= c < n) or (r, c) in blocked for r, c in queens):
        return 0.0
    if not {tuple(p) for p in sol["placed_queens"]} <= set(queens):
        return 0.0
    return float(not any(r1 == r2 or c1 == c2 or abs(r1 - r2) == abs(c1 - c2)
                         for (r1, c1), (r2, c2) in itertools.combinations(queens, 2)))


def solve_logic_puzzle(ex: Example, max_tries: int = 50_000) -> str | None:
    """A valid selection by brute force, for small grids whose reference breaks the rules."""
    grid, k = ex.metadata["solution"]["grid"], ex.metadata["select"]
    first = tuple(ex.metadata["first"])
    others = [(r, c) for r in range(len(grid)) for c in range(len(grid)) if (r, c) != first]
    if math.comb(len(others), k - 1) > max_tries:
        return None
    for rest in itertools.combinations(others, k - 1):
        answer = ", ".join(f"{r} {c}" for r, c in (first, *rest))
        if check_logic_puzzle(answer, ex):
            return answer
    return None


def check_logic_puzzle(answer: str, ex: Example) -> float:
    """Select k distinct cells, including the given first one; row and column rule holds."""
    sol, meta = ex.metadata["solution"], ex.metadata
    grid = sol["grid"]
    n = len(grid)
    cells = _pairs(answer)
    if not cells or len(cells) != meta["select"] or len(set(cells)) != len(cells):
        return 0.0
    if any(not (0 <= r < n and 0 <= c < n) for r, c in cells) or tuple(meta["first"]) not in cells:
        return 0.0
    lines = [[grid[r][c] for r, c in cells if r == i] for i in range(n)]
    lines += [[grid[r][c] for r, c in cells if c == i] for i in range(n)]
    rule = sol["constraints"]["type"]
    for values in filter(None, lines):
        if (rule == "sum_le_4" and sum(values) > 4) or (rule == "product_gt_0" and math.prod(values) <= 0):
            return 0.0
    return 1.0


def check_letter_grid(answer: str, ex: Example) -> float:
    """7x7 Latin square over a..g that keeps the givens and has one letter on the minor diagonal."""
    grid = ex.metadata["solution"]["grid"]
    n = len(grid)
    letters = [t.lower() for t in list_items(answer) or []]
    if len(letters) != n * n:
        return 0.0
    rows = [letters[i * n:(i + 1) * n] for i in range(n)]
    if any(set(line) != set("abcdefg"[:n]) for line in rows + list(zip(*rows))):
        return 0.0
    if any(grid[r][c] and grid[r][c] != rows[r][c] for r in range(n) for c in range(n)):
        return 0.0
    return float(len({rows[i][n - 1 - i] for i in range(n)}) == 1)


def check_sudoku(answer: str, ex: Example) -> float:
    puzzle = ex.metadata["solution"]["puzzle"]
    digits = int_list(answer) or []
    if len(digits) != 81:
        return 0.0
    rows = [digits[i * 9:(i + 1) * 9] for i in range(9)]
    boxes = [[rows[r][c] for r in range(br, br + 3) for c in range(bc, bc + 3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    if any(set(group) != set(range(1, 10)) for group in rows + list(zip(*rows)) + boxes):
        return 0.0
    return float(all(puzzle[r][c] in (0, rows[r][c]) for r in range(9) for c in range(9)))


def _term(term: str, values: dict[str, Fraction]) -> Fraction:
    """'B' or '3.0F' -> its value."""
    if term in values:
        return values[term]
    return Fraction(term[:-1]) * values[term[-1]]


def check_equations(answer: str, ex: Example) -> float:
    """Letters take distinct values from the given set and satisfy every listed relation."""
    meta = ex.metadata
    items = list_items(answer) or []
    if not all(re.fullmatch(_PLAIN_NUMBER, t) for t in items):
        return 0.0
    nums = [Fraction(t) for t in items]
    if sorted(nums) != sorted(Fraction(v) for v in meta["values"]):
        return 0.0
    values = dict(zip(meta["letters"], nums))
    for relation in meta["relations"]:
        parts = relation.split()
        left, right = _term(parts[0], values), _term(parts[2], values)
        if len(parts) == 3:  # X = 3.0Y, X > Y, X < Y
            ok = {"=": left == right, ">": left > right, "<": left < right}[parts[1]]
        else:  # X + Y = 5, X - Y = -3
            ok = (left + right if parts[1] == "+" else left - right) == Fraction(parts[4])
        if not ok:
            return 0.0
    return 1.0


_BOOK_RULES = [
    (re.compile(r"Book (\w) must be placed in position (\d+)"), lambda pos, a, b: pos[a] == int(b)),
    (re.compile(r"Book (\w) cannot be placed in position (\d+)"), lambda pos, a, b: pos[a] != int(b)),
    (re.compile(r"Book (\w) must be to the left of book (\w)"), lambda pos, a, b: pos[a] < pos[b]),
    (re.compile(r"Book (\w) must be to the right of book (\w)"), lambda pos, a, b: pos[a] > pos[b]),
    (re.compile(r"Book (\w) must be adjacent to book (\w)"), lambda pos, a, b: abs(pos[a] - pos[b]) == 1),
]


def check_arrangement(answer: str, ex: Example) -> float:
    """A permutation of the books that satisfies every shelving constraint."""
    sol = ex.metadata["solution"]
    order = [t.upper() for t in list_items(answer) or []]
    if sorted(order) != sorted(sol["items"]):
        return 0.0
    pos = {book: i + 1 for i, book in enumerate(order)}
    for line in sol["constraints_text"].splitlines():
        for pattern, holds in _BOOK_RULES:
            m = pattern.search(line)
            if m:
                if not holds(pos, *m.groups()):
                    return 0.0
                break
        else:
            raise ValueError(f"unrecognised constraint: {line}")
    return 1.0


def _round_result(game: str, mine: str, theirs: str) -> str:
    """Outcome for the player who plays `mine` against `theirs`."""
    if game == "elements":  # A Wood, B Fire, C Earth, D Metal, E Water
        generates = {"A": "B", "B": "C", "C": "D", "D": "E", "E": "A"}
        overcomes = {"A": "C", "C": "E", "E": "B", "B": "D", "D": "A"}
        if overcomes[mine] == theirs or generates[theirs] == mine:
            return "win"
        if overcomes[theirs] == mine or generates[mine] == theirs:
            return "loss"
        return "draw"
    if game == "stick_game":  # Stick > Tiger > Chicken > Worm > Stick; other pairs draw
        beats = {"A": "B", "B": "C", "C": "D", "D": "A"}
        return "win" if beats[mine] == theirs else "loss" if beats[theirs] == mine else "draw"
    # animal: A (Elephant) largest .. H (Mouse) smallest; Mouse captures Elephant, not vice versa
    def captures(x: str, y: str) -> bool:
        return (x, y) == ("H", "A") or (x < y and (x, y) != ("A", "H"))
    return "win" if captures(mine, theirs) else "loss" if captures(theirs, mine) else "draw"


_CARDS = {"elements": "ABCDE", "stick_game": "ABCD", "animal": "ABCDEFGH"}


def solve_card_game(ex: Example) -> str | None:
    """Opponent cards consistent with the stated rules (for references that break them)."""
    sol = ex.metadata["solution"]
    for cards in itertools.permutations(_CARDS[sol["game_type"]], len(sol["player_moves"])):
        if check_card_game(",".join(cards), ex):
            return ",".join(cards)
    return None


def check_card_game(answer: str, ex: Example) -> float:
    """Opponent cards, each used once, that give every announced round result."""
    sol = ex.metadata["solution"]
    cards = [t.upper() for t in list_items(answer) or []]
    if len(cards) != len(sol["player_moves"]) or len(set(cards)) != len(cards) \
            or not set(cards) <= set(_CARDS[sol["game_type"]]):
        return 0.0
    return float(all(_round_result(sol["game_type"], mine, theirs) == result
                     for mine, theirs, result in zip(sol["player_moves"], cards, sol["results"])))


def check_arithmetic_list(answer: str, ex: Example) -> float:
    """'[6, /, 2, +, 7]' (or '6/2+7'): the numbers in the given order, reaching the target. A list
    item is one number, operator or parenthesis: '[1, 2, +, 3]' is not 12+3."""
    sol = ex.metadata["solution"]
    body = strip_quotes(answer)
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [strip_quotes(t) for t in body.split(",")]
    if len(items) > 1 and not all(re.fullmatch(r"\d+|[-+*/()×÷]", t) for t in items):
        return 0.0
    return float(expression_reaches(" ".join(items), sol["numbers"], sol["target"], ordered=True))


def check_game24(answer: str, ex: Example) -> float:
    return float(expression_reaches(answer, ex.metadata["numbers"], ex.metadata["target"]))


def check_letters(answer: str, ex: Example) -> float:
    """'Count: 2, Positions: [1, 3]' with 1-based positions."""
    m = re.fullmatch(r"\s*count\s*[:=]?\s*(\d+)\s*[,;]?\s*positions?\s*[:=]?\s*(\[[^\]]*\])\s*\.?\s*", answer, re.I)
    if not m:
        return 0.0
    word, letter = ex.metadata["word"], ex.metadata["letter"]
    positions = [i + 1 for i, ch in enumerate(word) if ch == letter]
    return float(int(m.group(1)) == len(positions) and int_list(m.group(2)) == positions)


# ---- MATH ----
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalize_latex(text: str) -> str:
    """The usual MATH answer normalisation: units, spacing, fraction spellings, degrees."""
    s = last_boxed(text) or text
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*(units?|degrees?|cm|inches|feet|meters?)\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d)\s+(?=\d)", "~", s)  # '1 7' is two numbers, not 17: keep a mark
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                     ("%", ""), ("\\$", ""), (" ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    if s.startswith("0."):
        s = s[1:]
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


def _latex_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m and int(m.group(3)) != 0:
        return (-1 if m.group(1) else 1) * int(m.group(2)) / int(m.group(3))
    return parse_number(s)


def check_math(answer: str, ex: Example) -> float:
    mine, gold = normalize_latex(answer), normalize_latex(ex.answer)
    if mine == gold:
        return 1.0
    a, b = _latex_number(mine), _latex_number(gold)
    return float(a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b)))
