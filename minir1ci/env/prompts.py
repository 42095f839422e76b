"""The text conventions of R1-Code-Interpreter, in one place.

System prompts (code and text-only), how a python block is recognised, how the
interpreter's output is rendered back into the context, and how the final
answer is extracted. Rollouts, the built-in tasks' oracle trajectories, SFT data
and the reward all use these, so a change here changes every one of them.

Simplified: R1-CI varies its prompt wording across tasks during SFT; we keep one
wording per mode. The exact whitespace around `Code Execution Results:` in the
original is unverified (see REFERENCE.md), so ours is fixed here and used
everywhere consistently.
"""
from __future__ import annotations

import re

SYSTEM_PROMPT_CODE = (
    "You are a helpful assistant that solves problems by reasoning step by step and, "
    "when it helps, by writing Python. To run code, write one ```python ... ``` block "
    "that prints what you need and stop; the block is executed and its output is "
    "shown to you after 'Code Execution Results:'. Read the results and continue. "
    "You may run code several times. Finish with the final answer in the form <<<answer>>>."
)

SYSTEM_PROMPT_TEXT = (
    "You are a helpful assistant that solves problems by reasoning step by step in text. "
    "Do not write code. Finish with the final answer in the form <<<answer>>>."
)

CODE_OPEN = "```python\n"
CODE_CLOSE = "\n```"
# A complete python block: the interpreter runs the last one that closes a generation step.
CODE_BLOCK_RE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)
ANSWER_RE = re.compile(r"<<<(.*?)>>>", re.DOTALL)
OUTPUT_HEADER = "Code Execution Results:"
TRUNCATION_MARKER = "\n... [output truncated] ...\n"


def system_prompt(use_code: bool) -> str:
    return SYSTEM_PROMPT_CODE if use_code else SYSTEM_PROMPT_TEXT


def pending_code(text: str) -> str | None:
    """The code of a python block that `text` has just closed, or None.

    A generation step ends a block when, ignoring trailing whitespace (a sampled
    token may be "```\n"), the text ends with a fence that closes an open
    ```python fence. This is the signal to execute.
    """
    stripped = text.rstrip()
    if not stripped.endswith("```"):
        return None
    body = stripped[:-3]
    start = body.rfind(CODE_OPEN.rstrip("\n"))
    if start < 0 or body.find("```", start + 3) >= 0:
        return None
    return body[start + len(CODE_OPEN.rstrip("\n")):].strip("\n")


def extract_answer(text: str) -> str | None:
    """The content of the last <<<...>>> in `text` (stripped), or None."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def render_output(stdout: str, stderr: str = "", status: str = "ok") -> str:
    """The text inserted after a python block: header, stdout, then errors.

    It begins with a newline (the block itself ends with ```), and ends with a
    blank line so the model's continuation starts a fresh paragraph.
    """
    body = stdout
    if stderr:
        body = (body + ("\n" if body and not body.endswith("\n") else "") + stderr)
    if status == "timeout":
        body += ("\n" if body and not body.endswith("\n") else "") + "TimeoutError: execution timed out"
    body = body.strip("\n")
    if not body:
        body = "(no output)"
    return f"\n{OUTPUT_HEADER}\n{body}\n\n"
