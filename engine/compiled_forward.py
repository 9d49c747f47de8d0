"""Compiled decode steps: the model forward under `torch.compile`, one graph per batch-size bucket,
with a CUDA graph per bucket on top on CUDA.

A pure-decode step of n sequences is padded to the smallest bucket >= n. Its inputs are leading
slices of InputBuffers' device buffers (never reallocated), so every call of a bucket sees tensors
of the same shapes at the same addresses: dynamo compiles each bucket once and a CUDA graph can
replay it (the batch dimension is marked dynamic, so every bucket shares one compiled graph).
Padding rows have slot -1 (their keys/values are never written), sequence length 1 and
block table row 0; their outputs are discarded. Prefill and mixed steps run eager.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.engine.attention_backend import AttentionContext
from tokenmill.engine.attention_op import shared_step_plans
from tokenmill.engine.input_buffers import InputBuffers

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int, single: bool = False) -> list[int]:
    """Padded batch sizes: 2, 4, 8, then every 8 up to 256, every 16 above; max_num_seqs last.

    A bucket of 1 only with `single` (the CPU): dynamo specializes a dimension of size 1, so a
    bucket of 1 compiles the whole model a second time (minutes for a large one). On a GPU a single
    decode runs padded to 2 rows, which costs next to nothing where the step reads every weight
    once whatever the batch; on the CPU one row takes the linear layers' fast matrix-vector shape
    (~25 ms against ~45 ms for two rows on the default model, BENCHMARKS.md)."""
    sizes = [2, 4, 8] + list(range(16, 257, 8)) + list(range(272, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs} | ({1} if single else set()))


def model_forward(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Logits of every row, [B, vocab], in the model dtype. (Module level: one compiled code
    object for every runner of the same model.)"""
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0, tokenmill_context=ctx)
    return out.logits[0]


# The batch dimension of the bucket inputs is marked dynamic: one graph serves every bucket, so
# the compile cost is paid once, not once per bucket, and the CUDA graphs are captured per bucket
# on top. Should a model's code force a static batch, each bucket compiles once instead.
_compiled_forward = torch.compile(model_forward, fullgraph=True)


class DecodeGraphs:
    """Runs padded decode steps through the compiled forward (and CUDA graphs on CUDA)."""

    def __init__(
        self,
        model: torch.nn.Module,
        buffers: InputBuffers,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.buffers = buffers
        self.buckets = decode_buckets(max_num_seqs, single=buffers.device.type == "cpu")
        # One graph per bucket, and no shape may fall back to eager for want of room.
        limit = len(self.buckets) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit
        )
        dev = buffers.dev
        block_size = k_caches[0].shape[1] if k_caches else 1
        # The number of cache blocks differs between runners of one model (the KV-sizing probe, the
        # engine, a second engine): dynamic, so they share the compiled graphs instead of each
        # compiling its own.
        for cache in (*k_caches, *v_caches):
            torch._dynamo.maybe_mark_dynamic(cache, 0)
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, AttentionContext]] = {}
        for b in self.buckets:
            ctx = AttentionContext(
                k_caches=k_caches,
                v_caches=v_caches,
                slot_mapping=dev["slot_mapping"][:b],  # [B]
                block_tables=dev["block_tables"][:b],  # [B, max_blocks]
                seq_lens=dev["seq_lens"][:b],  # [B]
                query_start_loc=dev["query_start_loc"][: b + 1],  # [B + 1]
                max_query_len=1,
                max_seq_len=0,  # not a constant of the graph: attention reads or bounds it
            )
            ids, pos = dev["input_ids"][:b].view(1, b), dev["positions"][:b].view(1, b)  # [1, B]
            # The block-table width too: the KV-sizing probe's is capped by its token budget, the
            # engine's by max_model_len (128 and 256 blocks at the defaults).
            for tensor, dim in ((ids, 1), (pos, 1), (ctx.slot_mapping, 0), (ctx.block_tables, 0),
                                (ctx.block_tables, 1), (ctx.seq_lens, 0), (ctx.query_start_loc, 0)):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
            self.inputs[b] = (ids, pos, ctx)
        self.block_size = block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket_for(self, num_seqs: int, num_tokens: int) -> int | None:
        """The padded size for a step, or None when it runs eager (not pure decode, or too big)."""
        if num_tokens != num_seqs or num_seqs > self.buckets[-1]:
            return None
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def run(self, bucket: int) -> torch.Tensor:
        """Logits [bucket, vocab] of the prepared (padded) step; a CUDA graph's output is reused
        by its next replay, so read it before the next step."""
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph[0].replay()
            return graph[1]
        ids, pos, ctx = self.inputs[bucket]
        if self.buffers.device.type == "cuda":
            return _compiled_forward(self.model, ids, pos, ctx)
        with shared_step_plans():  # the CPU attention's layers plan once per step
            return _compiled_forward(self.model, ids, pos, ctx)

    # ------------------------------------------------------------------ CUDA graphs
    def capture(self, buckets: list[int] | None = None) -> None:
        """Capture a CUDA graph per bucket, largest first, all in one memory pool (each smaller
        graph reuses the larger ones' memory). The inputs are all padding while capturing."""
        if self.buffers.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        start = time.perf_counter()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        for b in sorted(buckets or self.buckets, reverse=True):
            self.buffers.prepare_padding(0, b)
            ids, pos, ctx = self.inputs[b]
            with torch.inference_mode():
                for _ in range(2):  # compile, then a warm run outside the capture
                    _compiled_forward(self.model, ids, pos, ctx)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = _compiled_forward(self.model, ids, pos, ctx)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - start)
