"""What travels between the API side and the engine core: msgpack messages over ZMQ.

API side -> core (DEALER -> ROUTER), one msgpack list per message:
    ["hello"]                                   register; answered with ["welcome", pickled info]
    ["add", request_id, prompt_token_ids, params]  params: the SamplingParams fields that differ from the defaults
    ["abort", [request_id, ...]]
Core -> API side, once per engine step (and after commands that change the engine's state):
    ["step", outputs, accepted_ids, rejected, stats, deltas]
        outputs:  [[request_id, finished, error, num_cached_tokens, sequences, prompt_logprobs], ...]
        deltas:   [request_ids, new_token_ids, cumulative_logprobs], columns (engine.outputs.TokenDeltas):
                  requests with one running sequence that need only their new ids this step (never
                  their first or last output), each as a sequence [0, start, ids, None, cumulative,
                  None, None, None] of an unfinished output with no change in cached tokens
                  (a client also reads a step message without it, from an older core)
        prompt_logprobs: [logprobs, ranks] of engine.outputs.PromptLogprobs, sent once, when the prompt is scored (else None)
        sequence: [index, start, new_token_ids, new_logprobs, cumulative_logprob, finish_reason, stop_reason, score]
                  (`start`: how many of the sequence's tokens the API side keeps before appending the new ones)
        rejected: [[request_id, kind, message], ...]   kind: "value" | "queue_full" | "internal"
    ["dead", reason]                            the core's step loop stopped; every request of it is lost
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from tokenmill.engine.outputs import PromptLogprobs, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

_DEFAULTS = SamplingParams()


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes) -> list[Any]:
    # Log-probabilities are maps keyed by token id (int keys).
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def core_params(params: SamplingParams) -> SamplingParams:
    """The parameters the core runs with: only what is new each step (output_kind="delta"), and no
    text. Detokenization and stop strings are the API side's (a stop-string match aborts the
    request at the core)."""
    return params.replace(stop=(), include_stop_str_in_output=False, detokenize=False, output_kind="delta")


def encode_params(params: SamplingParams) -> dict[str, Any]:
    """The fields that differ from the defaults (tuples travel as lists; SamplingParams turns them back)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(SamplingParams):
        value = getattr(params, field.name)
        if value != getattr(_DEFAULTS, field.name):
            # Nested parameter objects (structured_outputs) travel as dicts; SamplingParams rebuilds them.
            out[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def decode_params(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)


def take_new_tokens(output: RequestOutput, num_sent: dict[int, int]) -> list[list[Any]]:
    """The sequences of a delta engine output (core_params), each with its `start`.

    `num_sent` (sequence index -> tokens sent so far) is updated. Beam search reports each
    hypothesis once, whole, at the end: its start is 0.
    """
    sequences = []
    for out in output.outputs:
        start = num_sent.get(out.index, 0)
        num_sent[out.index] = start + len(out.token_ids)
        sequences.append([out.index, start, list(out.token_ids), out.logprobs, out.cumulative_logprob,
                          out.finish_reason, out.stop_reason, out.score])
    return sequences


def pack_prompt_logprobs(scores: PromptLogprobs | None) -> list[Any] | None:
    return None if scores is None else [scores.logprobs, scores.ranks]


def unpack_prompt_logprobs(packed: list[Any] | None) -> PromptLogprobs | None:
    return None if packed is None else PromptLogprobs(logprobs=packed[0], ranks=packed[1])
