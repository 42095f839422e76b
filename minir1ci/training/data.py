"""SFT data as `Sample(ids, mask)`, mask 1 exactly on what the model must learn to write (assistant
content and its closing `<|im_end|>`), 0 on prompts and inserted interpreter output; padded batches.

Sources: the built-in tasks' oracle trajectories; a synthetic copy corpus, the tiny model's stand-in
for pretraining; a JSONL file of chat records `{"messages": [...]}` (an assistant `content` may be a
list of `{"type": "text"|"output", "text"}` segments) or of rollout.py trajectories (`prompt_ids`,
`response_ids`, `loss_mask`). Simplified: no sequence packing.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Sample:
    ids: list[int]
    mask: list[int]   # 1 = trained on


def chat_sample(tokenizer, messages: list[dict]) -> Sample:
    ids, mask = tokenizer.apply_chat_template(messages, return_assistant_mask=True)
    return Sample(list(ids), list(mask))


def oracle_samples(examples, tokenizer, use_code: bool = True, text_fraction: float = 0.0,
                   seed: int = 0) -> list[Sample]:
    """One sample per built-in example: its prompt, then its oracle answer. With `use_code`, a seeded
    `text_fraction` of the questions get the text-only answer under the code prompt (as GPT-4o's in
    the paper's SFT set)."""
    rng = random.Random(f"text_fraction:{seed}")
    out = []
    for ex in examples:
        answer_with_code = use_code and rng.random() >= text_fraction
        messages = ex.messages(use_code) + [{"role": "assistant", "content": ex.oracle_segments(answer_with_code)}]
        out.append(chat_sample(tokenizer, messages))
    return out


def copy_corpus(tokenizer, n: int, seed: int = 0, min_len: int = 120) -> list[Sample]:
    """`n` samples of `TEXT\nTEXT\n` segments up to `min_len` tokens, the loss on the second copy; TEXT is
    3-8 random numbers, letter strings and operators. The tasks' code copies the question's numbers
    and strings, which needs induction heads: a 1M-parameter model does not form them from a few
    thousand SFT samples, but does within a few hundred steps of this corpus. Deterministic in `seed`."""
    rng = random.Random(f"copy-corpus:{seed}")
    newline = tokenizer.encode("\n")
    out = []
    for _ in range(n):
        ids, mask = [], []
        while len(ids) < min_len:
            text = tokenizer.encode(" ".join(_copy_piece(rng) for _ in range(rng.randint(3, 8))))
            ids += text + newline + text + newline
            mask += [0] * (len(text) + len(newline)) + [1] * (len(text) + len(newline))
        out.append(Sample(ids, mask))
    return out


def _copy_piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))
    if kind < 0.8:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 12)))
    return rng.choice(["+", "*", "-", ",", "'", "[", "]", "(", ")", "?", ":", "."])


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(msgs, where: str) -> None:
    """A chat record's messages: roles from ROLES, content a string or a list of text/output segments."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
                isinstance(s, dict) and s.get("type") in ("text", "output") and isinstance(s.get("text"), str)
                for s in content):
            raise ValueError(f"{where}: message {i} content must be a string or a list of "
                             f"{{\"type\": \"text\"|\"output\", \"text\": string}} segments, got {content!r:.60}")


def _check_ids(ids, name: str, vocab_size: int | None, where: str) -> None:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{where}: {name} must be a list of integer token ids")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{where}: {name} holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _record_to_sample(rec: dict, tokenizer, where: str, vocab_size: int | None = None) -> Sample:
    """One JSONL record, checked field by field, as a Sample; ValueError names `where` and the field."""
    if "messages" in rec:
        _check_messages(rec["messages"], where)
        return chat_sample(tokenizer, rec["messages"])
    if "prompt_ids" in rec and "response_ids" in rec:
        prompt, response = rec["prompt_ids"], rec["response_ids"]
        _check_ids(prompt, "prompt_ids", vocab_size, where)
        _check_ids(response, "response_ids", vocab_size, where)
        loss_mask = rec.get("loss_mask", [1] * len(response))
        if not isinstance(loss_mask, list) or any(m not in (0, 1) for m in loss_mask):
            raise ValueError(f"{where}: loss_mask must be a list of 0s and 1s")
        if len(loss_mask) != len(response):
            raise ValueError(f"{where}: loss_mask has {len(loss_mask)} entries for {len(response)} response ids")
        return Sample(prompt + response, [0] * len(prompt) + [int(m) for m in loss_mask])
    raise ValueError(f"{where}: a line needs 'messages' or 'prompt_ids'+'response_ids'")


def load_jsonl(path: str | Path, tokenizer, min_reward: float | None = None,
               vocab_size: int | None = None) -> list[Sample]:
    """SFT samples; a malformed line raises an error naming file and line. `min_reward` keeps the lines
    whose `reward` reaches it (rejection sampling); token ids must lie below `vocab_size` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file not found: {path}")
    samples = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            if min_reward is not None:
                reward = rec.get("reward", 0.0)
                if not isinstance(reward, (int, float)) or isinstance(reward, bool):
                    raise ValueError(f"{where}: reward must be a number, got {reward!r}")
                if reward < min_reward:
                    continue
            samples.append(_record_to_sample(rec, tokenizer, where, vocab_size))
    if not samples:
        raise ValueError(f"{path}: no training samples")
    return samples


def pad_batch(seqs: list[list[int]], masks: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Right-pad with 0 to the longest: ids, attention and loss masks, [B, T] each."""
    ids, attn, mask = (torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long) for _ in range(3))
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = torch.tensor(m, dtype=torch.long)
        attn[i, :len(s)] = 1
    return ids, attn, mask


def next_token_targets(ids: torch.Tensor, *per_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shift for next-token prediction: position t predicts ids[t+1], so every per-token tensor
    (loss mask, sampler log-probs) moves with the ids. [B, T] each -> [B, T] each, last column 0."""
    return tuple(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1) for x in (ids, *per_token))
