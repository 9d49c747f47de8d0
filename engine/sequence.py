"""Sequences and the requests (groups) they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from tokenmill.engine.outputs import PromptLogprobs
from tokenmill.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.beam_search import BeamSearch
    from tokenmill.engine.detokenizer import IncrementalDetokenizer


@dataclass
class Sequence:
    """One token stream with its own KV blocks: a prompt being prefilled, a sample, or a beam.

    `num_computed_tokens` moves towards `len(token_ids)`: a prefill chunk, a decode step, or a
    recompute after preemption are all the same thing (vLLM v1's scheduling model).
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    index: int = 0  # position among the request's outputs
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Full blocks whose hash is registered with the block manager (prefix caching).
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: IncrementalDetokenizer | None = None
    streamed_text: str = ""  # text handed out so far (a tail that may become a stop string is held back)
    seed: int = 0
    grammar_matcher: Any = None  # structured outputs: this sequence's xgrammar GrammarMatcher

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class SequenceGroup:
    """A request: its prompt, parameters and the live sequences generating for it.

    A sampling request with num_return_sequences=n prefills one sequence and forks n children
    at its first token; a beam request keeps num_beams live sequences that fork as beams move.
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_ids: tuple[int, ...],
        max_new_tokens: int,
        min_new_tokens: int,
        seed: int,
        seq_ids: Iterator[int],
    ) -> None:
        self._seq_ids = seq_ids  # the engine's id counter
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.seed = seed
        self.num_cached_tokens = 0
        self.seqs: list[Sequence] = [self.new_seq(list(prompt_token_ids), index=0)]
        self.finished_seqs: list[Sequence] = []  # samples that finished before their siblings
        self.has_forked = params.num_return_sequences == 1 and not params.use_beam_search
        self.beam_search: BeamSearch | None = None
        self.final_outputs: list[Any] | None = None  # beam hypotheses once done
        self.error: str | None = None
        self.grammar: Any = None  # structured outputs: a Future of the compiled grammar
        self.prompt_logprobs = PromptLogprobs.start() if params.prompt_logprobs is not None else None

    def new_seq(self, token_ids: list[int], index: int) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids),
            token_ids=token_ids,
            num_prompt_tokens=len(self.prompt_token_ids),
            index=index,
            seed=self.seed,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return not self.seqs

    @property
    def num_uncomputed_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.seqs)

    def all_seqs(self) -> list[Sequence]:
        return sorted(self.seqs + self.finished_seqs, key=lambda s: s.index)
