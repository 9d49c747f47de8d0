"""transformers' logits-processing pipeline, per row, batched through the kernels.

`generate()` builds its processors in a fixed order (`GenerationMixin._get_logits_processor`):

    repetition_penalty -> no_repeat_ngram_size -> bad_words_ids -> min_length / min_new_tokens
    -> (do_sample only) temperature -> top_k -> top_p -> min_p -> typical_p -> epsilon_cutoff -> eta_cutoff

This module applies the same chain to a batch of rows that each carry their own `SamplingParams`:

- `apply_processors` runs the part before the warpers (plus the OpenAI extras `presence_penalty`,
  `frequency_penalty` and `logit_bias`) through `kernels.penalties.apply_penalties` and
  `kernels.ngram.ban_ngrams`. Everything after the repetition penalty either sets a logit to -inf or adds
  a finite bias, and these commute, so one penalties call (repetition -> presence/frequency -> bias -> bans)
  followed by the n-gram ban equals HF's order.
- `apply_warpers` runs the sampling warpers for `do_sample` rows: temperature/top-k/top-p/min-p through
  `kernels.sampling.apply_sampling_filters`, then typical/epsilon/eta in torch, exactly as HF computes them.

Both take float32 logits `[num_rows, vocab]` and `rows`, one `RowInput` per logits row; both may work in
place and return the processed logits (always use the return value). Rows that use nothing cost only a few
attribute reads: the common greedy batch does no tensor work at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tokenmill.engine.device_copy import host_to_device, to_device, to_device_rows
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.token_history import TokenHistory, padded_rows
from tokenmill.kernels.ngram import ban_ngrams
from tokenmill.kernels.penalties import apply_penalties
from tokenmill.kernels.sampling import apply_sampling_filters


@dataclass(frozen=True)
class RowInput:
    """One logits row: the request's parameters and the history the next token follows.

    `eos_token_ids` are the ids HF would hold in `generation_config._eos_token_tensor`: the request's own
    `eos_token_id`, else the model's default; empty when `ignore_eos` (then no min-length EOS ban, and
    bad words equal to an EOS id are not exempted). They are banned while fewer than
    `params.min_tokens_for(num_prompt_tokens)` tokens have been generated.
    """

    params: SamplingParams
    token_ids: Sequence[int]  # the whole history: prompt then generated tokens
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    # The history as int64, kept up to date step by step (the row lives as long as its sequence).
    history: TokenHistory = field(default_factory=TokenHistory, compare=False, repr=False)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row HF warper parameters, in the form `kernels.sampling` takes them (neutral for greedy rows)."""

    temperature: torch.Tensor  # [num_rows] float32, 1.0 = off
    top_k: torch.Tensor  # [num_rows] int32, 0 = off
    top_p: torch.Tensor  # [num_rows] float32, 1.0 = off
    min_p: torch.Tensor  # [num_rows] float32, 0.0 = off


# ---------------------------------------------------------------------------------------------- row queries
def uses_penalties(params: SamplingParams) -> bool:
    """Whether the row needs its token history for repetition/presence/frequency penalties."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def uses_extra_warpers(params: SamplingParams) -> bool:
    """Whether a sampled row needs typical_p / epsilon_cutoff / eta_cutoff, which the fused sampler lacks."""
    return params.do_sample and (params.typical_p < 1.0 or params.epsilon_cutoff > 0.0 or params.eta_cutoff > 0.0)


def banned_token_ids(row: RowInput, vocab_size: int) -> list[int]:
    """Token ids this row may not take next: bad words (HF NoBadWordsLogitsProcessor) and EOS before min length.

    A one-token bad word is always banned (unless it is an EOS id, which HF exempts); a longer word bans its
    last token when the history ends with the rest of it.
    """
    params = row.params
    banned: list[int] = []
    if params.bad_words_ids:
        history = row.token_ids
        eos = set(row.eos_token_ids)
        for word in params.bad_words_ids:
            if len(word) == 1:
                if word[0] not in eos:
                    banned.append(word[0])
                continue
            prefix_len = len(word) - 1
            if prefix_len <= len(history) and tuple(history[len(history) - prefix_len :]) == word[:-1]:
                banned.append(word[-1])
        for token_id in banned:
            if token_id >= vocab_size:
                raise ValueError(
                    f"SamplingParams.bad_words_ids holds token id {token_id}: allowed ids in [0, {vocab_size})"
                )
    if row.eos_token_ids and row.num_generated_tokens < params.min_tokens_for(row.num_prompt_tokens):
        banned.extend(t for t in row.eos_token_ids if t < vocab_size)
    return banned


# ---------------------------------------------------------------------------------------------- tensor helpers
def _take_rows(logits: torch.Tensor, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sub-batch `row_ids` (a view of all rows when it is the whole batch) and its index for write-back."""
    if len(row_ids) == logits.shape[0]:
        return logits, None
    index = to_device(row_ids, torch.long, logits.device)
    return logits.index_select(0, index), index


