"""What a request is: its sampling parameters, its running state, and the result handed back.

A response mixes sampled tokens (mask 1) and forced tokens from `Sampler.append_tokens` (interpreter
output: mask 0, log-prob 0.0), aligned one-to-one in a `Completion`, as a trainer needs.

Simplified against vLLM: no beam search, no `n` per request (a GRPO group adds its prompt n times and
shares its full KV blocks), no penalties, logit bias or min_p; stop strings are not stripped.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature 0 is greedy; top_k 0 and top_p 1.0 are off.

    max_new_tokens bounds the whole response, appended tokens included. stop_strings (they need a
    tokenizer) and `stop_fn(segment_ids)` see only the tokens sampled since the last
    (re)start, so interpreter output never stops a sequence. With `seed`, the request draws from its
    own generator, whatever else shares its batches.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    stop_fn: Callable[[list[int]], object] | None = None  # a truthy result stops; it is the stop_reason

    def __post_init__(self):
        # Lists accepted, tuples stored: the params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings must be a sequence of strings, not one string")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Completion:
    """One sequence's response so far, aligned token by token (see the module docstring)."""
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]            # response: sampled and appended tokens, in order
    logprobs: list[float]           # raw model (temperature 1) log-prob; 0.0 for appended tokens
    sampling_logprobs: list[float]  # log-prob under the processed distribution (0.0 when greedy)
    mask: list[int]                 # 1 sampled, 0 appended from outside
    finish_reason: str | None       # "eos" | "stop" | "length" | None while it still runs
    stop_reason: object             # the eos/stop token id, the stop string hit or stop_fn's result


class Status(enum.Enum):
    WAITING = "waiting"    # queued for a prefill (new, resumed after append, or preempted)
    RUNNING = "running"    # decoding one token per step
    STOPPED = "stopped"    # finished or paused: its cache is kept until released or evicted


@dataclass(eq=False)
class Sequence:
    """Mutable per-request state owned by the sampler. `tokens` is prompt + response."""
    seq_id: int
    tokens: list[int]
    num_prompt: int
    params: SamplingParams
    generator: torch.Generator | None
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)  # KV pages, in order
    row: int = -1                  # this sequence's row in BlockManager.tables (-1: holds no pages)
    num_cached: int = 0            # leading tokens whose K/V is already in the cache
    dense_len: int = 0             # leading tokens whose K/V is also in its CPU decode row (kv_rows.py)
    segment_start: int = 0         # index in `tokens` where the current sampled segment begins
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: object = None

    def __post_init__(self):
        self.segment_start = len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_response(self) -> int:
        return len(self.tokens) - self.num_prompt

    def append_sampled(self, token: int, logprob: float, sampling_logprob: float) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.sampling_logprobs.append(sampling_logprob)
        self.mask.append(1)

    def append_forced(self, token_ids: list[int]) -> None:
        """Tokens from outside: cached by the next prefill, never sampled; a new segment follows."""
        self.tokens.extend(token_ids)
        self.logprobs.extend([0.0] * len(token_ids))
        self.sampling_logprobs.extend([0.0] * len(token_ids))
        self.mask.extend([0] * len(token_ids))
        self.segment_start = len(self.tokens)

    def completion(self) -> Completion:
        """A snapshot (copies), safe to keep after the sequence moves on."""
        return Completion(self.seq_id, self.tokens[:self.num_prompt], self.tokens[self.num_prompt:],
                          list(self.logprobs), list(self.sampling_logprobs), list(self.mask),
                          self.finish_reason, self.stop_reason)
