"""Paged KV-cache write and paged attention: Triton kernels and the dispatch between them and the
torch path (kernels.attention_reference, the CPU path).

Cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``. A token's
slot is ``block_id * block_size + offset``. A flat batch holds the new tokens of many
sequences back to back: sequence ``s`` owns queries ``[query_start_loc[s], query_start_loc[s+1])``
and its ``q_len`` new tokens sit at positions ``seq_len - q_len .. seq_len - 1``; query ``i``
attends causally to cache positions ``0 .. seq_len - q_len + i`` (and, with a sliding window
``w``, only to positions ``> position - w``, as in transformers). One call covers decode,
chunked prefill over a cached prefix and mixes of both.

A decode step of a small batch would run too few programs (one per sequence and kv head: 8 for
one stream of a Llama with 8 kv heads, on a GPU of 132 SMs), each walking every key of its
sequence. There the keys of each sequence are split over up to 16 programs that write partial
results (unnormalised output, running max and sum), and a second kernel merges them, as
flash-decoding does (`decode_splits` picks the count from the batch's shape and a bound on the
longest sequence that a captured CUDA graph keeps fixed, so the graph is right for every replay).
"""

import torch
import triton
import triton.language as tl

from tokenmill.kernels.attention_reference import (  # the torch path (the twins share signatures and checks)
    StepPlans,
    _check_attention_inputs,
    _check_cache,
    paged_attention_reference,
    write_kv_cache_reference,
)
from tokenmill.kernels.sm_count import sm_count as _sm_count

LOG2_E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Triton (the CUDA path)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_key_t, stride_key_h, stride_key_d,
    stride_value_t, stride_value_h, stride_value_d,
    stride_kc_block, stride_kc_offset, stride_kc_h, stride_kc_d,
    stride_vc_block, stride_vc_offset, stride_vc_h, stride_vc_d,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: copy its [Hkv, D] key and value into the cache slot (none if slot < 0)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    num_heads_written = tl.where(slot >= 0, num_kv_heads, 0)  # a skipped token writes no head
    mask = (heads < num_heads_written) & (dims < head_dim)
    key = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims * stride_key_d, mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h + dims * stride_value_d, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_offset + heads * stride_kc_h + dims * stride_kc_d
    v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_offset + heads * stride_vc_h + dims * stride_vc_d
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Triton twin of :func:`write_kv_cache_reference`."""
    _check_cache("k_cache", k_cache, key.shape[1], key.shape[2])
    _check_cache("v_cache", v_cache, key.shape[1], key.shape[2])
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every decode batch size
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, sliding_window, head_dim,
    stride_q_t, stride_q_h, stride_q_d,
    stride_o_t, stride_o_h, stride_o_d,
    stride_k_block, stride_k_offset, stride_k_h, stride_k_d,
    stride_v_block, stride_v_offset, stride_v_h, stride_v_d,
    stride_table,
    part_acc_ptr, part_ml_ptr, num_tokens, num_heads,  # split decode: per-split partial results
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,  # rows of the query tile: (token, head of the group) pairs
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision
    NUM_SPLITS: tl.constexpr,  # > 1: decode with the keys split over NUM_SPLITS programs per sequence
):
    """Program (sequence, query tile, kv head): online-softmax attention of BLOCK_Q query tokens
    times the GROUP query heads sharing one kv head, over that sequence's paged keys.

    With NUM_SPLITS > 1 (decode: one query tile per sequence), axis 1 is the split instead: the
    program attends to its contiguous share of the keys and writes its unnormalised output, running
    max and sum (`part_acc`, `part_ml`), which `_combine_splits_kernel` merges."""
    seq = tl.program_id(0)
    if NUM_SPLITS > 1:
        tile = 0
        split = tl.program_id(1)
    else:
        tile = tl.program_id(1)
        split = 0
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP  # query index within the sequence  [BLOCK_M]
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M]
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    query_pos = context_len + token  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim

    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :] * stride_q_d,
        mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Keys this tile can see: [lo, hi). An empty tile (past q_len) gets hi = 0 and skips the loop.
    tile_first = context_len + tile * BLOCK_Q
    hi = tl.minimum(tile_first + BLOCK_Q, seq_len)
    hi = tl.where(tile * BLOCK_Q < q_len, hi, 0)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(tile_first - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    if NUM_SPLITS > 1:  # this program's share: whole key blocks, the last shares possibly empty
        share = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * share
        hi = tl.minimum(lo + share, hi)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(lo, hi, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_valid = key_pos < hi
        block = tl.load(table_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        offset = key_pos % BLOCK_SIZE
        kv_valid = key_valid[:, None] & dim_valid[None, :]  # [BLOCK_N, BLOCK_D]
        k = tl.load(
            k_cache_ptr + block[:, None] * stride_k_block + offset[:, None] * stride_k_offset
            + kv_head * stride_k_h + dims[None, :] * stride_k_d,
            mask=kv_valid, other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        allowed = (key_pos[None, :] <= query_pos[:, None]) & key_valid[None, :]
        if USE_WINDOW:
            allowed = allowed & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_v_block + offset[:, None] * stride_v_offset
            + kv_head * stride_v_h + dims[None, :] * stride_v_d,
            mask=kv_valid, other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS > 1:
        part = (split * num_tokens + q_rows) * num_heads + head  # [BLOCK_M] (split, token, head)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + 2 * part, m_i, mask=row_valid)
        tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=row_valid)
    else:
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_o_t + head[:, None] * stride_o_h + dims[None, :] * stride_o_d,
            out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def _combine_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, query_start_loc_ptr, num_seqs, num_tokens, num_heads, head_dim,
    stride_o_t, stride_o_h, stride_o_d,
    NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token, head): merge the splits' partial attention (flash-decoding's second pass).
    Tokens past the batch's last query (padding) get zeros, as the one-pass kernel leaves them."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    used = token + splits * 0 < tl.load(query_start_loc_ptr + num_seqs)  # [NUM_SPLITS], all alike
    part = (splits * num_tokens + token).to(tl.int64) * num_heads + head  # [NUM_SPLITS]
    m = tl.load(part_ml_ptr + 2 * part, mask=used, other=-1.0e30)  # log2 domain, as the kernel keeps it
    l = tl.load(part_ml_ptr + 2 * part + 1, mask=used, other=0.0)
    weight = tl.exp2(m - tl.max(m, 0))  # an empty split (m = -1e30, l = 0) weighs nothing
    total = tl.sum(weight * l, 0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :],
                  mask=used[:, None], other=0.0)  # [NUM_SPLITS, BLOCK_D]
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + token.to(tl.int64) * stride_o_t + head * stride_o_h + dims * stride_o_d,
             out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def _attention_tiles(group: int, head_dim: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N): small query tiles for decode, larger ones for prefill."""
    block_m = max(16, triton.next_power_of_2(group))
    if max_query_len > 1:
        block_m = max(block_m, 64)
    block_n = 64 if triton.next_power_of_2(head_dim) <= 128 else 32
    return block_m, block_m // group, block_n


