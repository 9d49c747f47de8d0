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
class PromptLogprobs:
    """A request's prompt scores so far. Entry 0 (the first prompt token) is None, as in vLLM."""

    # Per prompt token: {token_id: logprob} for the prompt token and the top-k of its position.
    logprobs: list[dict[int, float] | None]
    ranks: list[int | None]  # the prompt token's 1-based rank in its position's distribution

    @classmethod
    def start(cls) -> "PromptLogprobs":
        return cls([None], [None])

    @property
    def num_scored(self) -> int:
        """Prompt tokens scored so far (position p scores token p + 1)."""
        return len(self.logprobs) - 1


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
    # SamplingParams.prompt_logprobs: set once the whole prompt is scored (then in every later output).
    prompt_logprobs: PromptLogprobs | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TokenDeltas:
    """One step's new token ids of the requests that need nothing else, in columns: one object per
    step instead of a RequestOutput per request (~4 us each, ~1 ms a step at 256 running). Only
    from an engine with `compact_deltas` on (the serving engine core's): a request is here once it
    has had a full output, while it runs one sequence with output_kind="delta", no text, no
    log-probs and no prompt scores, and its cached-token count is the one its last full output
    carried; its first and last outputs are full RequestOutputs."""

    request_ids: list[str]
    token_ids: list[list[int]]  # per request: its new tokens
    cumulative_logprobs: list[float]  # per request: its sequence's, after the new tokens
    finished = False  # never: a request that ends gets a RequestOutput
