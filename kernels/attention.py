"""Paged KV-cache write and paged attention: torch reference, Triton kernels, dispatch.

Cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``. A token's
slot is ``block_id * block_size + offset``. A flat batch holds the new tokens of many
sequences back to back: sequence ``s`` owns queries ``[query_start_loc[s], query_start_loc[s+1])``
and its ``q_len`` new tokens sit at positions ``seq_len - q_len .. seq_len - 1``; query ``i``
attends causally to cache positions ``0 .. seq_len - q_len + i`` (and, with a sliding window
``w``, only to positions ``> position - w``, as in transformers). One call covers decode,
chunked prefill over a cached prefix and mixes of both.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


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
# torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------


def write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the caches at ``slot_mapping`` ``[T]`` (< 0: skip)."""
    _check_cache("k_cache", k_cache, key.shape[1], key.shape[2])
    _check_cache("v_cache", v_cache, key.shape[1], key.shape[2])
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]  # [num_kept]
    k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])[slots] = value[keep].to(v_cache.dtype)


def _allowed_bias(query_pos, key_pos, sliding_window, dtype):
    """Additive mask (0 or -inf) for queries at ``query_pos`` [..., Q, 1] over keys at ``key_pos`` [L]."""
    allowed = key_pos <= query_pos  # [..., Q, L]
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _gather_blocks(cache, tables, num_blocks):
    """Keys of sequences ``tables`` [S, >=num_blocks] as ``[S, Hkv, num_blocks * block_size, D]`` (a view)."""
    num_seqs, block_size, num_kv_heads, head_dim = tables.shape[0], cache.shape[1], cache.shape[2], cache.shape[3]
    gathered = cache[tables[:, :num_blocks]]  # [S, num_blocks, block_size, Hkv, D]
    return gathered.view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _decode_reference(query, k_cache, v_cache, tables, seq_lens, scale, max_seq_len, sliding_window):
    """One query per sequence, all sequences in one batched SDPA. query [S, Hq, D] -> [S, Hq, D]."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_seq_len // block_size)
    keys = _gather_blocks(k_cache, tables, num_blocks)  # [S, Hkv, L, D]
    values = _gather_blocks(v_cache, tables, num_blocks)  # [S, Hkv, L, D]
    key_pos = torch.arange(keys.shape[2], device=query.device)  # [L]
    query_pos = (seq_lens.to(torch.long) - 1).view(num_seqs, 1, 1, 1)  # [S, 1, 1(query), 1]
    bias = _allowed_bias(query_pos, key_pos, sliding_window, query.dtype)  # [S, 1, 1, L]
    # Grouped-query attention without copying keys: the query heads of one kv head become
    # that kv head's query rows (decode has no causality between them).
    grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, Hkv, G, D]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias, scale=scale)  # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def _sequence_reference(query, k_cache, v_cache, table, seq_len, scale, sliding_window):
    """Causal attention of one sequence's ``q_len`` newest tokens. query [q_len, Hq, D] -> [q_len, Hq, D]."""
    q_len = query.shape[0]
    num_blocks = -(-seq_len // k_cache.shape[1])
    keys = _gather_blocks(k_cache, table[None], num_blocks)[:, :, :seq_len]  # [1, Hkv, L, D]
    values = _gather_blocks(v_cache, table[None], num_blocks)[:, :, :seq_len]  # [1, Hkv, L, D]
    key_pos = torch.arange(seq_len, device=query.device)  # [L]
    query_pos = key_pos[seq_len - q_len :, None]  # [q_len, 1]
    bias = _allowed_bias(query_pos, key_pos, sliding_window, query.dtype)  # [q_len, L]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys, values, attn_mask=bias, scale=scale, enable_gqa=True
    )  # [1, Hq, q_len, D]
    return out[0].transpose(0, 1)


def paged_attention_reference(
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
    max_query_len, max_seq_len, sliding_window=None,
) -> torch.Tensor:
    """Torch paged attention (see module doc). Decode sequences run as one batch, others one by one."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    out = torch.zeros_like(query)  # [T, Hq, D]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode_ids = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
    if decode_ids:
        device = query.device
        ids = torch.tensor(decode_ids, device=device)  # [S_dec]
        rows = query_start_loc[ids].to(torch.long)  # [S_dec]
        out[rows] = _decode_reference(
            query[rows], k_cache, v_cache, block_tables[ids], seq_lens[ids], scale,
            max(lens[s] for s in decode_ids), sliding_window,
        )
    if len(decode_ids) < len(lens):
        for s in range(len(lens)):
            start, end = starts[s], starts[s + 1]
            if end - start > 1:
                out[start:end] = _sequence_reference(
                    query[start:end], k_cache, v_cache, block_tables[s], lens[s], scale, sliding_window
                )
    return out


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write new keys/values [T, Hkv, D] into the paged caches at ``slot_mapping`` [T] (< 0: skip)."""
    write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping)


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
) -> torch.Tensor:
    """Attention of a flat batch of queries [T, Hq, D] over paged caches; returns [T, Hq, D]."""
    return paged_attention_reference(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        max_query_len, max_seq_len, sliding_window,
    )
