"""API side of a request: the core's new token ids -> text, stop strings, cumulative RequestOutputs.

The core sends token ids only; each sequence is detokenized here with the engine's own
IncrementalDetokenizer, so texts are what the in-process engine gives. A stop-string match ends
the sequence here (text trimmed as the engine trims it); once every sequence has ended, the
request is done and the core is told to abort it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams


@dataclass
class _Sequence:
    detokenizer: IncrementalDetokenizer | None  # None for beam hypotheses (decoded whole, at the end)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float | None = None


class RequestState:
    """One request as the API side sees it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any, stream_interval: int = 1) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.sequences: dict[int, _Sequence] = {}
        self.finished = False
        self.error: str | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs: PromptLogprobs | None = None  # prompt_logprobs requests, once the prompt is scored
        self._num_tokens_emitted = 0

    def _sequence(self, index: int) -> _Sequence:
        seq = self.sequences.get(index)
        if seq is None:
            p = self.params
            detokenizer = None if p.use_beam_search else IncrementalDetokenizer(
                self.tokenizer, self.prompt_token_ids, skip_special_tokens=p.skip_special_tokens, stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output)
            seq = self.sequences[index] = _Sequence(detokenizer)
        return seq

    def update(self, finished: bool, error: str | None, num_cached_tokens: int, sequences: list[list[Any]]) -> bool:
        """Apply one core output; True when this request has now ended (the core may still run it: a stop string)."""
        self.num_cached_tokens = num_cached_tokens
        self.error = error or self.error
        for index, start, new_ids, new_logprobs, cumulative, finish_reason, stop_reason, score in sequences:
            seq = self._sequence(index)
            if seq.finish_reason is not None and seq.detokenizer is not None:
                continue  # ended here by a stop string; the core ran on
            if seq.detokenizer is None:
                self._replace_beam(seq, start, new_ids, new_logprobs)
            else:
                self._append(seq, new_ids, new_logprobs)
            seq.cumulative_logprob, seq.score = cumulative, score
            if seq.finish_reason is None and finish_reason is not None:
                seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.take_delta(seq.finish_reason is not None or finished)
            elif seq.finish_reason is not None or finished:
                seq.text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=self.params.skip_special_tokens)
        if finished:
            self.finished = True
        elif self.sequences and len(self.sequences) >= self.params.num_return_sequences and all(
                s.finish_reason is not None for s in self.sequences.values()):
            self.finished = True  # every sequence stopped on a stop string
        return self.finished

    def _append(self, seq: _Sequence, new_ids: list[int], new_logprobs: list[Any] | None) -> None:
        for i, token_id in enumerate(new_ids):
            seq.token_ids.append(token_id)
            if new_logprobs is not None:
                seq.logprobs.append(new_logprobs[i])
            stop = seq.detokenizer.append(token_id)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                return

    @staticmethod
    def _replace_beam(seq: _Sequence, start: int, new_ids: list[int], new_logprobs: list[Any] | None) -> None:
        del seq.token_ids[start:]
        seq.token_ids.extend(new_ids)
        if new_logprobs is not None:
            del seq.logprobs[start:]
            seq.logprobs.extend(new_logprobs)

    def num_tokens(self) -> int:
        return max((len(s.token_ids) for s in self.sequences.values()), default=0)

    def should_emit(self) -> bool:
        """With stream_interval k, wake the consumer every k tokens (and at the end), not every step."""
        if self.finished:
            return True
        return self.num_tokens() - self._num_tokens_emitted >= self.stream_interval

    def output(self) -> RequestOutput:
        self._num_tokens_emitted = self.num_tokens()
        logprobs_on = self.params.logprobs is not None
        outputs = [
            CompletionOutput(index=i, text=s.text, token_ids=list(s.token_ids), cumulative_logprob=s.cumulative_logprob,
                             logprobs=list(s.logprobs) if logprobs_on else None,
                             finish_reason=s.finish_reason or ("abort" if self.finished else None),
                             stop_reason=s.stop_reason, score=s.score)
            for i, s in sorted(self.sequences.items())
        ]
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=outputs, finished=self.finished, num_cached_tokens=self.num_cached_tokens,
                             error=self.error, prompt_logprobs=self.prompt_logprobs)
