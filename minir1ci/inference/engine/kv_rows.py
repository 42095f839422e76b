"""The CPU sampler's decode cache: each sequence's K/V also kept as one dense row, read in place.

Decode attention over the paged cache gathers every sequence's pages into a fresh tensor at every
layer and step, a copy of the whole context; on a CPU that copy (memory-bound) took ~40% of a
tiny-preset rollout. Here each sequence of the decode batch also keeps its K/V in one row of per-layer
tensors [rows, Hkv, L, D], the batch in rows [0, B), so the batched products read [rows * Hkv, K, D]
views without copying (kernels/twins.py `decode_attention_rows`).

The pages stay the source of truth (prefill, prefix sharing, resumption). A decode step writes both;
what a prefill wrote only to the pages (a prompt, appended interpreter output) is copied into the row
before the sequence's next decode (`sync`). `seq.dense_len` counts the leading positions its row
holds; releasing its pages resets it. Positions past a sequence's length are read as masked keys, so
they must be finite (a zero probability times NaN is NaN): they hold zeros or an earlier owner's K/V
(non-finite only if the weights are, when every rollout is lost anyway).

Simplified: CPU only (CUDA decodes from the pages with the Triton kernel); rows grow by doubling and
never shrink; their byte budget is the sampler's `kv_cache_bytes` (so a CPU sampler holds up to twice
that), and past it `sync` returns None and the runner decodes from the pages as before.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minir1ci.inference.engine.block_manager import BlockManager
from minir1ci.inference.engine.sequence import Sequence


class KVRows:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_len: int,
                 budget_bytes: int):
        self.num_layers, self.heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.max_len, self.budget = max_len, budget_bytes
        self.tensors: list[tuple[Tensor, Tensor]] = []   # per layer: K and V rows [R, Hkv, L, D]
        self.capacity = (0, 0)                            # (R, L)
        self.clean = 0                                    # positions [0, clean) of every row are finite
        self.order: list[Sequence] = []                   # the sequence in each row

    def _bytes(self, rows: int, length: int) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * rows * self.heads * length * self.head_dim * itemsize

    def _fit(self, rows: int, length: int) -> bool:
        """Rows [0, rows) of `length` positions, finite where attention may read them; False when that
        passes the budget. Capacity doubles when passed (the length cut to what the budget holds: growing
        one position per step would copy the rows at every step). Memory starts uninitialised and
        positions [0, clean) of every row are zeroed as reads reach them (zeroing it all when allocated
        cost more than the attention it saves, at every rollout)."""
        R, L = self.capacity
        if rows > R or length > L:
            R = max(rows, 2 * R if rows > R else R)
            if self._bytes(R, length) > self.budget:
                R = max(rows, self.capacity[0])
                if self._bytes(R, length) > self.budget:
                    return False
            L = min(self.max_len, self.budget // self._bytes(R, 1), max(length, 2 * L if length > L else L, 64))
            new = []
            for old in self.tensors or [(None, None)] * self.num_layers:
                pair = (torch.empty(R, self.heads, L, self.head_dim, dtype=self.dtype) for _ in old)
                new.append(tuple(self._carry(o, t) for o, t in zip(old, pair)))
            self.tensors, self.capacity = new, (R, L)
        if length > self.clean:
            top = min(self.capacity[1], 2 * length)
            for pair in self.tensors:
                for t in pair:
                    t[:, :, self.clean:top].zero_()
            self.clean = top
        return True

    def _carry(self, old: Tensor | None, new: Tensor) -> Tensor:
        """`new` holding `old`'s rows and zeros in the rows it adds, over positions [0, clean)."""
        n = 0 if old is None else old.shape[0]
        if n:
            new[:n, :, :self.clean] = old[:, :, :self.clean]
        new[n:, :, :self.clean] = 0.0
        return new

    def sync(self, seqs: list[Sequence], kv_caches: list[tuple[Tensor, Tensor]], bm: BlockManager) -> Tensor | None:
        """The dense row [B] of each sequence of a decode batch, holding its K/V before the last token
        (which this step's forward writes, so `dense_len` counts it); None when they do not fit the budget.

        Rows [0, B) hold the batch, so attention reads them in place. A sequence that left the batch
        (finished, paused for the interpreter, preempted) gives its row up: the last rows' sequences move
        into the holes, and one that comes back is copied from its pages again."""
        page_size = bm.block_size   # attention reads keys in whole pages (decode_attention_rows)
        if not self._fit(len(seqs), -(-max(len(s) for s in seqs) // page_size) * page_size):
            self.order = []
            return None
        batch = set(seqs)
        keep = [s in batch and s.dense_len > 0 for s in self.order]   # dense_len 0: its pages were released
        n = sum(keep)
        holes = [r for r in range(n) if not keep[r]]
        movers = [r for r in range(n, len(self.order)) if keep[r]]
        order = self.order[:n]
        for h, m in zip(holes, movers):
            order[h] = self.order[m]
        kept = set(order)
        for s in seqs:
            if s not in kept:
                s.dense_len = 0
                order.append(s)
        self.order = order
        row_of = {s: r for r, s in enumerate(order)}
        behind = [s for s in seqs if s.dense_len < len(s) - 1]
        if behind:   # positions dense_len .. len - 2 of each, copied from the pages in one gather per tensor
            counts = torch.tensor([len(s) - 1 - s.dense_len for s in behind])
            row = torch.repeat_interleave(torch.tensor([row_of[s] for s in behind]), counts)
            page_row = torch.repeat_interleave(torch.tensor([s.row for s in behind]), counts)
            first = torch.repeat_interleave(torch.tensor([s.dense_len for s in behind]), counts)
            pos = first + torch.arange(len(row)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            slots = bm.slots(page_row, pos)
        src, dst = torch.tensor(movers, dtype=torch.long), torch.tensor(holes, dtype=torch.long)
        for pages, dense in zip(kv_caches, self.tensors):
            for cache, t in zip(pages, dense):
                if holes:
                    t.index_copy_(0, dst, t.index_select(0, src))
                if behind:
                    t[row, :, pos] = cache.view(-1, self.heads, self.head_dim).index_select(0, slots).to(self.dtype)
        for s in seqs:
            s.dense_len = len(s)
        return torch.tensor([row_of[s] for s in seqs])
