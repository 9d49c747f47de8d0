"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a sample or a beam)."""

    index: int
    text: str
    token_ids: list[int]  # generated tokens only
    cumulative_logprob: float | None
    # Per generated token: {token_id: logprob} for the chosen token and the top-k alternatives,
    # taken from the processed distribution (see README, "Log-probabilities").
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token that ended it
    score: float | None = None  # beam search: cumulative logprob with the length penalty applied

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at its end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed inside the engine
    metrics: dict[str, float] = field(default_factory=dict)
