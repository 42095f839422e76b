"""reasoning-gym datasets by name (optional extra: pip install minir1ci[gym]; nothing is downloaded).

Each item of reasoning-gym's `create_dataset` becomes an Example scored by the dataset's own
`score_answer`, so partial credit passes through. Examples keep only the dataset name, size, seed and
index, and the dataset is rebuilt (cached) where a score is needed, so they pickle across processes.
Datasets without a single gold answer (e.g. rubiks_cube) load with answer "" and metadata "no_gold"
(`gold_response()` raises); an empty-string answer (possible in "ab") is a real gold.
"""
from __future__ import annotations

import functools

from minir1ci.env.tasks.example import Example

DEFAULT_SIZE = 200  # the paper uses at least 200 questions per task
ANSWER_HINT = "\n\nGive your final answer inside <<<>>>, for example <<<answer>>>."


def _require():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("gym tasks need reasoning-gym: pip install 'minir1ci[gym]'") from err
    return reasoning_gym


def available() -> bool:
    try:
        _require()
        return True
    except ImportError:
        return False


def task_names() -> list[str]:
    _require()
    from reasoning_gym.factory import DATASETS
    return sorted(DATASETS)


@functools.lru_cache(maxsize=256)
def dataset(name: str, size: int, seed: int):
    return _require().create_dataset(name, size=size, seed=seed)


def check_gym(answer: str, ex: Example) -> float:
    meta = ex.metadata
    ds = dataset(meta["dataset"], meta["size"], meta["seed"])
    return float(ds.score_answer(answer, ds[meta["index"]]))


def load(name: str, size: int = DEFAULT_SIZE, seed: int = 0) -> list[Example]:
    valid = task_names()
    if name not in valid:
        raise ValueError(f"unknown gym task {name!r}; valid: all, {', '.join(valid)}")
    ds = dataset(name, size, seed)
    out = []
    for i in range(size):
        entry = ds[i]
        answer = entry["answer"]
        out.append(Example(f"gym:{name}:{seed}:{i}", f"gym:{name}", entry["question"].strip() + ANSWER_HINT,
                           "" if answer is None else str(answer),
                           {"dataset": name, "size": size, "seed": seed, "index": i, "no_gold": answer is None},
                           check_gym))
    return out
