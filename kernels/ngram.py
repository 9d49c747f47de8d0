"""No-repeat n-gram ban: HF's NoRepeatNGramLogitsProcessor with a per-row n.

A row with history h[0:L] and n bans every token h[j + n - 1] such that
h[j : j + n - 1] equals the last n - 1 tokens h[L - n + 1 : L] (j = 0 .. L - n).
n = 1 bans every token of the history; n = 0 (off) or n > L bans nothing.

The kernel runs one program per (row, block of window starts j): each compares
its windows with the row's suffix and stores -inf at the tokens they would
complete. Several windows may ban the same token; they all store the same value,
so the stores need no ordering.
"""

import torch
import triton
import triton.language as tl

_BLOCK_WINDOWS = 256


@triton.jit
def _ban_ngrams_kernel(
    logits_ptr, stride_logits, token_ids_ptr, stride_tokens, seq_lens_ptr, ngram_size_ptr,
    V, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    n = tl.load(ngram_size_ptr + row).to(tl.int32)
    length = tl.load(seq_lens_ptr + row).to(tl.int32)
    tokens_ptr = token_ids_ptr + row * stride_tokens
    starts = block * BLOCK + tl.arange(0, BLOCK)  # window starts j
    # Windows j = 0 .. length - n exist only when n >= 1 (n = 0 empties the range).
    valid = (starts <= length - n) & (starts < length * (n > 0).to(tl.int32))
    suffix_start = length - n + 1
    for t in range(0, n - 1):
        window_token = tl.load(tokens_ptr + starts + t, mask=valid, other=-1)
        # Clamped: when the history is shorter than n no window is valid anyway.
        suffix_token = tl.load(tokens_ptr + tl.maximum(suffix_start + t, 0))
        valid = valid & (window_token == suffix_token)
    banned = tl.load(tokens_ptr + starts + n - 1, mask=valid, other=-1)
    valid = valid & (banned >= 0) & (banned < V)
    tl.store(logits_ptr + row * stride_logits + banned, float("-inf"), mask=valid)


def _check(logits, token_ids, seq_lens, ngram_size):
    if logits.dim() != 2 or token_ids.dim() != 2:
        raise ValueError(
            f"logits and token_ids must be 2-D, got shapes {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    batch = logits.shape[0]
    for name, tensor in (("token_ids", token_ids), ("seq_lens", seq_lens), ("ngram_size", ngram_size)):
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must have {batch} rows, got {tensor.shape[0]}")


def ban_ngrams_triton(
    logits: torch.Tensor, token_ids: torch.Tensor, seq_lens: torch.Tensor, ngram_size: torch.Tensor
) -> torch.Tensor:
    _check(logits, token_ids, seq_lens, ngram_size)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocab dimension")
    token_ids = token_ids.contiguous()
    batch, max_len = token_ids.shape
    if batch == 0 or max_len == 0:
        return logits
    grid = (batch, triton.cdiv(max_len, _BLOCK_WINDOWS))
    _ban_ngrams_kernel[grid](
        logits, logits.stride(0), token_ids, token_ids.stride(0), seq_lens, ngram_size,
        logits.shape[1], BLOCK=_BLOCK_WINDOWS, num_warps=4,
    )
    return logits


def ban_ngrams_reference(
    logits: torch.Tensor, token_ids: torch.Tensor, seq_lens: torch.Tensor, ngram_size: torch.Tensor
) -> torch.Tensor:
    """Row by row with `unfold`: compare every window's prefix with the suffix."""
    _check(logits, token_ids, seq_lens, ngram_size)
    for row in range(logits.shape[0]):
        n = int(ngram_size[row])
        length = int(seq_lens[row])
        if n <= 0 or length < n:
            continue
        history = token_ids[row, :length]
        windows = history.unfold(0, n, 1)  # [length - n + 1, n]
        suffix = history[length - n + 1:]  # [n - 1]
        match = (windows[:, :-1] == suffix).all(dim=-1)
        logits[row, windows[match, -1]] = float("-inf")
    return logits


def ban_ngrams(
    logits: torch.Tensor,  # [B, V], modified in place and returned
    token_ids: torch.Tensor,  # [B, L] int64, padded with -1 past each row's length
    seq_lens: torch.Tensor,  # [B] valid length of each row
    ngram_size: torch.Tensor,  # [B] int32 n per row, 0 = off
) -> torch.Tensor:
    """Set to -inf every token that would repeat an n-gram of the row's history."""
    if logits.is_cuda:
        return ban_ngrams_triton(logits, token_ids, seq_lens, ngram_size)
    return ban_ngrams_reference(logits, token_ids, seq_lens, ngram_size)
