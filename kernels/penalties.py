"""Logit penalties: repetition (HF), presence and frequency (OpenAI), logit bias, bans.

Order, as in HF's processor list followed by OpenAI's formulas:
repetition -> presence/frequency -> logit bias -> bans.

* repetition (HF RepetitionPenaltyLogitsProcessor, prompt + output): every distinct
  token of the history once: logit < 0 -> logit * p, else logit / p;
* presence / frequency (OpenAI, output tokens only):
  logit -= frequency * count + presence * (count > 0);
* logit bias: logit += bias at each listed id (ids unique within a row);
* bans: listed ids -> -inf.

One kernel, one program per row, touches only the ids listed in the row's history, bans and
biases, never the rest of the vocabulary: the cost follows the history length, not the vocabulary.
It builds a per-id state (output count in the low bits, 'in prompt' and 'banned' flags above, and
the bias sum) in scratch rows cleared only at those ids, then computes every touched id's new
logit from the untouched logits before writing any (repeated ids write the same value).
The engine calls it only for rows that use a penalty, bias or ban (most rows use none).
"""

import torch
import triton
import triton.language as tl

_PROMPT_BIT = 1 << 30
_BAN_BIT = 1 << 29
_BLOCK_IDS = 256


@triton.jit
def _row_ids(token_ids_ptr, stride_tokens, banned_ptr, stride_banned, bias_ids_ptr, stride_bias,
             row, k, n_history, seq_len, num_banned, num_bias, V):
    """The id at position k of the row's touched list: history (when the row has a penalty), then
    bans, then logit-bias ids; -1 where k is past the list or the id is outside the vocabulary."""
    in_history = k < n_history
    is_ban = (k >= seq_len) & (k < seq_len + num_banned)
    is_bias = (k >= seq_len + num_banned) & (k < seq_len + num_banned + num_bias)
    ids = tl.load(token_ids_ptr + row * stride_tokens + k, mask=in_history, other=-1)
    ids = tl.where(is_ban, tl.load(banned_ptr + row * stride_banned + (k - seq_len), mask=is_ban, other=-1), ids)
    bias_k = k - seq_len - num_banned
    ids = tl.where(is_bias, tl.load(bias_ids_ptr + row * stride_bias + bias_k, mask=is_bias, other=-1), ids)
    return tl.where((ids >= 0) & (ids < V), ids, -1).to(tl.int64)


