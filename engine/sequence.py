"""Sequences and the requests (groups) they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tokenmill.engine.outputs import PromptLogprobs
from tokenmill.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tokenmill.engine.beam_search import BeamSearch
    from tokenmill.engine.detokenizer import IncrementalDetokenizer
    from tokenmill.engine.sampler import SampleRow

# Stands for a sampled token that is not applied yet (overlapped steps); never a real token id.
PLACEHOLDER_TOKEN_ID = -1


@dataclass(eq=False)  # compared by identity: a sequence is one stream, whatever it holds
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
    group: SequenceGroup | None = None  # the request it generates for
    logits_row: int = -1  # its row of the step's logits, while an update runs
    # The sampler's row for this sequence, built at its first draw and reused: the row's history is
    # this sequence's own token_ids list, so only the logits index and the Philox offset change per step.
    sample_row: SampleRow | None = None
    # Overlapped steps: the sampled-id tensor holding this sequence's pending token, and its row there.
    pending_ids: torch.Tensor | None = None
    pending_row: int = -1
    num_sent_tokens: int = 0  # output tokens handed out in "delta" outputs
    finish_sent: bool = False  # its finish reason has been handed out ("delta" outputs)
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
        self.num_cached_tokens_sent = 0  # the count its last full RequestOutput carried
        self.num_seats = max(params.num_beams, params.num_return_sequences)  # its share of max_num_seqs
        self.output_kind = params.output_kind
        # Whether its delta outputs may travel as bare token ids (`TokenDeltas`) while nothing else changes.
        self.token_ids_only = (params.output_kind == "delta" and not params.detokenize and params.logprobs is None
                               and params.prompt_logprobs is None and params.num_return_sequences == 1
                               and not params.use_beam_search)
        self.stop_token_ids = frozenset(eos_token_ids) | frozenset(params.stop_token_ids)  # end it after min tokens
        # One decode of the whole output at its end, for requests whose text nobody reads before then
        # (set by the step updater; None when an incremental detokenizer runs or text is off).
        self.decode_text: Callable[[list[int]], str] | None = None
        self.seqs: list[Sequence] = [self.new_seq(list(prompt_token_ids), index=0)]
        self.finished_seqs: list[Sequence] = []  # samples that finished before their siblings
        self.has_forked = params.num_return_sequences == 1 and not params.use_beam_search
        self.beam_search: BeamSearch | None = None
        self.final_outputs: list[Any] | None = None  # beam hypotheses once done
        self.error: str | None = None
        self.released = False  # taken out of the scheduler (finished or aborted): pending work is void
        self.grammar: Any = None  # structured outputs: a Future of the compiled grammar
        self.prompt_logprobs = PromptLogprobs.start() if params.prompt_logprobs is not None else None

    def new_seq(self, token_ids: list[int], index: int) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids),
            token_ids=token_ids,
            num_prompt_tokens=len(self.prompt_token_ids),
            index=index,
            seed=self.seed,
            group=self,
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
        if not self.finished_seqs and len(self.seqs) == 1:
            return self.seqs
        return sorted(self.seqs + self.finished_seqs, key=lambda s: s.index)
