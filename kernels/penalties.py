"""Logit penalties: repetition (HF), presence and frequency (OpenAI), logit bias, bans.

Order, as in HF's processor list followed by OpenAI's formulas:
repetition -> presence/frequency -> logit bias -> bans.

* repetition (HF RepetitionPenaltyLogitsProcessor, prompt + output): every distinct
  token of the history once: logit < 0 -> logit * p, else logit / p;
* presence / frequency (OpenAI, output tokens only):
  logit -= frequency * count + presence * (count > 0);
* logit bias: logit += bias at each listed id (ids unique within a row);
* bans: listed ids -> -inf.

The kernels avoid read-after-write races by building a per-row token state first
([B, V] int32: output count in the low bits, 'in prompt' and 'banned' flags above)
with atomics, then applying everything in one pass over the vocabulary; a last
small kernel adds the biases (banned entries stay -inf).
"""

import torch
import triton
import triton.language as tl

_PROMPT_BIT = 1 << 30
_BAN_BIT = 1 << 29
_COUNT_MASK = _BAN_BIT - 1
_BLOCK_TOKENS = 512
_BLOCK_VOCAB = 1024
_BLOCK_IDS = 128


@triton.jit
def _token_state_kernel(
    state_ptr, V, token_ids_ptr, stride_tokens, prompt_lens_ptr, seq_lens_ptr,
    repetition_ptr, presence_ptr, frequency_ptr, banned_ptr, stride_banned, num_banned,
    BLOCK: tl.constexpr, BLOCK_IDS: tl.constexpr,
):
    """state[row, t]: count of t among output tokens | PROMPT_BIT if t is in the prompt
    | BAN_BIT if t is banned."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    state_row = state_ptr + row * V
    prompt_len = tl.load(prompt_lens_ptr + row).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    active = (
        (tl.load(repetition_ptr + row) != 1.0)
        | (tl.load(presence_ptr + row) != 0.0)
        | (tl.load(frequency_ptr + row) != 0.0)
    )
    positions = block * BLOCK + tl.arange(0, BLOCK)
    tokens = tl.load(
        token_ids_ptr + row * stride_tokens + positions, mask=positions < seq_len, other=-1
    )
    ok = (positions < seq_len * active.to(tl.int32)) & (tokens >= 0) & (tokens < V)
    in_prompt = positions < prompt_len
    tl.atomic_or(state_row + tokens, 1 << 30, mask=ok & in_prompt)
    tl.atomic_add(state_row + tokens, 1, mask=ok & (~in_prompt))
    # The first block of each row also marks its banned ids.
    for start in range(0, num_banned, BLOCK_IDS):
        k = start + tl.arange(0, BLOCK_IDS)
        ids = tl.load(banned_ptr + row * stride_banned + k, mask=k < num_banned * (block == 0).to(tl.int32), other=-1)
        tl.atomic_or(state_row + ids, 1 << 29, mask=(ids >= 0) & (ids < V))


@triton.jit
def _apply_kernel(
    logits_ptr, stride_logits, state_ptr, V, repetition_ptr, presence_ptr, frequency_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    ptrs = logits_ptr + row * stride_logits + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    state = tl.load(state_ptr + row * V + cols, mask=mask, other=0)
    repetition = tl.load(repetition_ptr + row)
    presence = tl.load(presence_ptr + row)
    frequency = tl.load(frequency_ptr + row)
    count = state & ((1 << 29) - 1)
    seen = ((state & (1 << 30)) != 0) | (count > 0)
    x = tl.where(seen, tl.where(x < 0, x * repetition, x / repetition), x)
    x = tl.where(count > 0, x - (frequency * count.to(tl.float32) + presence), x)
    x = tl.where((state & (1 << 29)) != 0, float("-inf"), x)
    tl.store(ptrs, x.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_kernel(
    logits_ptr, stride_logits, V, bias_ids_ptr, bias_values_ptr, stride_ids, stride_values, num_ids,
    BLOCK_IDS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, num_ids, BLOCK_IDS):
        k = start + tl.arange(0, BLOCK_IDS)
        ids = tl.load(bias_ids_ptr + row * stride_ids + k, mask=k < num_ids, other=-1)
        ok = (ids >= 0) & (ids < V)
        values = tl.load(bias_values_ptr + row * stride_values + k, mask=ok, other=0.0)
        ptrs = logits_ptr + row * stride_logits + ids
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptrs, (x + values).to(logits_ptr.dtype.element_ty), mask=ok)


def _check(logits, token_ids, prompt_lens, seq_lens, rows, banned_ids, bias_ids, bias_values):
    if logits.dim() != 2 or token_ids.dim() != 2:
        raise ValueError(
            f"logits and token_ids must be 2-D, got shapes {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    batch = logits.shape[0]
    named = {"token_ids": token_ids, "prompt_lens": prompt_lens, "seq_lens": seq_lens, **rows}
    for name, tensor in named.items():
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must have {batch} rows, got {tensor.shape[0]}")
    if (bias_ids is None) != (bias_values is None):
        raise ValueError("bias_ids and bias_values must be given together")
    if bias_ids is not None and bias_ids.shape != bias_values.shape:
        raise ValueError(
            f"bias_values must match bias_ids' shape {tuple(bias_ids.shape)}, got {tuple(bias_values.shape)}"
        )
    for name, tensor in (("banned_ids", banned_ids), ("bias_ids", bias_ids)):
        if tensor is not None and (tensor.dim() != 2 or tensor.shape[0] != batch):
            raise ValueError(f"{name} must have shape ({batch}, K), got {tuple(tensor.shape)}")


def apply_penalties_triton(
    logits, token_ids, prompt_lens, seq_lens, repetition_penalty, presence_penalty,
    frequency_penalty, banned_ids=None, bias_ids=None, bias_values=None,
) -> torch.Tensor:
    rows = {
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
    }
    _check(logits, token_ids, prompt_lens, seq_lens, rows, banned_ids, bias_ids, bias_values)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocab dimension")
    batch, vocab = logits.shape
    if batch == 0:
        return logits
    device = logits.device
    repetition = repetition_penalty.to(device=device, dtype=torch.float32).contiguous()
    presence = presence_penalty.to(device=device, dtype=torch.float32).contiguous()
    frequency = frequency_penalty.to(device=device, dtype=torch.float32).contiguous()
    token_ids = token_ids.contiguous()
    if banned_ids is None:
        banned_ids = torch.full((batch, 1), -1, dtype=torch.int64, device=device)  # [B, 1]
    banned_ids = banned_ids.contiguous()
    state = torch.zeros(batch, vocab, dtype=torch.int32, device=device)  # [B, V]
    max_len = max(token_ids.shape[1], 1)
    _token_state_kernel[(batch, triton.cdiv(max_len, _BLOCK_TOKENS))](
        state, vocab, token_ids, token_ids.stride(0), prompt_lens, seq_lens,
        repetition, presence, frequency, banned_ids, banned_ids.stride(0), banned_ids.shape[1],
        BLOCK=_BLOCK_TOKENS, BLOCK_IDS=_BLOCK_IDS, num_warps=4,
    )
    _apply_kernel[(batch, triton.cdiv(vocab, _BLOCK_VOCAB))](
        logits, logits.stride(0), state, vocab, repetition, presence, frequency,
        BLOCK=_BLOCK_VOCAB, num_warps=4,
    )
    if bias_ids is not None and bias_ids.shape[1] > 0:
        bias_ids = bias_ids.contiguous()
        bias_values = bias_values.to(device=device, dtype=torch.float32).contiguous()
        _bias_kernel[(batch,)](
            logits, logits.stride(0), vocab, bias_ids, bias_values,
            bias_ids.stride(0), bias_values.stride(0), bias_ids.shape[1],
            BLOCK_IDS=_BLOCK_IDS, num_warps=4,
        )
    return logits


def _scatter_rows(ids: torch.Tensor, valid: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """Sum `values` into [B, vocab] at `ids` where `valid` (others go to a dropped column)."""
    index = torch.where(valid & (ids >= 0) & (ids < vocab), ids, vocab)
    out = torch.zeros(ids.shape[0], vocab + 1, dtype=values.dtype, device=ids.device)  # [B, V + 1]
    return out.scatter_add_(1, index, values.expand_as(index))[:, :vocab]


def apply_penalties_reference(
    logits, token_ids, prompt_lens, seq_lens, repetition_penalty, presence_penalty,
    frequency_penalty, banned_ids=None, bias_ids=None, bias_values=None,
) -> torch.Tensor:
    """Dense torch version (scatter into [B, V] masks and counts)."""
    rows = {
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
    }
    _check(logits, token_ids, prompt_lens, seq_lens, rows, banned_ids, bias_ids, bias_values)
    vocab = logits.shape[1]
    device = logits.device
    positions = torch.arange(token_ids.shape[1], device=device)[None, :]  # [1, L]
    in_history = positions < seq_lens.to(device)[:, None]  # [B, L]
    in_output = in_history & (positions >= prompt_lens.to(device)[:, None])
    ones = torch.ones((), dtype=torch.float32, device=device)
    seen = _scatter_rows(token_ids, in_history, ones, vocab) > 0  # [B, V]
    count = _scatter_rows(token_ids, in_output, ones, vocab)  # [B, V]

    repetition = repetition_penalty.to(device=device, dtype=torch.float32)[:, None]
    presence = presence_penalty.to(device=device, dtype=torch.float32)[:, None]
    frequency = frequency_penalty.to(device=device, dtype=torch.float32)[:, None]
    x = logits.to(torch.float32)
    x = torch.where(seen, torch.where(x < 0, x * repetition, x / repetition), x)
    x = torch.where(count > 0, x - (frequency * count + presence), x)
    if bias_ids is not None:
        x = x + _scatter_rows(bias_ids, torch.ones_like(bias_ids, dtype=torch.bool),
                              bias_values.to(device=device, dtype=torch.float32), vocab)
    if banned_ids is not None:
        banned = _scatter_rows(banned_ids, torch.ones_like(banned_ids, dtype=torch.bool), ones, vocab) > 0
        x = torch.where(banned, float("-inf"), x)
    logits.copy_(x.to(logits.dtype))
    return logits


def apply_penalties(
    logits: torch.Tensor,  # [B, V], modified in place and returned
    token_ids: torch.Tensor,  # [B, L] int64: prompt then output tokens, padded with -1
    prompt_lens: torch.Tensor,  # [B] how many of a row's tokens are prompt
    seq_lens: torch.Tensor,  # [B] valid length of each row
    repetition_penalty: torch.Tensor,  # [B] float32, 1.0 = off
    presence_penalty: torch.Tensor,  # [B] float32, 0 = off
    frequency_penalty: torch.Tensor,  # [B] float32, 0 = off
    banned_ids: torch.Tensor | None = None,  # [B, K] int64 padded -1: set to -inf
    bias_ids: torch.Tensor | None = None,  # [B, K2] int64 padded -1: logit_bias targets
    bias_values: torch.Tensor | None = None,  # [B, K2] float32
) -> torch.Tensor:
    """Repetition -> presence/frequency -> logit bias -> bans, in place."""
    args = (logits, token_ids, prompt_lens, seq_lens, repetition_penalty, presence_penalty,
            frequency_penalty, banned_ids, bias_ids, bias_values)
    if logits.is_cuda:
        return apply_penalties_triton(*args)
    return apply_penalties_reference(*args)
