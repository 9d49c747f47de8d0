"""Engine outputs -> OpenAI choices, log-probabilities, usage and streaming deltas."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from tokenmill.serve.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
    Usage,
)


class TokenText:
    """Token id -> the text it stands for (cached per request); `token_id:N` with return_tokens_as_token_ids."""

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._as_ids = as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._as_ids:
                text = f"token_id:{token_id}"
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def plain(self, token_id: int) -> str:
        """The token's text even with return_tokens_as_token_ids (for decoded_token)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def _ranked(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(out: CompletionOutput, start: int, stop: int, k: int, token_text: TokenText,
                        text_offset: int) -> CompletionLogprobs:
    """Legacy completions log-probabilities for generated tokens [start, stop)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    entries = out.logprobs or []
    offset = text_offset
    for i in range(start, stop):
        token_id = out.token_ids[i]
        entry = entries[i] if i < len(entries) else {}
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(entry.get(token_id))
        alternatives = {token_text(t): lp for t, lp in _ranked(entry, k)} if k else {}
        if token_id in entry:
            alternatives.setdefault(text, entry[token_id])
        top.append(alternatives or None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


def echo_logprobs(prompt_ids: list[int], scores: PromptLogprobs | None, k: int, token_text: TokenText
                  ) -> CompletionLogprobs:
    """The echoed prompt's part of legacy completions log-probabilities: the first token's logprob is null."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    entries = scores.logprobs if scores is not None else [None] * len(prompt_ids)
    for token_id, entry in zip(prompt_ids, entries):
        text = token_text(token_id)
        tokens.append(text)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(entry[token_id])
            alternatives = {token_text(t): lp for t, lp in _ranked(entry, k)} if k else {}
            alternatives.setdefault(text, entry[token_id])
            top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


def join_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def vllm_prompt_logprobs(prompt_ids: list[int], scores: PromptLogprobs | None, token_text: TokenText
                         ) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, rank, decoded_token}}, first null."""
    if scores is None:
        return None
    out: list[dict[str, PromptLogprob] | None] = []
    for token_id, entry, rank in zip(prompt_ids, scores.logprobs, scores.ranks):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
        position = {t: i + 1 for i, (t, _) in enumerate((t, v) for t, v in ranked if t != token_id)}
        item = {str(token_id): PromptLogprob(logprob=entry[token_id], rank=rank, decoded_token=token_text(token_id))}
        for t, v in ranked:
            if t != token_id:
                # alternatives ranked by value; the prompt token above them shifts them down one
                shift = 1 if rank is not None and rank <= position[t] else 0
                item[str(t)] = PromptLogprob(logprob=v, rank=position[t] + shift, decoded_token=token_text(t))
        out.append(item)
    return out


def prompt_only(output: RequestOutput) -> RequestOutput:
    """`max_tokens: 0` with echo: the output with its one drawn token taken away (text, ids, logprobs)."""
    outputs = [dataclasses.replace(o, text="", token_ids=[], logprobs=[] if o.logprobs is not None else None,
                                   cumulative_logprob=0.0,
                                   finish_reason=("length" if (o.finished or output.finished) else None),
                                   stop_reason=None)
               for o in output.outputs]
    return dataclasses.replace(output, outputs=outputs)


def chat_logprobs(out: CompletionOutput, start: int, stop: int, k: int, token_text: TokenText) -> ChatLogprobs:
    """Chat log-probabilities for generated tokens [start, stop)."""
    content = []
    entries = out.logprobs or []
    for i in range(start, stop):
        token_id = out.token_ids[i]
        entry = entries[i] if i < len(entries) else {}
        text = token_text(token_id)
        top = [
            TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_text(t).encode()))
            for t, lp in _ranked(entry, k)
        ]
        logprob = entry.get(token_id, float("-inf"))
        content.append(TokenLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


def usage_of(finals: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in finals)
    completion_tokens = sum(len(o.token_ids) for r in finals for o in r.outputs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@dataclass
class ChoiceProgress:
    """What of one choice has been streamed so far."""

    num_chars: int = 0
    num_tokens: int = 0
    finished: bool = False


@dataclass
class Delta:
    index: int
    text: str
    output: CompletionOutput
    token_start: int
    token_stop: int
    finish_reason: str | None


@dataclass
class StreamTracker:
    """Turns cumulative outputs into per-choice deltas; choice index = prompt_index * n + output.index."""

    n: int
    progress: dict[int, ChoiceProgress] = field(default_factory=dict)

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[Delta]:
        deltas = []
        for out in output.outputs:
            index = prompt_index * self.n + out.index
            state = self.progress.setdefault(index, ChoiceProgress())
            if state.finished:
                continue
            text = out.text[state.num_chars:]
            num_tokens = len(out.token_ids)
            finish = out.finish_reason if (out.finished or output.finished) else None
            if output.finished and finish is None:
                finish = "stop"
            if not text and num_tokens == state.num_tokens and finish is None:
                continue
            deltas.append(Delta(index, text, out, state.num_tokens, num_tokens, finish))
            state.num_chars = len(out.text)
            state.num_tokens = num_tokens
            state.finished = finish is not None
        return deltas
