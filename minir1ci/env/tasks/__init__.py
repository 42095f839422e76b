"""Tasks: one `Example` type for every source, and `load_tasks(spec)` to get them.

An example is a question (`prompt`), a gold answer (`answer`, the text that goes
inside <<<...>>>), metadata, and a verifier. `score(response)` extracts the last
<<<...>>> of a response with `prompts.extract_answer` and asks the verifier; a
response without one, or one the verifier cannot parse, scores 0.

Sources, named in a spec such as "builtin:mul,symbench:game24,bbh:navigate,gym:countdown":
  builtin   procedural families with oracle code trajectories (`builtin.py`)
  symbench  the SymBench / R1-CI folders under <data>/symbench (`symbench.py`)
  bbh       the 27 BIG-Bench-Hard files under <data>/bbh (`bbh.py`)
  gym       reasoning-gym datasets, optional extra minir1ci[gym] (`gym.py`)
"<source>:all" expands to every task of the source (for gym: the paper's 84, `split.py`).

`split` means different things per source, both fixed here and nowhere else:
builtin families split their *questions* (a hash of the question text picks the
test bucket, so train and test never share a question); the dataset sources split
whole *tasks* by the paper's 107/37 list in `split.py`.

Simplified: verifiers are plain functions of (answer text, example); there is no
LLM-based answer extraction as in CodeSteer, so an answer must be inside <<<>>>.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from minir1ci.env import prompts

SOURCES = ("builtin", "symbench", "bbh", "gym")
SPLITS = (None, "train", "test")


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
        """Assistant content as segments (see the tokenizer contract in DEVELOPERS.md).

        With code: reasoning + python block, the block's real output rendered by
        `prompts.render_output`, then the conclusion. Without: one text segment.
        """
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
    """Run our own oracle code in-process and capture what it prints.

    Only for code this package wrote (the oracle templates): model code goes to
    the sandbox. Cached, since SFT data asks for the same question more than once.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(compile(code, "<oracle>", "exec"), {"__name__": "__main__"})
        except Exception:  # noqa: BLE001 - the traceback is the output, as in a real run
            err.write(traceback.format_exc(limit=1))
    return out.getvalue(), err.getvalue()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data DIR, else $MINIR1CI_DATA, else ../shared/data beside the repository."""
    if data_dir is None:
        data_dir = os.environ.get("MINIR1CI_DATA") or Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
    path = Path(data_dir).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist; pass --data DIR or set MINIR1CI_DATA "
                                "to the folder holding symbench/ and bbh/")
    return path


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """"builtin:mul, bbh:all" -> [("builtin", "mul"), ("bbh", "all")]; order kept, duplicates dropped."""
    out: list[tuple[str, str]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        source, sep, name = part.partition(":")
        source, name = source.strip(), name.strip()
        if not sep or not name:
            raise ValueError(f"task spec {part!r} must look like source:name (e.g. builtin:mul); "
                             f"sources: {', '.join(SOURCES)}")
        if source not in SOURCES:
            raise ValueError(f"unknown task source {source!r} in {part!r}; valid sources: {', '.join(SOURCES)}")
        if (source, name) not in out:
            out.append((source, name))
    if not out:
        raise ValueError(f"empty task spec {spec!r}")
    return out


def _subset(examples: list[Example], limit: int | None, seed: int, task: str) -> list[Example]:
    """Up to `limit` examples drawn with `seed`, kept in file order."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _expand(source: str, name: str, root: Path | None) -> list[str]:
    """The task names a spec entry stands for; unknown names raise, listing the valid ones."""
    from minir1ci.env.tasks import bbh, builtin, gym, symbench
    from minir1ci.env.tasks import split as paper_split

    if source == "builtin":
        known = list(builtin.FAMILIES)
    elif source == "symbench":
        known = symbench.task_names()
    elif source == "bbh":
        known = bbh.task_names(root)
    else:
        known = gym.task_names()
    if name == "all":
        # symbench: the tasks whose data is present; gym: the paper's 84 of reasoning-gym's datasets
        return symbench.task_names(root) if source == "symbench" else paper_split.GYM_84 if source == "gym" else known
    if name not in known:
        raise ValueError(f"unknown {source} task {name!r}; valid: all, {', '.join(known)}")
    return [name]


def task_names(spec: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> list[str]:
    """The "source:name" tasks `spec` stands for in `split`, without loading a question. Raises
    ValueError naming the entry that stands for no task (e.g. symbench:all over a folder without
    SymBench data), so a bad spec fails before any work."""
    from minir1ci.env.tasks import split as paper_split

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[str] = []
    for source, name in parse_spec(spec):
        root = resolve_data_dir(data_dir) if source in ("symbench", "bbh") else None
        try:
            names = _expand(source, name, root)
        except ImportError as e:   # an optional extra (reasoning-gym) not installed: a spec we cannot serve
            raise ValueError(f"{source}:{name}: {e}") from None
        if name == "all" and not names:
            raise ValueError(f"{source}:all found no {source} tasks under {root / source}; pass --data DIR "
                             f"holding {source}/")
        if source != "builtin" and split is not None:
            names = [n for n in names if paper_split.split_of(f"{source}:{n}") == split]
            if not names:
                raise ValueError(f"{source}:{name} has no {split} task in minir1ci/env/tasks/split.py")
        out += [f"{source}:{n}" for n in names if f"{source}:{n}" not in out]
    return out


def load_tasks(spec: str, data_dir: str | os.PathLike | None = None, split: str | None = None,
               limit: int | None = None, seed: int = 0) -> list[Example]:
    """Examples of every task named in `spec`, task after task.

    `limit` caps the examples per task (a seeded sample, kept in file order); for
    built-in families it is the number generated (default `builtin.DEFAULT_COUNT`)
    and for gym the dataset size (default `gym.DEFAULT_SIZE`). `split` is None,
    "train" or "test" (see the module docstring).
    """
    from minir1ci.env.tasks import bbh, builtin, gym, symbench

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    examples: list[Example] = []
    for task in task_names(spec, data_dir, split):
        source, _, n = task.partition(":")
        root = resolve_data_dir(data_dir) if source in ("symbench", "bbh") else None
        if source == "builtin":
            found = builtin.generate(n, limit or builtin.DEFAULT_COUNT, split=split, seed=seed)
        elif source == "symbench":
            found = _subset(symbench.load(root, n), limit, seed, task)
        elif source == "bbh":
            found = _subset(bbh.load(root, n), limit, seed, task)
        else:
            found = gym.load(n, size=limit or gym.DEFAULT_SIZE, seed=seed)
        if not found:
            raise ValueError(f"task {task} has no questions" + (f" in the {split} split" if split else "")
                             + (f" under {root}" if root else ""))
        examples += found
    return examples


__all__ = ["Example", "Oracle", "load_tasks", "task_names", "parse_spec", "resolve_data_dir", "run_trusted", "exact_match"]
