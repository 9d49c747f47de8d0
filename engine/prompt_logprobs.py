"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`), computed inside the continuous batch.

The runner keeps the logits of one row per sampling sequence (`logits_to_keep`). A request that asks
for prompt log-probabilities also needs the logits of its prompt positions: position p scores prompt
token p + 1. Two functions hook this into a step, both over the same plan (`_plan`), so they agree:

- `prompt_logits_indices(batch)`: the flat token indices (into the step's tokens) of those positions.
  The runner appends them AFTER the sampled rows, so rows `[0, num_sampled)` keep their meaning and
  the sampler and beam search never see the extra rows.
- `take_prompt_logprobs(batch, logits)`: turns the extra rows into the requests' prompt log-probs.
  It runs at the start of the step update, before `num_computed_tokens` moves.

Only the requests that ask pay for these rows. Chunked prefill works because each chunk scores the
positions it runs; a preempted request that recomputes its prompt skips the positions it already
scored. Prefix-cache hits: a request with prompt_logprobs does not take cached blocks (its prompt is
computed in full, so every position has logits); its own blocks still enter the cache for others.
Values are the raw model distribution: `log_softmax(logits)` at each position, no processors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import PromptLogprobs
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import SequenceGroup


@dataclass
class _Span:
    group: SequenceGroup
    flat_start: int  # flat index of position `first` in the step's tokens
    first: int  # first position scored in this step
    count: int  # positions scored


def wants_prompt_logprobs(group: SequenceGroup) -> bool:
    return group.params.prompt_logprobs is not None


def _plan(batch: ScheduledBatch) -> list[_Span]:
    spans: list[_Span] = []
    owner = {g.seqs[0].seq_id: g for g in batch.groups if wants_prompt_logprobs(g) and g.seqs}
    if not owner:  # the common step: nobody asked, no walk over the batch's sequences
        return spans
    flat = 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        group = owner.get(seq.seq_id)
        if group is not None and group.prompt_logprobs is not None:
            start = seq.num_computed_tokens
            first = max(start, group.prompt_logprobs.num_scored)
            stop = min(start + num_new, group.num_prompt_tokens - 1)
            if stop > first:
                spans.append(_Span(group, flat + first - start, first, stop - first))
        flat += num_new
    return spans


def prompt_logits_indices(batch: ScheduledBatch) -> list[int]:
    """Flat token indices whose logits the runner keeps after the sampled rows (empty: nobody asked)."""
    return [s.flat_start + i for s in _plan(batch) for i in range(s.count)]


def finished_prompt_logprobs(group: SequenceGroup) -> PromptLogprobs | None:
    """The request's prompt scores once every prompt token has one (None before, or if not asked)."""
    scores = group.prompt_logprobs
    if scores is None or scores.num_scored < group.num_prompt_tokens - 1:
        return None
    return scores


def num_sampled_rows(batch: ScheduledBatch) -> int:
    return sum(1 for i in range(len(batch.seqs)) if batch.samples(i))


@torch.inference_mode()
def take_prompt_logprobs(batch: ScheduledBatch, logits: torch.Tensor) -> None:
    """Append this step's prompt scores to each asking request. logits: [num_sampled + num_extra, vocab]."""
    spans = _plan(batch)
    if not spans:
        return
    row = num_sampled_rows(batch)
    for span in spans:
        group, scores = span.group, span.group.prompt_logprobs
        assert scores is not None
        dist = logits[row : row + span.count].float().log_softmax(-1)  # [count, vocab]
        row += span.count
        targets = group.prompt_token_ids[span.first + 1 : span.first + 1 + span.count]
        target = torch.tensor(targets, dtype=torch.int64, device=dist.device)
        chosen = dist.gather(1, target[:, None])  # [count, 1]
        ranks = (dist > chosen).sum(-1) + 1  # [count]
        k = group.params.prompt_logprobs
        top_vals, top_ids = dist.topk(max(k, 1), dim=-1)  # [count, max(k, 1)]
        chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
        top_vals_l, top_ids_l = top_vals[:, :k].tolist(), top_ids[:, :k].tolist()
        for j, tok in enumerate(targets):
            entry = {tok: chosen_l[j]}
            for t, v in zip(top_ids_l[j], top_vals_l[j]):
                entry.setdefault(t, v)
            scores.logprobs.append(entry)
            scores.ranks.append(ranks_l[j])
