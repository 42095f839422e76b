"""Running the model for one sampler step: the KV cache tensors, attention metadata, CUDA graphs.

Packs a step into `model.model(input_ids[N], position_ids[N], kv_caches, attn_meta)`: a prefill runs
each sequence's uncached tokens (at least its last; one whose K/V is cached gets slot -1), a decode
its last token; only each sequence's last position goes through lm_head. On CUDA, decode replays
graphs captured per batch-size bucket; they read the parameters in place, so `copy_` updates hold.

Simplified against nano-vllm: no tensor parallelism, no torch.compile, prefill is never graphed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from minir1ci.inference.model import AttnMeta
from minir1ci.inference.engine.block_manager import BlockManager
from minir1ci.inference.engine.kv_rows import KVRows
from minir1ci.inference.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: nn.Module, block_manager: BlockManager, use_cuda_graphs: bool = True,
                 max_graph_batch: int = 256, rows_bytes: int = 0):
        self.model, self.bm = model, block_manager
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_manager.block_size
        shape = (block_manager.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Uninitialised: every kernel and twin reads only the slots below each context length, and a
        # CPU cache of 1 GB made by torch.zeros cost every RL step its time; untouched pages stay unmapped.
        self.kv_caches = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                           torch.empty(shape, dtype=self.dtype, device=self.device))
                          for _ in range(cfg.num_hidden_layers)]
        # A CPU decode reads dense per-sequence rows (kv_rows.py) while they fit `rows_bytes`.
        self.kv_rows = None if self.device.type != "cpu" or not rows_bytes else KVRows(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype,
            block_manager.max_pages * self.block_size, rows_bytes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture_graphs(max_graph_batch)

    def _to_device(self, *tensors: Tensor) -> list[Tensor]:
        if self.device.type == "cpu":
            return list(tensors)
        return [t.to(self.device, non_blocking=True) for t in tensors]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """Logits [B, V] fp32 at the last token of each sequence, after caching all its tokens."""
        PS = self.block_size
        starts = [min(s.num_cached, len(s) - 1) for s in seqs]
        ids = [t for s, st in zip(seqs, starts) for t in s.tokens[st:]]
        lens = torch.tensor([len(s) for s in seqs])
        start = torch.tensor(starts)
        q_lens = lens - start                                                # [B] new tokens
        cu_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu_q[1:] = q_lens.cumsum(0)
        cu_k = torch.zeros_like(cu_q)
        cu_k[1:] = lens.cumsum(0)
        # Position of every packed token: its sequence's start plus its rank within the sequence.
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)  # [N]
        pos = torch.arange(len(ids)) - cu_q[:-1].long()[seq_of] + start[seq_of]
        rows = torch.tensor([s.row for s in seqs])
        slots = self.bm.slots(rows[seq_of], pos)
        cached = torch.tensor([s.num_cached for s in seqs])[seq_of]
        slots = torch.where(pos < cached, -1, slots)
        table = self.bm.tables[rows, :-(-int(lens.max()) // PS)]            # [B, P]
        ids_t, pos, slots, table, lens32, cu_q_d, cu_k = self._to_device(
            torch.tensor(ids), pos, slots, table, lens.to(torch.int32), cu_q, cu_k)
        meta = AttnMeta(is_prefill=True, slot_mapping=slots, block_table=table, context_lens=lens32,
                        cu_seqlens_q=cu_q_d, cu_seqlens_k=cu_k, max_seqlen_q=int(q_lens.max()),
                        max_seqlen_k=int(lens.max()))
        hidden = self.model.model(ids_t, position_ids=pos, kv_caches=self.kv_caches, attn_meta=meta)   # [N, H]
        last = hidden[cu_q_d[1:].long() - 1]                                             # [B, H]
        return self.model.lm_head(last).float()

    def _decode_inputs(self, seqs: list[Sequence], width: int) -> tuple[Tensor, ...]:
        """CPU tensors for a decode: ids, positions, slots [B]; block table [B, width]; lens [B]."""
        ids = torch.tensor([s.tokens[-1] for s in seqs])
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
        pos = lens.long() - 1
        rows = torch.tensor([s.row for s in seqs])
        table, slots = self.bm.tables[rows, :width], self.bm.slots(rows, pos)          # [B, width], [B]
        return ids, pos, slots, table, lens

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """Logits [B, V] fp32 for the next token of each sequence (its last token is cached now)."""
        B = len(seqs)
        bucket = next((b for b in self.graphs if b >= B), None)  # graphs are keyed smallest first
        if bucket is not None:
            return self._replay(seqs, bucket)
        width = -(-max(len(s) for s in seqs) // self.block_size)
        ids, pos, slots, table, lens = self._to_device(*self._decode_inputs(seqs, width))
        rows = None if self.kv_rows is None else self.kv_rows.sync(seqs, self.kv_caches, self.bm)
        caches = self.kv_caches if rows is None else [(*c, *r) for c, r in zip(self.kv_caches, self.kv_rows.tensors)]
        meta = AttnMeta(is_prefill=False, slot_mapping=slots, block_table=table, context_lens=lens, rows=rows)
        hidden = self.model.model(ids, position_ids=pos, kv_caches=caches, attn_meta=meta)    # [B, H]
        return self.model.lm_head(hidden).float()

    def _capture_graphs(self, max_batch: int) -> None:
        width = self.bm.max_pages
        n = max_batch
        self.static = dict(ids=torch.zeros(n, dtype=torch.long, device=self.device),
                           pos=torch.zeros(n, dtype=torch.long, device=self.device),
                           slots=torch.full((n,), -1, dtype=torch.long, device=self.device),
                           table=torch.zeros(n, width, dtype=torch.int32, device=self.device),
                           lens=torch.ones(n, dtype=torch.int32, device=self.device))
        self.graph_out: dict[int, Tensor] = {}
        sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 1, 16))
        if max_batch not in sizes:
            sizes.append(max_batch)
        pool = None
        with torch.inference_mode():
            for bs in reversed(sizes):  # largest first, so smaller graphs fit in its memory pool
                s = {k: v[:bs] for k, v in self.static.items()}
                meta = AttnMeta(is_prefill=False, slot_mapping=s["slots"], block_table=s["table"],
                                context_lens=s["lens"])

                def run() -> Tensor:
                    hidden = self.model.model(s["ids"], position_ids=s["pos"], kv_caches=self.kv_caches, attn_meta=meta)
                    return self.model.lm_head(hidden)
                run()  # warm-up outside the graph: compiles the Triton kernels for this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.graph_out[bs] = run()
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.graphs = dict(sorted(self.graphs.items()))

    def _replay(self, seqs: list[Sequence], bucket: int) -> Tensor:
        B = len(seqs)
        s = self.static
        for name, t in zip(("ids", "pos", "slots", "table", "lens"), self._decode_inputs(seqs, self.bm.max_pages)):
            s[name][:B].copy_(t, non_blocking=True)
        if bucket > B:  # padded rows: write nothing, attend to one key of page 0
            s["slots"][B:bucket].fill_(-1)
            s["lens"][B:bucket].fill_(1)
            s["table"][B:bucket].zero_()
        self.graphs[bucket].replay()
        return self.graph_out[bucket][:B].float()
