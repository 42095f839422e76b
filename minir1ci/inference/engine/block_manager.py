"""The paged KV cache's bookkeeping: a pool of fixed-size pages, refcounts and prefix sharing.

Each full block a prefill allocates is registered under (content id of the previous block, its token
ids), so a later prompt with the same leading tokens shares those pages, even in the same step (all
new K/V is written before attention reads). Content ids are never reused, so a key cannot match an
overwritten page; the partial last block stays private (no copy-on-write). Freed pages keep their key
until reused, least recently freed first, or until the weights change (`forget_prefixes`).

Simplified against vLLM: no swapping, no sliding-window or cross-layer sharing, keys are exact token
tuples rather than hashes.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from minir1ci.inference.engine.sequence import Sequence


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_pages: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block at all")
        self.num_blocks, self.block_size, self.max_pages = num_blocks, block_size, max_pages
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: oldest first
        self.key_of: list[tuple | None] = [None] * num_blocks
        self.content_id = [-1] * num_blocks
        self.block_of_key: dict[tuple, int] = {}
        self._next_content = 0
        self.tables = torch.zeros(0, max_pages, dtype=torch.int32)  # block tables, for one-op gathers
        self._free_rows: list[int] = []

    def slots(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Cache slot (page * block_size + offset) [N] int64 of position pos[i] of the sequence in table
        row rows[i]."""
        return self.tables[rows, pos // self.block_size].long() * self.block_size + pos % self.block_size

    @property
    def num_free(self) -> int:
        return len(self.free)

    def forget_prefixes(self) -> None:
        """Make every cached page unfindable (its K/V came from old weights); pages in use stay."""
        self.block_of_key.clear()
        self.key_of = [None] * self.num_blocks

    def _take_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.key_of[block]
        if key is not None:  # its old content is about to be overwritten: forget it
            del self.block_of_key[key]
            self.key_of[block] = None
        self.content_id[block] = self._next_content
        self._next_content += 1
        self.ref[block] = 1
        return block

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Pages that already hold the leading full blocks of `seq.tokens`."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], -1
        for i in range(len(seq.tokens) // self.block_size):
            block = self.block_of_key.get((parent, tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])))
            if block is None:
                break
            hits.append(block)
            parent = self.content_id[block]
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give `seq` pages for all its tokens; False (and no change) when the pool is too small. One
        without pages (new or preempted) first takes shared prefix blocks, which set `num_cached`."""
        if seq.block_table:
            return self.extend(seq, len(seq.tokens))
        hits = self._prefix_hits(seq)
        needed = -(-len(seq.tokens) // self.block_size)
        if needed > self.max_pages:
            raise ValueError(f"sequence of {len(seq.tokens)} tokens exceeds max_model_len")
        fresh = needed - len(hits) + sum(self.ref[b] == 0 for b in hits)  # reviving a freed page uses it up
        if fresh > self.num_free:
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        self._take_row(seq)
        seq.block_table = list(hits)
        seq.num_cached = len(hits) * self.block_size
        self._grow(seq, needed, register=True, first=0)
        return True

    def extend(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in `seq`'s private pages; False if the pool is empty."""
        needed = -(-num_tokens // self.block_size)
        if needed > self.max_pages:
            raise ValueError(f"sequence of {num_tokens} tokens exceeds max_model_len")
        if needed - len(seq.block_table) > self.num_free:
            return False
        self._grow(seq, needed, register=False)
        return True

    def _grow(self, seq: Sequence, needed: int, register: bool, first: int | None = None) -> None:
        """Append pages up to `needed`, then mirror entries from `first` (default: the new ones)."""
        have = len(seq.block_table)
        first = have if first is None else first
        for i in range(have, needed):
            seq.block_table.append(self._take_block())
            full = (i + 1) * self.block_size <= len(seq.tokens)
            if register and full and self.enable_prefix_caching:
                parent = self.content_id[seq.block_table[i - 1]] if i > 0 else -1
                key = parent, tuple(seq.tokens[i * self.block_size:(i + 1) * self.block_size])
                self.key_of[seq.block_table[i]] = key
                self.block_of_key[key] = seq.block_table[i]
        if needed > first:
            self.tables[seq.row, first:needed] = torch.tensor(seq.block_table[first:needed], dtype=torch.int32)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s pages (it must be recomputed to run again). Pages stay cached until reused."""
        # Tail pages first, so that the least recently freed pages, reused first, are the tails
        # and a shared prompt head survives longest.
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_cached = seq.dense_len = 0
        if seq.row >= 0:
            self._free_rows.append(seq.row)
            seq.row = -1

    def _take_row(self, seq: Sequence) -> None:
        """A row of `tables` for `seq`, growing `tables` when none is free."""
        if not self._free_rows:
            old = self.tables.shape[0]
            new = max(8, 2 * old)
            self.tables = torch.cat([self.tables, torch.zeros(new - old, self.max_pages, dtype=torch.int32)])
            self._free_rows = list(range(new - 1, old - 1, -1))
        seq.row = self._free_rows.pop()