MAX_DECODE_SPLITS = 16


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device, max_seq_len: int | None = None,
                  block_n: int = 64) -> int:
    """Programs per (sequence, kv head) for a decode step: a power of two that brings the programs
    near the GPU's SM count (a batch of one sequence over 8 kv heads runs 8 programs, 16x too few
    on 132 SMs), 1 once the batch fills the SMs, and no more than the `block_n`-key blocks of the
    longest sequence (`max_seq_len`: a bound is enough). It depends on the batch's shape and that
    bound only: a compiled step passes the block table's width as the bound, fixed for a captured
    CUDA graph, so the count is right for every replay."""
    programs = max(1, num_seqs * num_kv_heads)
    sms = _sm_count(device)
    most = MAX_DECODE_SPLITS if max_seq_len is None else max(1, min(MAX_DECODE_SPLITS, -(-max_seq_len // block_n)))
    splits = 1
    while splits * 2 <= most and programs * splits * 2 <= sms:
        splits *= 2
    return splits


def paged_attention_triton(
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
    max_query_len, max_seq_len, sliding_window=None, num_splits=None,
) -> torch.Tensor:
    """Triton twin of :func:`paged_attention_reference` (no device-to-host sync). `num_splits`:
    for a decode step (max_query_len 1), programs per (sequence, kv head) over the keys (None:
    `decode_splits`); other steps run one pass."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    num_tokens = query.shape[0]
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return torch.zeros_like(query)  # [T, Hq, D]
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    block_m, block_q, block_n = _attention_tiles(group, head_dim, max_query_len)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"num_splits={num_splits} is invalid: allowed None or a power of two >= 1")
    if max_query_len != 1:
        num_splits = 1
    elif num_splits is None:
        num_splits = decode_splits(num_seqs, num_kv_heads, query.device, max_seq_len, block_n)
    if num_splits > 1:
        out = torch.empty_like(query)  # the combine writes every row (padding rows get zeros)
        part_acc = torch.empty((num_splits, num_tokens, num_heads, block_d), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((num_splits, num_tokens, num_heads, 2), dtype=torch.float32, device=query.device)
        grid = (num_seqs, num_splits, num_kv_heads)
    else:
        out = torch.zeros_like(query)  # [T, Hq, D]
        part_acc = part_ml = out  # not read
        grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * LOG2_E, sliding_window or 0, head_dim,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        part_acc, part_ml, num_tokens if num_splits > 1 else 0, num_heads,  # one pass: one specialization
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, USE_WINDOW=sliding_window is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", NUM_SPLITS=num_splits,
        **_launch_options(block_d, query.element_size()),
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, query_start_loc, num_seqs, num_tokens, num_heads, head_dim, *out.stride(),
            NUM_SPLITS=num_splits, BLOCK_D=block_d,
        )
    return out


def _launch_options(block_d: int, element_size: int) -> dict[str, int]:
    """Wide float32 rows (head_dim 256): the query, key and value tiles of the default three-stage
    pipeline would outgrow shared memory, so no multi-buffering, and more warps for the registers."""
    if block_d * element_size >= 1024:
        return {"num_stages": 1, "num_warps": 8}
    return {}


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, plans: StepPlans | None = None) -> None:
    """Write new keys/values [T, Hkv, D] into the paged caches at ``slot_mapping`` [T] (< 0: skip).
    ``plans``: the step's shared CPU work (the torch path only; the kernels need none)."""
    if key.is_cuda:
        write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping, plans and plans.write(slot_mapping))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
    plans: StepPlans | None = None,
) -> torch.Tensor:
    """Attention of a flat batch of queries [T, Hq, D] over paged caches; returns [T, Hq, D].
    ``plans``: the step's shared CPU work (the torch path only)."""
    args = (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len, max_seq_len,
            sliding_window)
    if query.is_cuda:
        return paged_attention_triton(*args)
    plan = plans and plans.attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], sliding_window,
                                     query.dtype, k_cache[0].nbytes)
    return paged_attention_reference(*args, plan=plan)
