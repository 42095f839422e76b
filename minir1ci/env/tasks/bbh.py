"""BIG-Bench-Hard: the 27 task files <data>/bbh/<task>.json ({"examples": [{"input", "target"}]}, MIT).

A question is the file's `input` plus a line asking for the answer inside <<<>>>. Verification is
exact match after normalising for the kind of target: choice "(B)" (also "B", "B)", "(B) <its text>"
or the option text), yes/no (case, quotes, final period ignored), number (integers, answers.py),
dyck "] ) >" (whitespace ignored), words (word_sorting: same words, spaces or commas), else text.

Simplified: no few-shot chain-of-thought exemplars (BBH's cot-prompts are not used).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from minir1ci.env.tasks.example import Example
from minir1ci.env.tasks.answers import normalize_text, parse_int, strip_quotes

_CHOICE_RE = re.compile(r"^\(([A-R])\)$")
_OPTION_LINE_RE = re.compile(r"^\(([A-R])\)\s*(.+)$", re.M)


def task_names(root: Path | None) -> list[str]:
    """The task files present under <root>/bbh."""
    folder = Path(root) / "bbh"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (is --data pointing at the folder holding bbh/?)")
    return sorted(p.stem for p in folder.glob("*.json"))


def kind_of(task: str, target: str) -> str:
    if _CHOICE_RE.match(target):
        return "choice"
    if task == "dyck_languages":
        return "dyck"
    if task == "word_sorting":
        return "words"
    if target.lower() in ("yes", "no", "true", "false", "valid", "invalid"):
        return "yesno"
    if re.fullmatch(r"-?\d+", target):
        return "number"
    return "text"


_HINTS = {
    "choice": "Give the letter of the correct option as your final answer, for example <<<(A)>>>.",
    "yesno": "Give your final answer in the form <<<answer>>>.",
    "number": "Give the final number in the form <<<answer>>>.",
    "dyck": "Give only the closing brackets, separated by spaces, in the form <<< answer >>> "
            "(with a space before >>>, since the answer may end with >).",
    "words": "Give the sorted words separated by spaces in the form <<<answer>>>.",
    "text": "Give your final answer in the form <<<answer>>>.",
}


def _choice_letter(answer: str, options: dict[str, str]) -> str | None:
    s = strip_quotes(answer).strip()
    m = re.fullmatch(r"\(?([A-R])\)?[.:]?", s)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\(?([A-R])[).:]\s*(.+)", s, re.S)  # "(B) text of B": the text must be B's
    if m:
        return m.group(1) if normalize_text(m.group(2)) == normalize_text(options.get(m.group(1), "")) else None
    for letter, text in options.items():  # the option written out instead of its letter
        if normalize_text(s) == normalize_text(text):
            return letter
    return None


def check_bbh(answer: str, ex: Example) -> float:
    kind, target = ex.metadata["kind"], ex.answer
    if kind == "choice":
        return float(_choice_letter(answer, ex.metadata["options"]) == _CHOICE_RE.match(target).group(1))
    if kind == "number":
        return float(parse_int(strip_quotes(answer)) == int(target))
    if kind == "dyck":
        return float("".join(answer.split()) == "".join(target.split()))
    if kind == "words":
        return float(re.split(r"[\s,]+", strip_quotes(answer).strip().lower()) == target.lower().split())
    return float(normalize_text(answer) == normalize_text(target))


def load(root: Path, name: str) -> list[Example]:
    valid = task_names(root)
    if name not in valid:
        raise ValueError(f"unknown bbh task {name!r}; valid: {', '.join(valid)}")
    path = Path(root) / "bbh" / f"{name}.json"
    try:
        rows = json.loads(path.read_text())["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{\"examples\": [{{\"input\", \"target\"}}]}} ({err})") from err
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("target"), str):
            raise ValueError(f"{path}: example {i} lacks a string input and target")
        kind = kind_of(name, row["target"])
        options = {m.group(1): m.group(2).strip() for m in _OPTION_LINE_RE.finditer(row["input"])}
        out.append(Example(f"bbh:{name}:{i}", f"bbh:{name}", f"{row['input'].strip()}\n\n{_HINTS[kind]}",
                           row["target"], {"kind": kind, "options": options}, check_bbh))
    return out
