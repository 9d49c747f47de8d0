"""Paged KV-cache write and paged attention in torch: the CPU path (layout in kernels.attention).

One step runs the same attention in every layer over the same sequences, so what does not depend
on the layer (which rows to write where, how decode sequences form chunks, which cache blocks each
chunk gathers, the masks) is worked out once per step as a :class:`ReferencePlan` and reused by
every layer. A layer then only writes its keys, gathers its blocks and calls SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Decode gathers its sequences' cache blocks into one copy per chunk of sequences, then runs SDPA
# on it. Chunks are cut (sequences sorted by length, each chunk padded to its own longest) so that
# one chunk's copy of one cache stays near this size per torch thread: small copies stay in the CPU's caches and
# below glibc's mmap threshold, where one copy of the whole batch went to fresh pages (measured
# 1.2-4x slower at 32-64 sequences of 256-1024 tokens, BENCHMARKS.md). A chunk holds at least
# MIN_DECODE_CHUNK sequences: below that the per-call overhead (threads, dispatch) dominates.
DECODE_GATHER_BYTES = 1 << 20
MIN_DECODE_CHUNK = 2


def _check_cache(name: str, cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if cache.dim() != 4 or cache.shape[2] != num_kv_heads or cache.shape[3] != head_dim:
        raise ValueError(
            f"{name} shape {tuple(cache.shape)} must be [num_blocks, block_size, "
            f"{num_kv_heads}, {head_dim}] (num_kv_heads, head_dim of the keys)"
        )


def _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    if k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} must be [num_blocks, block_size, num_kv_heads, {head_dim}]")
    _check_cache("v_cache", v_cache, k_cache.shape[2], head_dim)
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables shape {tuple(block_tables.shape)} must be [num_seqs={num_seqs}, max_blocks]")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc shape {tuple(query_start_loc.shape)} must be [num_seqs + 1 = {num_seqs + 1}]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be None or >= 1")


# ----------------------------------------------------------------------------------------------
# the per-step plan
# ----------------------------------------------------------------------------------------------


@dataclass
class WritePlan:
    rows: torch.Tensor | None  # [K] rows of the step's keys to write; None: every row
    slots: torch.Tensor  # [K] int64 cache slots


@dataclass
class DecodeChunk:
    rows: torch.Tensor | None  # [S_c] query rows (one per sequence); None: the whole query, in order
    block_ids: torch.Tensor  # [S_c * num_blocks] the sequences' cache blocks, row by row
    bias: torch.Tensor  # [S_c, 1, 1, num_blocks * block_size] additive mask (0 / -inf)


@dataclass
class SequenceSpan:
    start: int  # query rows [start, end)
    end: int
    block_ids: torch.Tensor  # [num_blocks]
    seq_len: int
    bias: torch.Tensor  # [q_len, seq_len]


@dataclass
class ReferencePlan:
    """The layer-independent part of one step's attention (for one sliding window and dtype)."""

    num_tokens: int
    decode: list[DecodeChunk]  # decode sequences (one new token each), a few per chunk
    sequences: list[SequenceSpan]  # sequences with more than one new token, one by one


def plan_write(slot_mapping: torch.Tensor) -> WritePlan:
    keep = slot_mapping >= 0  # [T]
    if bool(keep.all()):
        return WritePlan(None, slot_mapping.to(torch.long))
    rows = keep.nonzero().view(-1)  # [K]
    return WritePlan(rows, slot_mapping.index_select(0, rows).to(torch.long))


