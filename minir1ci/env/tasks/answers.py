"""Parsing helpers shared by the verifiers: one strict reading of free-form answers, so that a
format trick is judged the same way everywhere.

  a number   '17', '-3.5', '3/4', '1.2e3', '$12', '50%', '1,234,567'. A comma separates thousands
             only in groups of three after one to three digits ('1,234'; not '1,7' or '12,34');
             nothing else joins digits, so '1 7' is not 17.
  a list     brackets and quotes dropped, items split at commas, semicolons or whitespace, each
             parsed on its own: '7.5' is one item, '1,000' in a list is [1, 0].
  a string   compared as written; only surrounding whitespace and quotes are ignored.

`eval_arith` evaluates + - * / on integers exactly by walking the `ast`, never `eval`.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from fractions import Fraction

_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INT_RE = re.compile(r"[-+]?\d+")
_MAX_EXPR_CHARS = 4000


def _bare(text: str) -> str:
    """Drop what may surround one number: whitespace, \\boxed{}, '$', a final period, a '%'."""
    s = text.strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[len("\\boxed{"):-1].strip()
    s = s.replace("\\$", "$").replace("\\%", "%")
    s = s[1:].lstrip() if s.startswith("$") else s
    s = s[:-1] if s.endswith(".") and not s.endswith("..") else s
    return s[:-1] if s.endswith("%") else s


def _bare_number(text: str) -> str:
    """`_bare`, with the commas of a thousands-separated number removed."""
    s = _bare(text)
    return s.replace(",", "") if _THOUSANDS_RE.fullmatch(s) else s


def parse_number(text: str) -> float | None:
    """'1,234.5', '$12', '-3/4', '50%', '1e3' -> a float; anything else ('1,7', '1 7', '7.5.1') -> None."""
    s = _bare_number(text)
    if "/" in s:
        num, _, den = s.partition("/")
        if _DECIMAL_RE.fullmatch(num) and _DECIMAL_RE.fullmatch(den) and float(den) != 0:
            return float(num) / float(den)
        return None
    return float(s) if _DECIMAL_RE.fullmatch(s) else None


def parse_int(text: str) -> int | None:
    """An integer of any size ('-1,234' -> -1234, '12.0' -> 12), exactly; None if `text` is not one.
    No fractions: '-23040/2' is a sum left undone, not the integer -11520."""
    s = _bare_number(text)
    if _INT_RE.fullmatch(s):
        return int(s)
    value = float(s) if _DECIMAL_RE.fullmatch(s) else None
    return int(value) if value is not None and value.is_integer() and abs(value) < 2 ** 53 else None


def strip_quotes(text: str) -> str:
    s = text.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


def list_items(text: str) -> list[str] | None:
    """The items of a flat or nested list, as written ('[["A", 1], [2]]' -> ['A', '1', '2']), row by
    row; None when an item is empty ('1,,2') or holds a stray quote."""
    s = strip_quotes(text)
    s = s[:-1] if re.search(r"[\])}]\.$", s) else s  # '[1, 2].' ends a sentence
    s = re.sub(r"[\[\](){}]", " ", s).strip()
    if not s:
        return []
    items = [strip_quotes(t) for t in re.split(r"\s*[,;]\s*|\s+", s)]
    if any(not t or re.search(r"[\"'`\s]", t) for t in items):
        return None
    return items


def int_list(text: str) -> list[int] | None:
    """Every item an integer ('[1, -2]' -> [1, -2], '[3.0]' -> [3]; '0.7, 1' -> None; '1,7' -> [1, 7])."""
    items = list_items(text)
    if items is None or not all(re.fullmatch(r"[-+]?\d+(?:\.0*)?", t) for t in items):
        return None
    return [int(t.split(".")[0]) for t in items]


def decimals_written(text: str) -> int:
    """How many digits follow the decimal point in a written number ('1.83' -> 2)."""
    s = _bare(text)
    return len(s.split(".", 1)[1]) if "." in s and "/" not in s and "e" not in s.lower() else 0


def numbers_match(text: str, gold: float, rel_tol: float = 1e-9) -> bool:
    """A written number equals `gold`, exactly or rounded to the (at least two) decimals written:
    '1.83' and '11/6' match 1.8333.., '1.8' does not."""
    value = parse_number(text)
    if value is None or not math.isfinite(value):
        return False
    if math.isclose(value, gold, rel_tol=rel_tol, abs_tol=1e-9):
        return True
    places = decimals_written(text)
    return places >= 2 and abs(value - gold) <= 0.5 * 10 ** -places + 1e-12


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or final period."""
    return " ".join(strip_quotes(text).lower().split()).rstrip(".").strip()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _walk(node: ast.AST, leaves: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        leaves.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:  # a division by zero raises to the caller
        return _OPS[type(node.op)](_walk(node.left, leaves), _walk(node.right, leaves))
    raise ValueError(f"not allowed in an arithmetic answer: {ast.dump(node)[:60]}")


def eval_arith(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integers used (left to right) of a + - * / expression ('×', '÷' read as
    * and /); None for unary minus, powers, names, calls, other number forms, division by zero."""
    expr = expr.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/").strip()
    # plain decimal integers only: python would also read '0x10', '1_0' or '1e1' as numbers
    if not expr or len(expr) > _MAX_EXPR_CHARS or not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        return None
    try:
        leaves: list[int] = []
        return _walk(ast.parse(expr, mode="eval").body, leaves), leaves
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def expression_reaches(expr: str, numbers: list[int], target: int | Fraction, ordered: bool = False) -> bool:
    """`expr` uses exactly `numbers` (as a multiset, or in order) and equals `target`; a trailing
    '= target' or a leading 'target =' is allowed."""
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
