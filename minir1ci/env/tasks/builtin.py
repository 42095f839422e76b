"""Built-in procedural task families, each with a verifier and an oracle code trajectory.

Code clearly beats text on them for a small model: the oracle's python nearly copies the question
(learnable by a ~1M-parameter model), while text needs the real computation. Families: mul, add,
letters (count a letter), sort, base (2, 8 or 16), date (N days later), game24.
Generation is deterministic per (family, seed); a question is a test question exactly when the hash
of its text falls in bucket 0 of 10, so the splits never share one. The oracle code really runs
(`Example.oracle_segments`): SFT data shows what python printed.

Simplified: one wording per family, no paraphrases (R1-CI varies prompt formats).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import random
import re
import string

from minir1ci.env.tasks.example import Example, Oracle
from minir1ci.env.tasks.answers import expression_reaches, int_list, parse_int, strip_quotes

FAMILIES = ("mul", "add", "letters", "sort", "base", "date", "game24")
DEFAULT_COUNT = 500
TEST_BUCKETS = 10  # 1 question in TEST_BUCKETS is a test question

# The game24 oracle: a recursive search over pairs, no eval. The same source is exec'd here to
# compute gold answers, so the gold is exactly what it prints.
GAME24_SOLVER = '''from itertools import permutations

def solve(items):
    if len(items) == 1:
        return items[0][1] if abs(items[0][0] - 24) < 1e-6 else None
    for i, j in permutations(range(len(items)), 2):
        (x, ex), (y, ey) = items[i], items[j]
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        for v, e in ((x + y, f"({ex}+{ey})"), (x - y, f"({ex}-{ey})"), (x * y, f"({ex}*{ey})"),
                     (x / y if y else None, f"({ex}/{ey})")):
            found = None if v is None else solve(rest + [(v, e)])
            if found:
                return found
    return None
'''
_solver_namespace: dict = {}
exec(compile(GAME24_SOLVER, "<game24-oracle>", "exec"), _solver_namespace)
solve_game24 = _solver_namespace["solve"]


@functools.lru_cache(maxsize=None)
def _game24_answer(nums: tuple[int, ...]) -> str | None:
    return solve_game24([(n, str(n)) for n in nums])  # ~1800 distinct sorted puzzles: cache them all


def is_test_question(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % TEST_BUCKETS == 0


def check_integer(answer: str, ex: Example) -> float:
    return float(parse_int(strip_quotes(answer)) == int(ex.answer))


def check_int_list(answer: str, ex: Example) -> float:
    """Integer items in order: '[7, 52]' or '7, 52'; '7.52' is one (wrong) item."""
    return float(int_list(answer) == int_list(ex.answer))


def check_base(answer: str, ex: Example) -> float:
    """The digits in the asked base, optionally after python's prefix ('0xff'); case ignored."""
    base = ex.metadata["base"]
    digits = strip_quotes(answer).lower()
    prefix = {2: "0b", 8: "0o", 16: "0x"}[base]
    digits = digits[len(prefix):] if digits.startswith(prefix) else digits
    # int() alone would also take '_', spaces and a sign ('f_f', '+ff')
    return float(re.fullmatch(r"[0-9a-f]+", digits) is not None and int(digits, base) == ex.metadata["n"])


def check_date(answer: str, ex: Example) -> float:
    """YYYY-MM-DD only: date.fromisoformat would also take '20240301' or week dates."""
    s = strip_quotes(answer)
    return float(re.fullmatch(r"\d{4}-\d{2}-\d{2}", s) is not None
                 and datetime.date.fromisoformat(s) == datetime.date.fromisoformat(ex.answer))


def check_game24(answer: str, ex: Example) -> float:
    return float(expression_reaches(answer, ex.metadata["numbers"], 24))


# generators: rng -> (prompt, answer, oracle, check, metadata)
def _mul(rng: random.Random):
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    ans = str(a * b)
    return (f"What is {a} * {b}?", ans,
            Oracle("I will multiply with Python.", f"print({a} * {b})", f"The product is <<<{ans}>>>.",
                   f"{a} * {b} = {ans}, so the answer is <<<{ans}>>>."),
            check_integer, {"operands": [a, b]})


def _add(rng: random.Random):
    nums = [rng.randint(10, 99999) for _ in range(rng.randint(3, 5))]
    expr = " + ".join(map(str, nums))
    ans = str(sum(nums))
    return (f"What is {expr}?", ans,
            Oracle("I will add them with Python.", f"print({expr})", f"The sum is <<<{ans}>>>.",
                   f"Adding them up gives {ans}, so the answer is <<<{ans}>>>."),
            check_integer, {"operands": nums})