def _allowed_bias(query_pos, key_pos, sliding_window, dtype):
    """Additive mask (0 or -inf) for queries at ``query_pos`` [..., Q, 1] over keys at ``key_pos`` [L]."""
    allowed = key_pos <= query_pos  # [..., Q, L]
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def decode_chunks(seq_ids: list[int], lens: list[int], block_size: int, block_bytes: int) -> list[list[int]]:
    """``seq_ids`` sorted by length and cut into chunks whose gathered keys (chunk size x its
    longest sequence's blocks x ``block_bytes``) stay within DECODE_GATHER_BYTES per torch thread,
    each chunk at least MIN_DECODE_CHUNK sequences (or what is left). All of them in one chunk keep
    their order (no scatter of the outputs)."""
    budget = DECODE_GATHER_BYTES * torch.get_num_threads()
    if len(seq_ids) <= MIN_DECODE_CHUNK or (
        len(seq_ids) * -(-max(lens[s] for s in seq_ids) // block_size) * block_bytes <= budget
    ):
        return [seq_ids] if seq_ids else []
    chunks: list[list[int]] = []
    for s in sorted(seq_ids, key=lens.__getitem__):
        chunk = chunks[-1] if chunks else None
        fits = chunk is not None and (
            len(chunk) < MIN_DECODE_CHUNK
            or (len(chunk) + 1) * -(-lens[s] // block_size) * block_bytes <= budget
        )
        if fits:
            chunk.append(s)
        else:
            chunks.append([s])
    return chunks


def _decode_chunk(seqs, num_tokens, starts, lens, block_tables, seq_lens, block_size, sliding_window, dtype):
    device = block_tables.device
    num_blocks = -(-max(lens[s] for s in seqs) // block_size)  # the chunk's longest sequence
    in_order = len(seqs) == num_tokens and all(starts[s] == i for i, s in enumerate(seqs))
    ids = torch.tensor(seqs, device=device)  # [S_c]
    tables = block_tables if in_order and len(seqs) == block_tables.shape[0] else block_tables.index_select(0, ids)
    key_pos = torch.arange(num_blocks * block_size, device=device)  # [L]
    query_pos = (seq_lens.index_select(0, ids).to(torch.long) - 1).view(len(seqs), 1, 1, 1)  # [S_c, 1, 1, 1]
    return DecodeChunk(
        rows=None if in_order else torch.tensor([starts[s] for s in seqs], device=device),
        block_ids=tables[:, :num_blocks].reshape(-1),
        bias=_allowed_bias(query_pos, key_pos, sliding_window, dtype),
    )


def plan_reference(block_tables, seq_lens, query_start_loc, block_size, sliding_window=None,
                   dtype=torch.float32, block_bytes: int = 0) -> ReferencePlan:
    """What every layer of one step shares (see the module doc). ``block_bytes``: the size of one
    block of one cache (sizes the decode chunks; 0: one chunk)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_tokens = starts[-1] if starts else 0
    decode_ids = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
    decode = [
        _decode_chunk(chunk, num_tokens, starts, lens, block_tables, seq_lens, block_size, sliding_window, dtype)
        for chunk in decode_chunks(decode_ids, lens, block_size, block_bytes)
    ]
    sequences = []
    for s in range(len(lens)):
        start, end, seq_len = starts[s], starts[s + 1], lens[s]
        if end - start <= 1:
            continue
        key_pos = torch.arange(seq_len, device=block_tables.device)  # [L]
        sequences.append(SequenceSpan(
            start, end, block_tables[s, : -(-seq_len // block_size)], seq_len,
            _allowed_bias(key_pos[seq_len - (end - start):, None], key_pos, sliding_window, dtype),
        ))
    return ReferencePlan(num_tokens, decode, sequences)


# ----------------------------------------------------------------------------------------------
# one layer
# ----------------------------------------------------------------------------------------------


def write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping, plan: WritePlan | None = None) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the caches at ``slot_mapping`` ``[T]`` (< 0: skip)."""
    _check_cache("k_cache", k_cache, key.shape[1], key.shape[2])
    _check_cache("v_cache", v_cache, key.shape[1], key.shape[2])
    plan = plan or plan_write(slot_mapping)
    for new, cache in ((key, k_cache), (value, v_cache)):
        if plan.rows is not None:
            new = new.index_select(0, plan.rows)
        cache.view(-1, cache.shape[2], cache.shape[3]).index_copy_(0, plan.slots, new.to(cache.dtype))


def _gather(cache, block_ids, num_seqs):
    """The blocks ``block_ids`` [S * n] of ``cache`` as ``[S, Hkv, n * block_size, D]`` (a view of one
    gathered copy). index_select rather than ``cache[tables]``: the same copy, 1.2-1.7x faster on CPU.
    Reading the blocks in place instead (a loop over block columns with an online softmax, or an
    inductor-compiled gather-and-reduce) was measured slower, so decode keeps this copy, one chunk
    of sequences at a time (DECODE_GATHER_BYTES)."""
    gathered = cache.index_select(0, block_ids)  # [S * n, block_size, Hkv, D]
    return gathered.view(num_seqs, -1, cache.shape[2], cache.shape[3]).transpose(1, 2)


def _attend_decode(query, k_cache, v_cache, chunk: DecodeChunk, scale):
    """One query per sequence, the chunk in one batched SDPA. query [S_c, Hq, D] -> [S_c, Hq, D]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    keys = _gather(k_cache, chunk.block_ids, num_seqs)  # [S_c, Hkv, L, D]
    values = _gather(v_cache, chunk.block_ids, num_seqs)
    # Grouped-query attention without copying keys: the query heads of one kv head become
    # that kv head's query rows (decode has no causality between them).
    grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S_c, Hkv, G, D]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=chunk.bias, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _attend_sequence(query, k_cache, v_cache, span: SequenceSpan, scale):
    """Causal attention of one sequence's newest tokens. query [q_len, Hq, D] -> [q_len, Hq, D]."""
    keys = _gather(k_cache, span.block_ids, 1)[:, :, : span.seq_len]  # [1, Hkv, L, D]
    values = _gather(v_cache, span.block_ids, 1)[:, :, : span.seq_len]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys, values, attn_mask=span.bias, scale=scale, enable_gqa=True
    )  # [1, Hq, q_len, D]
    return out[0].transpose(0, 1)


def paged_attention_reference(
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
    max_query_len, max_seq_len, sliding_window=None, plan: ReferencePlan | None = None,
) -> torch.Tensor:
    """Torch paged attention (layout in kernels.attention). Decode sequences run batched (a few
    chunks of similar lengths), the others one by one. ``plan``: this step's :func:`plan_reference` (built here
    if None)."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    if plan is None:
        plan = plan_reference(block_tables, seq_lens, query_start_loc, k_cache.shape[1], sliding_window, query.dtype,
                              k_cache[0].nbytes)
    if len(plan.decode) == 1 and plan.decode[0].rows is None and query.shape[0] == plan.num_tokens:  # no scatter
        return _attend_decode(query, k_cache, v_cache, plan.decode[0], scale)
    out = torch.zeros_like(query)  # [T, Hq, D]
    for chunk in plan.decode:
        out[chunk.rows] = _attend_decode(query.index_select(0, chunk.rows), k_cache, v_cache, chunk, scale)
    for span in plan.sequences:
        out[span.start : span.end] = _attend_sequence(query[span.start : span.end], k_cache, v_cache, span, scale)
    return out


class StepPlans:
    """One step's plans, built by its first layer and reused by the others. Never reuse one
    across steps: the plans hold that step's lengths and block tables."""

    def __init__(self) -> None:
        self._write: WritePlan | None = None
        self._attention: dict[tuple, ReferencePlan] = {}

    def write(self, slot_mapping: torch.Tensor) -> WritePlan:
        if self._write is None:
            self._write = plan_write(slot_mapping)
        return self._write

    def attention(self, block_tables, seq_lens, query_start_loc, block_size, sliding_window, dtype,
                  block_bytes: int = 0) -> ReferencePlan:
        key = (block_size, sliding_window, dtype, block_bytes)  # models may mix windowed and full layers
        plan = self._attention.get(key)
        if plan is None:
            plan = self._attention[key] = plan_reference(
                block_tables, seq_lens, query_start_loc, block_size, sliding_window, dtype, block_bytes
            )
        return plan