@triton.jit
def _penalties_kernel(
    logits_ptr, stride_logits, state_ptr, bias_sum_ptr, new_ptr, stride_new, V,
    token_ids_ptr, stride_tokens, prompt_lens_ptr, seq_lens_ptr,
    repetition_ptr, presence_ptr, frequency_ptr,
    banned_ptr, stride_banned, num_banned, bias_ids_ptr, bias_values_ptr, stride_bias, num_bias,
    BLOCK: tl.constexpr,
):
    """One program per row; it touches only the ids in its history, bans and biases, never the
    rest of the vocabulary. The scratch `state` / `bias_sum` rows ([B, V], uninitialised) are
    cleared at those ids only. Four short sweeps over the touched list, with a barrier between:
    clear -> count (atomics: output count, 'in prompt' and 'banned' bits, bias sum) -> compute
    every touched id's new logit from the untouched logits -> write. Repeated ids write the same
    value, so the order of the writes does not matter."""
    row = tl.program_id(0).to(tl.int64)
    prompt_len = tl.load(prompt_lens_ptr + row).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    repetition = tl.load(repetition_ptr + row).to(tl.float32)
    presence = tl.load(presence_ptr + row).to(tl.float32)
    frequency = tl.load(frequency_ptr + row).to(tl.float32)
    active = (repetition != 1.0) | (presence != 0.0) | (frequency != 0.0)
    n_history = tl.where(active, seq_len, 0)  # rows with bans / biases only never read their history
    length = seq_len + num_banned + num_bias
    state_row = state_ptr + row * V
    bias_row = bias_sum_ptr + row * V
    logits_row = logits_ptr + row * stride_logits
    new_row = new_ptr + row * stride_new

    for start in range(0, length, BLOCK):  # clear
        k = start + tl.arange(0, BLOCK)
        ids = _row_ids(token_ids_ptr, stride_tokens, banned_ptr, stride_banned, bias_ids_ptr, stride_bias,
                       row, k, n_history, seq_len, num_banned, num_bias, V)
        tl.store(state_row + ids, 0, mask=ids >= 0)
        tl.store(bias_row + ids, 0.0, mask=ids >= 0)
    tl.debug_barrier()
    for start in range(0, length, BLOCK):  # count
        k = start + tl.arange(0, BLOCK)
        ids = _row_ids(token_ids_ptr, stride_tokens, banned_ptr, stride_banned, bias_ids_ptr, stride_bias,
                       row, k, n_history, seq_len, num_banned, num_bias, V)
        ok = ids >= 0
        is_history = k < n_history
        tl.atomic_or(state_row + ids, 1 << 30, mask=ok & is_history & (k < prompt_len))
        tl.atomic_add(state_row + ids, 1, mask=ok & is_history & (k >= prompt_len))
        tl.atomic_or(state_row + ids, 1 << 29, mask=ok & (k >= seq_len) & (k < seq_len + num_banned))
        is_bias = ok & (k >= seq_len + num_banned)
        values = tl.load(bias_values_ptr + row * stride_bias + (k - seq_len - num_banned), mask=is_bias, other=0.0)
        tl.atomic_add(bias_row + ids, values.to(tl.float32), mask=is_bias)
    tl.debug_barrier()
    for start in range(0, length, BLOCK):  # new logits, from the untouched ones
        k = start + tl.arange(0, BLOCK)
        ids = _row_ids(token_ids_ptr, stride_tokens, banned_ptr, stride_banned, bias_ids_ptr, stride_bias,
                       row, k, n_history, seq_len, num_banned, num_bias, V)
        ok = ids >= 0
        x = tl.load(logits_row + ids, mask=ok, other=0.0).to(tl.float32)
        state = tl.load(state_row + ids, mask=ok, other=0)
        count = state & ((1 << 29) - 1)
        seen = ((state & (1 << 30)) != 0) | (count > 0)
        x = tl.where(seen, tl.where(x < 0, x * repetition, tl.math.div_rn(x, repetition)), x)  # IEEE division, as torch's
        x = tl.where(count > 0, x - (frequency * count.to(tl.float32) + presence), x)
        x = tl.where((state & (1 << 29)) != 0, float("-inf"), x)
        x = x + tl.load(bias_row + ids, mask=ok, other=0.0)
        tl.store(new_row + k, x, mask=ok)
    tl.debug_barrier()
    for start in range(0, length, BLOCK):  # write
        k = start + tl.arange(0, BLOCK)
        ids = _row_ids(token_ids_ptr, stride_tokens, banned_ptr, stride_banned, bias_ids_ptr, stride_bias,
                       row, k, n_history, seq_len, num_banned, num_bias, V)
        ok = ids >= 0
        x = tl.load(new_row + k, mask=ok, other=0.0)
        tl.store(logits_row + ids, x.to(logits_ptr.dtype.element_ty), mask=ok)


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
    seq_lens = seq_lens.to(device).contiguous()
    prompt_lens = prompt_lens.to(device).contiguous()
    if banned_ids is None:
        banned_ids = torch.full((batch, 1), -1, dtype=torch.int64, device=device)  # [B, 1]
    if bias_ids is None:
        bias_ids = torch.full((batch, 1), -1, dtype=torch.int64, device=device)  # [B, 1]
        bias_values = torch.zeros((batch, 1), dtype=torch.float32, device=device)
    banned_ids = banned_ids.contiguous()
    bias_ids = bias_ids.contiguous()
    bias_values = bias_values.to(device=device, dtype=torch.float32).contiguous()
    # Scratch, never cleared as a whole: the kernel clears the ids it touches.
    state = torch.empty(batch, vocab, dtype=torch.int32, device=device)  # [B, V]
    bias_sum = torch.empty(batch, vocab, dtype=torch.float32, device=device)  # [B, V]
    width = token_ids.shape[1] + banned_ids.shape[1] + bias_ids.shape[1]
    new_values = torch.empty(batch, width, dtype=torch.float32, device=device)  # [B, L + K + K2]
    _penalties_kernel[(batch,)](
        logits, logits.stride(0), state, bias_sum, new_values, new_values.stride(0), vocab,
        token_ids, token_ids.stride(0), prompt_lens, seq_lens, repetition, presence, frequency,
        banned_ids, banned_ids.stride(0), banned_ids.shape[1],
        bias_ids, bias_values, bias_ids.stride(0), bias_ids.shape[1],
        BLOCK=_BLOCK_IDS, num_warps=4,
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
