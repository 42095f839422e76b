"""The text conventions of R1-Code-Interpreter: system prompts, python-block detection, output
rendering, answer extraction. Rollouts, oracle trajectories, SFT data and rewards all use these.

Simplified: one prompt wording per mode (R1-CI varies it during SFT); the whitespace around
`Code Execution Results:` is ours (the original's is unverified, see REFERENCE.md).
"""
from __future__ import annotations

import re

SYSTEM_PROMPT_CODE = (
    "You are a helpful assistant that solves problems by reasoning step by step and, "
    "when it helps, by writing Python. To run code, write one ```python ... ``` block "
    "that prints what you need and stop; the block is executed and its output is "
    "shown to you after 'Code Execution Results:'. Read the results and continue. "
    "You may run code several times. Finish with the final answer in the form <<<answer>>>.")

SYSTEM_PROMPT_TEXT = ("You are a helpful assistant that solves problems by reasoning step by step in text. "
                      "Do not write code. Finish with the final answer in the form <<<answer>>>.")

CODE_OPEN = "```python\n"
CODE_CLOSE = "\n```"
ANSWER_RE = re.compile(r"<<<(.*?)>>>", re.DOTALL)
OUTPUT_HEADER = "Code Execution Results:"
TRUNCATION_MARKER = "\n... [output truncated] ...\n"


def system_prompt(use_code: bool) -> str:
    return SYSTEM_PROMPT_CODE if use_code else SYSTEM_PROMPT_TEXT


def pending_code(text: str) -> str | None:
    """The code of the ```python block that `text` has just closed (the signal to execute), or None.
    Trailing whitespace is ignored: a sampled token may be "```\n"."""
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
    """The text inserted after a python block: header, stdout, then errors. It begins with a newline
    (the block ends with ```) and ends with a blank line, so the model continues in a fresh paragraph."""
    body = stdout
    for extra in (stderr, "TimeoutError: execution timed out" if status == "timeout" else ""):
        if extra:
            body += ("\n" if body and not body.endswith("\n") else "") + extra
    body = body.strip("\n") or "(no output)"
    return f"\n{OUTPUT_HEADER}\n{body}\n\n"
