"""SFT data: multi-turn conversations to (token ids, loss mask), and padded batches.

Sources, all ending as `Sample(ids, mask)` with mask 1 exactly on the tokens the model must
learn to produce (assistant content and its closing `<|im_end|>`), 0 on prompts and on inserted
interpreter output:
- the built-in tasks' oracle trajectories (`oracle_samples`);
- a synthetic copy corpus (`copy_corpus`), the tiny model's stand-in for pretraining;
- a JSONL file (`load_jsonl`) whose lines are either chat records `{"messages": [...]}` (an
  assistant `content` may be a list of `{"type": "text"|"output", "text"}` segments) or token-level
  trajectories written by rollout.py (`prompt_ids`, `response_ids`, `loss_mask`).

Simplified: no sequence packing; samples longer than `max_len` are dropped (and counted), not
truncated, since a truncated trajectory would teach the model to stop mid-answer.
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
    """One SFT sample per built-in example: its prompt, then its oracle answer as the assistant turn.

    With `use_code`, a seeded `text_fraction` of the questions keep the code prompt but get the
    text-only answer, as in the paper's SFT set, where GPT-4o answers many questions without code.
    """
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"text_fraction must lie in [0, 1], got {text_fraction}")
    rng = random.Random(f"text_fraction:{seed}")
    out = []
    for ex in examples:
        answer_with_code = use_code and rng.random() >= text_fraction
        messages = ex.messages(use_code) + [{"role": "assistant", "content": ex.oracle_segments(answer_with_code)}]
        out.append(chat_sample(tokenizer, messages))
    return out


def copy_corpus(tokenizer, n: int, seed: int = 0, min_len: int = 120) -> list[Sample]:
    """`n` samples of the copy task, the skill a from-scratch model lacks and every pretrained LLM has.

    Each sample packs segments `TEXT\nTEXT\n` until it is `min_len` tokens long; TEXT is 3-8 random
    pieces (numbers of 1-6 digits, letter strings, operators and brackets) and the loss covers only
    the second TEXT and its newline. The built-in tasks' code is such a copy of the question's
    numbers and strings, which a 1M-parameter model does not learn from a few thousand SFT samples
    alone: copying needs induction heads, and they form within a few hundred steps of this corpus.
    Deterministic in `seed`.
    """
    rng = random.Random(f"copy-corpus:{seed}")
    newline = tokenizer.encode("\n")
    out = []
    for _ in range(n):
        ids: list[int] = []
        mask: list[int] = []
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
    """Read SFT samples; a malformed line raises an error naming the file and line number.

    `min_reward` keeps only trajectories whose `reward` is at least that (rejection sampling);
    token ids must lie below `vocab_size` (the model's embedding rows) when it is given.
    """
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


def pad_batch(seqs: list[list[int]], pad_id: int, masks: list[list[int]] | None = None):
    """Right-pad to the longest: ids [B, T], attention [B, T] and, if given, masks [B, T]."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    loss = torch.zeros(len(seqs), T, dtype=torch.long) if masks is not None else None
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, :len(s)] = 1
        if loss is not None:
            loss[i, :len(s)] = torch.tensor(masks[i], dtype=torch.long)
    return ids, attn, loss


def filter_by_length(samples: list[Sample], max_len: int) -> tuple[list[Sample], int]:
    kept = [s for s in samples if len(s.ids) <= max_len and any(s.mask)]
    return kept, len(samples) - len(kept)


def next_token_targets(ids: torch.Tensor, *per_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shift for next-token prediction: position t predicts ids[t+1], so every per-token tensor
    (loss mask, sampler log-probs) moves with the ids. [B, T] each -> [B, T] each, last column 0."""
    return tuple(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1) for x in (ids, *per_token))
