"""Which sequences run in the next step: continuous batching over a fixed pool of KV pages.

A step is a prefill (waiting sequences admitted in order while they fit the limits and the free
pages) or else a decode of every running sequence. When pages run out, stopped sequences' caches are
evicted first (least recently stopped), then those of waiting sequences resumed after a pause (last
queued first), then, for a decode, the most recently admitted sequence is preempted: back to the front
of the queue. An evicted or preempted sequence is recomputed from its tokens (results stay exact).

Simplified against vLLM: no chunked prefill, no mixed batches, no priorities, no swapping to host.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from minir1ci.inference.engine.block_manager import BlockManager
from minir1ci.inference.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stopped: OrderedDict[int, Sequence] = OrderedDict()  # holding pages, oldest stop first
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence, or a stopped one that was given more tokens."""
        self.stopped.pop(seq.seq_id, None)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def stop(self, seq: Sequence) -> None:
        """A running sequence finished or paused: it keeps its pages until `drop` or eviction."""
        self.running.remove(seq)
        seq.status = Status.STOPPED
        self.stopped[seq.seq_id] = seq

    def drop(self, seq: Sequence) -> None:
        """Forget a sequence entirely and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.stopped.pop(seq.seq_id, None)
        self.bm.release(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences to run, is_prefill). Empty when nothing is waiting or running."""
        batch, num_tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached  # an upper bound before prefix hits are known
            if batch and num_tokens + new_tokens > self.max_num_batched_tokens:  # one over the budget runs alone
                break
            if not self.bm.allocate(seq):
                if self._evict(keep=seq):
                    continue
                if not batch and not self.running:
                    raise RuntimeError(f"the KV cache ({self.bm.num_blocks} blocks of {self.bm.block_size}) "
                                       f"cannot hold one sequence of {len(seq)} tokens; raise the budget")
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            num_tokens += len(seq) - seq.num_cached
        if batch:
            self.running.extend(batch)
            return batch, True

        for seq in list(self.running):  # a copy: preemption removes from the list
            if seq.status is not Status.RUNNING:
                continue  # preempted by an earlier iteration
            while not self.bm.extend(seq, len(seq)):
                if not self._evict():
                    self._preempt(self.running[-1])
                    if seq.status is not Status.RUNNING:
                        break
        return list(self.running), False

    def _evict(self, keep: Sequence | None = None) -> bool:
        """Free the pages of the least recently stopped sequence that holds any, else of the last queued
        waiting one that does (resumed after a pause), never `keep`'s."""
        for seq in [*self.stopped.values(), *reversed(self.waiting)]:
            if seq.block_table and seq is not keep:
                self.bm.release(seq)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