def _letters(rng: random.Random):
    alphabet = rng.sample(string.ascii_lowercase, rng.randint(4, 7))
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(10, 16)))
    letter = rng.choice(word)
    ans = str(word.count(letter))
    return (f"How many times does the letter '{letter}' appear in '{word}'?", ans,
            Oracle("I will count with Python.", f"print('{word}'.count('{letter}'))",
                   f"The letter appears <<<{ans}>>> times.",
                   f"Counting the '{letter}'s one by one gives {ans}, so the answer is <<<{ans}>>>."),
            check_integer, {"word": word, "letter": letter})


def _sort(rng: random.Random):
    nums = [rng.randint(0, 999) for _ in range(rng.randint(5, 8))]
    listed = ", ".join(map(str, nums))
    ans = str(sorted(nums))
    return (f"Sort these numbers in ascending order: {listed}.", ans,
            Oracle("I will sort them with Python.", f"print(sorted([{listed}]))", f"The sorted list is <<<{ans}>>>.",
                   f"In ascending order they are {ans}, so the answer is <<<{ans}>>>."),
            check_int_list, {"numbers": nums})


def _base(rng: random.Random):
    base = rng.choice([2, 8, 16])
    n = rng.randint(20, 4095) if base == 2 else rng.randint(100, 99999)
    spec = {2: "b", 8: "o", 16: "x"}[base]
    ans = format(n, spec)
    return (f"Write {n} in base {base}.", ans,
            Oracle("I will convert it with Python.", f"print(format({n}, '{spec}'))",
                   f"In base {base} it is <<<{ans}>>>.",
                   f"Dividing repeatedly by {base} gives the digits {ans}, so the answer is <<<{ans}>>>."),
            check_base, {"n": n, "base": base})


def _date(rng: random.Random):
    start = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randint(0, 40 * 365))
    days = rng.randint(20, 400)
    ans = (start + datetime.timedelta(days=days)).isoformat()
    code = f"from datetime import date, timedelta\nprint(date.fromisoformat('{start}') + timedelta(days={days}))"
    return (f"What date is {days} days after {start}? Answer as YYYY-MM-DD.", ans,
            Oracle("I will add the days with Python.", code, f"The date is <<<{ans}>>>.",
                   f"Counting {days} days forward from {start} gives {ans}, so the answer is <<<{ans}>>>."),
            check_date, {"start": start.isoformat(), "days": days})


def _game24(rng: random.Random):
    ans = None
    while not ans:  # about 3 in 4 draws are solvable
        nums = sorted(rng.randint(1, 13) for _ in range(4))
        ans = _game24_answer(tuple(nums))
    listed = ", ".join(map(str, nums))
    code = GAME24_SOLVER + f"\nprint(solve([(n, str(n)) for n in [{listed}]]))"
    return (f"Use the numbers {listed}, each exactly once, with + - * / and parentheses to make 24. "
            "Answer with the expression.", ans,
            Oracle("I will search all expressions with Python.", code, f"One expression is <<<{ans}>>>.",
                   f"Trying combinations of {listed}, I get <<<{ans}>>>."),
            check_game24, {"numbers": nums})


_GENERATORS = {"mul": _mul, "add": _add, "letters": _letters, "sort": _sort, "base": _base,
               "date": _date, "game24": _game24}


def generate(family: str, n: int, split: str | None = None, seed: int = 0) -> list[Example]:
    """Up to `n` distinct questions of `family` in `split` (None: both), deterministic in `seed`.
    Fewer once 5000 draws in a row bring no new question (only game24's ~140 test puzzles do)."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown builtin task {family!r}; valid: {', '.join(FAMILIES)}")
    rng = random.Random(f"builtin:{family}:{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    stale = 0
    while len(out) < n and stale < 5000:
        prompt, answer, oracle, check, meta = _GENERATORS[family](rng)
        if prompt in seen:
            stale += 1
            continue
        seen.add(prompt)
        stale = 0
        test = is_test_question(prompt)
        if split is not None and test != (split == "test"):
            continue
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        out.append(Example(id=f"builtin:{family}:{digest}", task=f"builtin:{family}", prompt=prompt,
                           answer=answer, metadata={**meta, "split": "test" if test else "train"},
                           check=check, oracle=oracle))
    return out
