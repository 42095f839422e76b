"""Tasks: `load_tasks(spec)` gives the `Example`s (example.py) of every task a spec names.

A spec such as "builtin:mul,symbench:game24,bbh:navigate,gym:countdown" names tasks of four sources:
builtin (builtin.py), symbench and bbh (files under the data directory), gym (reasoning-gym, extra
minir1ci[gym]); "<source>:all" is every task of the source (for gym: the paper's 84, split.py).
`split` splits builtin families by *question* (a hash of its text) and the other sources by whole
*task* (the paper's 107/37 list in split.py).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, NamedTuple

from minir1ci.env.tasks import bbh, builtin, gym, symbench
from minir1ci.env.tasks import split as paper_split
from minir1ci.env.tasks.example import Example, Oracle, exact_match, run_trusted

SPLITS = (None, "train", "test")


class Source(NamedTuple):
    names: Callable[[Path | None], list[str]]   # data root -> the valid task names
    every: Callable[[Path | None], list[str]]   # data root -> what "<source>:all" stands for
    load: Callable[..., list[Example]]          # (root, name, limit, split, seed) -> examples
    # Reads files under the data directory; `limit` then draws a seeded subset, while the
    # generated sources make `limit` questions.
    needs_data: bool


SOURCES = {
    "builtin": Source(lambda root: list(builtin.FAMILIES), lambda root: list(builtin.FAMILIES),
                      lambda root, name, limit, split, seed: builtin.generate(name, limit or builtin.DEFAULT_COUNT,
                                                                              split=split, seed=seed), False),
    # symbench:all is the tasks whose data is present
    "symbench": Source(lambda root: symbench.task_names(), symbench.task_names,
                       lambda root, name, *_: symbench.load(root, name), True),
    "bbh": Source(bbh.task_names, bbh.task_names, lambda root, name, *_: bbh.load(root, name), True),
    # gym:all is the paper's 84 of reasoning-gym's datasets
    "gym": Source(lambda root: gym.task_names(), lambda root: list(paper_split.GYM_84),
                  lambda root, name, limit, split, seed: gym.load(name, size=limit or gym.DEFAULT_SIZE, seed=seed),
                  False),
}


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


def task_names(spec: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> list[str]:
    """The "source:name" tasks `spec` stands for in `split`, without loading a question; ValueError
    naming an entry that stands for no task, so a bad spec fails before any work."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[str] = []
    for source, name in parse_spec(spec):
        root = resolve_data_dir(data_dir) if SOURCES[source].needs_data else None
        try:   # names() first: a missing optional extra (reasoning-gym) raises here, even for "all"
            known = SOURCES[source].names(root)
        except ImportError as e:
            raise ValueError(f"{source}:{name}: {e}") from None
        if name != "all" and name not in known:
            raise ValueError(f"unknown {source} task {name!r}; valid: all, {', '.join(known)}")
        names = SOURCES[source].every(root) if name == "all" else [name]
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
    """Examples of every task named in `spec`, task after task. `limit` caps the examples per task:
    a seeded sample in file order, or for builtin and gym the number generated; `split` is None,
    "train" or "test"."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    examples: list[Example] = []
    for task in task_names(spec, data_dir, split):
        source, _, n = task.partition(":")
        root = resolve_data_dir(data_dir) if SOURCES[source].needs_data else None
        found = SOURCES[source].load(root, n, limit, split, seed)
        found = _subset(found, limit, seed, task) if SOURCES[source].needs_data else found
        if not found:
            raise ValueError(f"task {task} has no questions" + (f" in the {split} split" if split else "")
                             + (f" under {root}" if root else ""))
        examples += found
    return examples


__all__ = ["Example", "Oracle", "exact_match", "load_tasks", "parse_spec", "resolve_data_dir", "run_trusted",
           "task_names"]
