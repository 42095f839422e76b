"""Parsing helpers shared by the verifiers: numbers, lists, tokens, safe arithmetic.

Every verifier reads a model's free-form answer; these functions make the common
readings explicit (thousands separators, fractions, brackets and quotes around
list items) so that one format mistake is judged the same way everywhere.

`eval_arith` evaluates + - * / expressions on integers with exact fractions by
walking the `ast`, never `eval`: model answers are untrusted text.
"""
from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

_INT_RE = re.compile(r"-?\d+")
_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_MAX_EXPR_CHARS = 4000


def parse_number(text: str) -> float | None:
    """'1,234.5', '$12', '-3/4', '50%' -> a float; anything else -> None."""
    s = text.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    s = s.replace("\\$", "").rstrip("%")
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{"):-1]
    if "/" in s:
        num, _, den = s.partition("/")
        if _NUMBER_RE.match(num) and _NUMBER_RE.match(den) and float(den) != 0:
            return float(num) / float(den)
        return None
    return float(s) if _NUMBER_RE.match(s) else None


def parse_int(text: str) -> int | None:
    """An integer of any size ('-1,234' -> -1234), exactly; None if `text` is not one."""
    s = text.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d+", s):
        return int(s)
    value = parse_number(s)  # '1234.0' still counts
    return int(value) if value is not None and value.is_integer() and abs(value) < 2 ** 53 else None


def decimals_written(text: str) -> int:
    """How many digits follow the decimal point in a written number ('1.83' -> 2)."""
    s = text.strip().replace(",", "")
    return len(s.split(".", 1)[1].rstrip("%")) if "." in s and "/" not in s else 0


def numbers_match(text: str, gold: float, rel_tol: float = 1e-9) -> bool:
    """A written number equals `gold`, exactly or as `gold` rounded to the digits written.

    '1.83' matches 1.8333.. (rounded to 2 places), '1.8' does not match it (one
    decimal is too coarse to count as the answer); '11/6' matches it exactly.
    """
    value = parse_number(text)
    if value is None or not math.isfinite(value):
        return False
    if math.isclose(value, gold, rel_tol=rel_tol, abs_tol=1e-9):
        return True
    places = decimals_written(text)
    return places >= 2 and abs(value - gold) <= 0.5 * 10 ** -places + 1e-12


def numbers_in(text: str) -> list[str]:
    """Every number written in `text`, as written ('[7.89, -1]' -> ['7.89', '-1'])."""
    return re.findall(r"-?\d+(?:\.\d+)?", text)


def ints_in(text: str) -> list[int]:
    """Every integer written in `text`, in order ('[[1, -2], [3]]' -> [1, -2, 3])."""
    return [int(m) for m in _INT_RE.findall(text)]


def tokens(text: str) -> list[str]:
    """List items without brackets, quotes and separators ('["A", "B"]' -> ['A', 'B'])."""
    cleaned = re.sub(r"[\[\]()\"'`]", " ", text)
    return [t for t in re.split(r"[\s,;]+", cleaned) if t]


def strip_quotes(text: str) -> str:
    s = text.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final period."""
    return " ".join(strip_quotes(text).lower().split()).rstrip(".").strip()


def _walk(node: ast.AST, leaves: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, leaves)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        leaves.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _walk(node.left, leaves), _walk(node.right, leaves)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right  # ZeroDivisionError -> caller
    raise ValueError(f"not allowed in an arithmetic answer: {ast.dump(node)[:60]}")


def eval_arith(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integers used (left to right) of a + - * / expression.

    Unary minus, powers, names and calls are rejected (None), as is division by zero.
    '×' and '÷' are read as * and /.
    """
    expr = expr.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/").strip()
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        leaves: list[int] = []
        return _walk(tree, leaves), leaves
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def expression_reaches(expr: str, numbers: list[int], target: int | Fraction, ordered: bool = False) -> bool:
    """`expr` uses exactly `numbers` (as a multiset, or in order) and equals `target`.

    A trailing '= target' is allowed, as is a leading 'target ='.
    """
    parts = [p.strip() for p in expr.split("=")]
    candidates = [p for p in parts if p and parse_number(p) != float(target)] or parts[:1]
    if len(candidates) != 1:
        return False
    result = eval_arith(candidates[0])
    if result is None:
        return False
    value, leaves = result
    same = leaves == list(numbers) if ordered else sorted(leaves) == sorted(numbers)
    return same and value == Fraction(target)