def _put_rows(logits: torch.Tensor, sub: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return sub
    logits.index_copy_(0, index, sub)
    return logits


def _run_penalties(
    logits: torch.Tensor,
    rows: list[RowInput],
    histories: list[Sequence[int]],
    banned_lists: list[list[int]],
    token_ids: torch.Tensor,
    seq_lens: torch.Tensor,
) -> torch.Tensor:
    """One `apply_penalties` call: repetition -> presence/frequency -> logit_bias -> bans."""
    vocab_size = logits.shape[1]
    device = logits.device
    prompt_lens = to_device(
        [min(r.num_prompt_tokens, len(h)) for r, h in zip(rows, histories)], torch.int32, device
    )  # [num_rows]

    penalties = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    repetition, presence, frequency = to_device_rows(
        [[float(getattr(r.params, name)) for r in rows] for name in penalties], torch.float32, device
    )  # [num_rows] each, one copy

    banned_ids = None
    if any(banned_lists):
        banned_ids = host_to_device(padded_rows(banned_lists), device)  # [num_rows, K]
    bias_ids = bias_values = None
    biases = [r.params.logit_bias or {} for r in rows]
    if any(biases):
        for bias in biases:
            for token_id in bias:
                if token_id >= vocab_size:
                    raise ValueError(
                        f"SamplingParams.logit_bias holds token id {token_id}: allowed ids in [0, {vocab_size})"
                    )
        bias_ids = host_to_device(padded_rows([list(b) for b in biases]), device)  # [num_rows, K2]
        bias_values = host_to_device(padded_rows([list(b.values()) for b in biases], 0.0, np.float32), device)
    return apply_penalties(
        logits,
        token_ids,
        prompt_lens,
        seq_lens,
        repetition,
        presence,
        frequency,
        banned_ids,
        bias_ids,
        bias_values,
    )


# ---------------------------------------------------------------------------------------------- processors
def apply_processors(logits: torch.Tensor, rows: Sequence[RowInput]) -> torch.Tensor:
    """HF's non-warper processors plus presence/frequency penalties and logit_bias, per row.

    logits: [num_rows, vocab] float32 (raw logits, or log-probs in beam search), modified in place.
    Order (equal to HF's): repetition -> presence/frequency -> logit_bias -> bad words / min-length EOS ban
    -> no_repeat_ngram ban.
    """
    num_rows, vocab_size = logits.shape
    if len(rows) != num_rows:
        raise ValueError(f"rows has {len(rows)} entries: allowed exactly one per logits row ({num_rows})")
    penalty_rows: list[int] = []  # rows for apply_penalties
    ngram_rows: list[int] = []  # rows for ban_ngrams
    bans: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        params = row.params
        banned = banned_token_ids(row, vocab_size)
        if banned:
            bans[i] = banned
        if banned or params.logit_bias or uses_penalties(params):
            penalty_rows.append(i)
        if params.no_repeat_ngram_size > 0 and len(row.token_ids) >= params.no_repeat_ngram_size:
            ngram_rows.append(i)
    if not penalty_rows and not ngram_rows:
        return logits

    row_ids = sorted(set(penalty_rows) | set(ngram_rows))
    sub, index = _take_rows(logits, row_ids)
    device = logits.device
    sub_rows = [rows[i] for i in row_ids]
    needs_history = [uses_penalties(r.params) or r.params.no_repeat_ngram_size > 0 for r in sub_rows]
    histories = [r.history.array(r.token_ids) if need else () for r, need in zip(sub_rows, needs_history)]
    token_ids = host_to_device(padded_rows(histories), device)  # [num_sub, max_len]
    seq_lens = to_device([len(h) for h in histories], torch.int32, device)  # [num_sub]

    if penalty_rows:
        banned_lists = [bans.get(i, []) for i in row_ids]
        sub = _run_penalties(sub, sub_rows, histories, banned_lists, token_ids, seq_lens)
    if ngram_rows:
        ngram_size = to_device(
            [r.params.no_repeat_ngram_size for r in sub_rows], torch.int32, device
        )  # [num_sub]; rows with a history shorter than n ban nothing
        sub = ban_ngrams(sub, token_ids, seq_lens, ngram_size)
    return _put_rows(logits, sub, index)


# ---------------------------------------------------------------------------------------------- warpers
def sampling_tensors(rows: Sequence[RowInput], device: torch.device | str) -> SamplingTensors:
    """HF warper parameters per row for `kernels.sampling`; greedy rows get neutral values."""

    sampled = [r.params.do_sample for r in rows]
    temperature, top_p, min_p = to_device_rows(
        (
            [float(r.params.temperature) if s else 1.0 for r, s in zip(rows, sampled)],
            [float(r.params.top_p) if s else 1.0 for r, s in zip(rows, sampled)],
            [float(r.params.min_p or 0.0) if s else 0.0 for r, s in zip(rows, sampled)],
        ),
        torch.float32,
        device,
    )  # one copy for the three float columns
    top_k = to_device([r.params.top_k if s else 0 for r, s in zip(rows, sampled)], torch.int32, device)
    return SamplingTensors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def _keep_top(scores: torch.Tensor, remove: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    # HF epsilon/eta: never remove the `min_tokens_to_keep` highest logits.
    top_k = min(min_tokens_to_keep, scores.shape[-1])
    return remove & (scores < torch.topk(scores, top_k)[0][..., -1, None])


def _typical(scores: torch.Tensor, mass: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    """HF TypicalLogitsWarper with a per-row mass [n, 1]."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted_scores = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted_scores, descending=False)
    sorted_logits = scores.gather(-1, sorted_indices)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative_probs < mass).sum(dim=1)
    last_ind.clamp_(max=sorted_scores.shape[-1] - 1)
    sorted_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    sorted_remove[..., :min_tokens_to_keep] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return scores.masked_fill(remove, -float("inf"))


def _epsilon(scores: torch.Tensor, epsilon: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    """HF EpsilonLogitsWarper with a per-row epsilon [n, 1]."""
    remove = _keep_top(scores, scores.softmax(dim=-1) < epsilon, min_tokens_to_keep)
    return scores.masked_fill(remove, -float("inf"))


def _eta(scores: torch.Tensor, epsilon: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    """HF EtaLogitsWarper with a per-row epsilon [n, 1]."""
    probabilities = scores.softmax(dim=-1)
    entropy = torch.distributions.Categorical(logits=scores).entropy()[..., None]  # [n, 1]
    eta = torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))
    remove = _keep_top(scores, probabilities < eta, min_tokens_to_keep)
    return scores.masked_fill(remove, -float("inf"))


def _apply_extra_warper(
    logits: torch.Tensor, rows: Sequence[RowInput], name: str, off: float, fn, min_tokens_to_keep: int
) -> torch.Tensor:
    row_ids = [i for i, r in enumerate(rows) if float(getattr(r.params, name)) != off]
    if not row_ids:
        return logits
    sub, index = _take_rows(logits, row_ids)
    values = to_device(
        [[float(getattr(rows[i].params, name))] for i in row_ids], torch.float32, logits.device
    )  # [n, 1]
    return _put_rows(logits, fn(sub, values, min_tokens_to_keep), index)


def apply_warpers(logits: torch.Tensor, rows: Sequence[RowInput], min_tokens_to_keep: int = 1) -> torch.Tensor:
    """HF's sampling warpers for the `do_sample` rows (other rows are returned unchanged).

    logits: [num_rows, vocab] float32, already through `apply_processors`. Returns temperature-scaled,
    filtered logits (-inf where removed): temperature -> top_k -> top_p -> min_p -> typical_p ->
    epsilon_cutoff -> eta_cutoff, each with `min_tokens_to_keep` (HF uses len(eos) + 1 in beam sampling).
    """
    num_rows = logits.shape[0]
    if len(rows) != num_rows:
        raise ValueError(f"rows has {len(rows)} entries: allowed exactly one per logits row ({num_rows})")
    row_ids = [i for i, r in enumerate(rows) if r.params.do_sample]
    if not row_ids:
        return logits
    sampled_rows = [rows[i] for i in row_ids]
    sub, index = _take_rows(logits, row_ids)
    t = sampling_tensors(sampled_rows, logits.device)
    sub = apply_sampling_filters(sub, t.temperature, t.top_k, t.top_p, t.min_p, min_tokens_to_keep)
    if any(uses_extra_warpers(r.params) for r in sampled_rows):
        sub = _apply_extra_warper(sub, sampled_rows, "typical_p", 1.0, _typical, min_tokens_to_keep)
        sub = _apply_extra_warper(sub, sampled_rows, "epsilon_cutoff", 0.0, _epsilon, min_tokens_to_keep)
        sub = _apply_extra_warper(sub, sampled_rows, "eta_cutoff", 0.0, _eta, min_tokens_to_keep)
    return _put_rows(logits, sub, index)


__all__ = [
    "RowInput",
    "SamplingTensors",
    "apply_processors",
    "apply_warpers",
    "banned_token_ids",
    "sampling_tensors",
    "uses_extra_warpers",
    "uses_penalties",
]
