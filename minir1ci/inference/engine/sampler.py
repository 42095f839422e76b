"""The batched sampler: a paged KV cache, continuous batching, prefix sharing, resumable sequences.

    sampler = Sampler(model, tokenizer)                  # tokenizer may be None (ids only)
    outs = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512, seed=0))
    sid = sampler.add_request(prompt_ids, params)        # the step API, for the interpreter driver
    events = sampler.step()                              # Completions of the sequences that stopped
    sampler.append_tokens(sid, output_ids)               # forced tokens (mask 0), then resume
    done = sampler.release(sid)                          # final Completion; pages freed

A stopped sequence keeps its pages until `release` (or eviction), so resuming prefills only the
appended tokens. Finish reasons: "eos", "stop" (`stop_reason`: the id, string or stop_fn result), "length".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceABC

import torch
from torch import nn

from minir1ci.inference.model import forget_fused_weights
from minir1ci.inference.engine.block_manager import BlockManager, kv_block_bytes
from minir1ci.inference.engine.runner import ModelRunner
from minir1ci.inference.engine.sampling import sample
from minir1ci.inference.engine.scheduler import Scheduler
from minir1ci.inference.engine.sequence import Completion, SamplingParams, Sequence, Status

_CPU_DEFAULT_KV_BYTES = 1 << 30


class Sampler:
    def __init__(self, model: nn.Module, tokenizer=None, *, kv_cache_bytes: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 use_cuda_graphs: bool = True, eos_token_ids: SequenceABC[int] | None = None, seed: int = 0):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        param = next(model.parameters())
        block_bytes = kv_block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, block_size,
                                     param.dtype)
        if kv_cache_bytes is None:  # half the free memory on CUDA
            on_cuda = param.device.type == "cuda"
            kv_cache_bytes = torch.cuda.mem_get_info(param.device)[0] // 2 if on_cuda else _CPU_DEFAULT_KV_BYTES
        max_pages = -(-self.max_model_len // block_size)
        num_blocks = min(kv_cache_bytes // block_bytes, max_num_seqs * max_pages)  # no more than can be used
        self.block_manager = BlockManager(num_blocks, block_size, max_pages, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.block_manager, use_cuda_graphs, max_graph_batch=max_num_seqs,
                                  rows_bytes=kv_cache_bytes)
        if eos_token_ids is None:  # the tokenizer's chat eos and the config's eos id(s)
            eos = cfg.eos_token_id
            eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
            eos_token_ids = ([tokenizer.eos_token_id] if tokenizer is not None else []) + eos
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.generator = torch.Generator(device=param.device).manual_seed(seed)
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0
        self._pending: list[Completion] = []  # events decided outside a step (see append_tokens)
        self._tensors: list[torch.Tensor] = []
        self._weights_seen: tuple = ()
        self._check_weights()

    def _check_weights(self) -> None:
        """Drop the prefix cache (and fused q/k/v copies) if the (id, version) of a parameter or buffer
        changed. Tensors are re-listed only while idle (walking modules costs more than reading versions).
        Inference tensors have no version counter: weights made under inference_mode must not be trained."""
        if not self.has_unfinished():
            self._tensors = [t for t in (*self.model.parameters(), *self.model.buffers()) if not t.is_inference()]
        stamp = tuple((id(t), t._version) for t in self._tensors)
        if stamp != self._weights_seen:
            self.block_manager.forget_prefixes()
            forget_fused_weights(self.model)
            self._weights_seen = stamp

    def add_request(self, prompt_ids: SequenceABC[int], params: SamplingParams) -> int:
        """Queue a prompt; returns its seq_id. Identical prompt prefixes share KV pages."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text; pass one to "
                             "Sampler(model, tokenizer) or use stop_token_ids / stop_fn")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_model_len "
                             f"{self.max_model_len}")
        self._check_weights()
        gen = None if params.seed is None else torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(self._next_id, [int(t) for t in prompt_ids], len(prompt_ids), params, gen)
        self._next_id += 1
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def step(self) -> list[Completion]:
        """Run one prefill or decode for the scheduled sequences; return those that stopped."""
        events, self._pending = self._pending, []
        batch, is_prefill = self.scheduler.schedule()
        if not batch:
            return events
        logits = self.runner.prefill(batch) if is_prefill else self.runner.decode(batch)
        params = [s.params for s in batch]
        tokens, logp, samp_logp = sample(logits, params, [s.generator for s in batch], self.generator)
        for seq, tok, lp, slp in zip(batch, tokens.tolist(), logp.tolist(), samp_logp.tolist()):
            seq.num_cached = len(seq)  # every token fed this step is now in the cache
            seq.append_sampled(tok, lp, slp)
            if self._check_stop(seq, tok):
                self.scheduler.stop(seq)
                events.append(seq.completion())
        return events

    def append_tokens(self, seq_id: int, token_ids: SequenceABC[int]) -> None:
        """Append forced tokens (mask 0) to a stopped sequence and queue it to resume sampling.
        If the response budget is spent, it finishes with "length", reported by the next step."""
        seq = self.seqs[seq_id]
        if seq.status is not Status.STOPPED:
            raise ValueError(f"sequence {seq_id} is {seq.status.value}; only a stopped sequence can be extended")
        seq.append_forced([int(t) for t in token_ids])
        seq.finish_reason = seq.stop_reason = None
        if seq.num_response >= seq.params.max_new_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            self._pending.append(seq.completion())
            return
        self.scheduler.add(seq)

    def release(self, seq_id: int) -> Completion:
        """Forget a sequence and free its pages; returns its final Completion."""
        seq = self.seqs.pop(seq_id)
        self.scheduler.drop(seq)
        return seq.completion()

    def result(self, seq_id: int) -> Completion:
        return self.seqs[seq_id].completion()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run every prompt to completion; one Completion per prompt, in order."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle sampler; finish or release step-API requests first")
        if isinstance(params, SamplingParams):
            params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                      for i in range(len(prompts))]
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[int, Completion] = {}
        while self.has_unfinished():
            for event in self.step():
                done[event.seq_id] = self.release(event.seq_id)
        return [done[i] for i in ids]

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        p = seq.params
        if tok in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason, seq.stop_reason = "eos", tok
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif p.stop_strings and (hit := self._stop_string_hit(seq)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", hit
        elif p.stop_fn is not None and (why := p.stop_fn(seq.tokens[seq.segment_start:])):
            seq.finish_reason, seq.stop_reason = "stop", why
        elif seq.num_response >= p.max_new_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason, seq.stop_reason = "length", None
        return seq.finish_reason is not None

    def _stop_string_hit(self, seq: Sequence) -> str | None:
        """A stop string that ends inside the token just sampled, within the current segment.
        Decodes only a tail: L characters are at most 4L bytes, so at most 4L + 1 byte-level tokens."""
        longest = max(len(s) for s in seq.params.stop_strings)
        start = max(seq.segment_start, len(seq) - 4 * longest - 1)
        tail = seq.tokens[start:]
        text = self.tokenizer.decode(tail)
        # Matches must end past the text before the new token (a trailing partial UTF-8 character,
        # U+FFFD, is completed by it), so a string completed earlier does not count.
        before = len(self.tokenizer.decode(tail[:-1]).rstrip("\ufffd"))
        for s in seq.params.stop_strings:
            if text.find(s, max(0, before - len(s) + 1)) >= 0:
                return s
        return None
