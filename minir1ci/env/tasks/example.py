"""The one example type of every task source, and trusted execution of the built-in oracle code.

`Example.score(response)` hands the last <<<...>>> of a response to the example's verifier; a
response without one, or one the verifier cannot parse, scores 0.

Simplified: verifiers are plain functions of (answer text, example); no LLM extracts answers as in
CodeSteer, so an answer must be inside <<<>>>.
"""
from __future__ import annotations

import contextlib
import functools
import io
import traceback
from dataclasses import dataclass, field
from typing import Callable

from minir1ci.env import prompts


@dataclass
class Oracle:
    """A known-good code trajectory for one question (built-in families only)."""
    lead: str        # text before the python block
    code: str        # trusted code that prints what the conclusion needs
    conclusion: str  # text after the interpreter output, holding <<<answer>>>
    text_only: str   # the same answer without code: brief reasoning + <<<answer>>>


@dataclass
class Example:
    id: str
    task: str                     # "source:name", e.g. "symbench:game24"
    prompt: str
    answer: str                   # the gold answer, as written inside <<<...>>> (metadata "no_gold": none)
    metadata: dict = field(default_factory=dict)
    # (answer_text, example) -> score in [0, 1]; None means exact match after strip().
    # Module-level functions only, so examples pickle across processes.
    check: Callable[[str, "Example"], float] | None = field(default=None, repr=False, compare=False)
    oracle: Oracle | None = field(default=None, repr=False, compare=False)

    def score(self, response_text: str) -> float:
        answer = prompts.extract_answer(response_text)
        if answer is None:
            return 0.0
        check = self.check or exact_match
        try:
            value = float(check(answer, self))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, SyntaxError,
                RecursionError):
            return 0.0  # an answer the verifier cannot parse is wrong, not a crash
        return min(max(value, 0.0), 1.0)

    def gold_response(self) -> str:
        if self.metadata.get("no_gold"):
            raise ValueError(f"{self.id}: this example has no gold answer")
        # '<<<] >>>>>' reads back as '] ' (the first '>>>' closes it): pad such answers with spaces
        pad = " " if self.answer.startswith("<") or self.answer.endswith(">") else ""
        return f"<<<{pad}{self.answer}{pad}>>>"

    def messages(self, use_code: bool) -> list[dict]:
        return [{"role": "system", "content": prompts.system_prompt(use_code)},
                {"role": "user", "content": self.prompt}]

    def oracle_segments(self, use_code: bool = True) -> list[dict]:
        """Assistant content as segments (DEVELOPERS.md): with code, reasoning + python block, the
        block's real output, then the conclusion; without, one text segment."""
        if self.oracle is None:
            if use_code:
                raise ValueError(f"{self.id}: no oracle code trajectory (only built-in families have one)")
            return [{"type": "text", "text": self.gold_response()}]
        if not use_code:
            return [{"type": "text", "text": self.oracle.text_only}]
        stdout, stderr = run_trusted(self.oracle.code)
        if stderr or self.answer not in stdout:
            raise RuntimeError(f"{self.id}: oracle code disagrees with the gold answer: {stdout!r} {stderr!r}")
        block = f"{self.oracle.lead}\n{prompts.CODE_OPEN}{self.oracle.code}{prompts.CODE_CLOSE}"
        return [{"type": "text", "text": block},
                {"type": "output", "text": prompts.render_output(stdout, stderr)},
                {"type": "text", "text": self.oracle.conclusion}]


def exact_match(answer: str, example: Example) -> float:
    return float(answer.strip() == example.answer.strip())


@functools.lru_cache(maxsize=8192)
def run_trusted(code: str) -> tuple[str, str]:
    """(stdout, stderr) of our own oracle code, run in-process: model code goes to the sandbox.
    Cached, since SFT data asks for the same question more than once."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(compile(code, "<oracle>", "exec"), {"__name__": "__main__"})
        except Exception:  # noqa: BLE001 - the traceback is the output, as in a real run
            err.write(traceback.format_exc(limit=1))
    return out.getvalue(), err.getvalue()
