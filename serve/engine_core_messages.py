"""What travels between the API side and the engine core: msgpack messages over ZMQ.

API side -> core (DEALER -> ROUTER), one msgpack list per message:
    ["hello"]                                   register; answered with ["welcome", pickled info]
    ["add", request_id, prompt_token_ids, params]  params: the SamplingParams fields that differ from the defaults
    ["abort", [request_id, ...]]
Core -> API side, once per engine step (and after commands that change the engine's state):
    ["step", outputs, accepted_ids, rejected, stats]
        outputs:  [[request_id, finished, error, num_cached_tokens, sequences, prompt_logprobs], ...]
        prompt_logprobs: [logprobs, ranks] of engine.outputs.PromptLogprobs, or None (not asked, or not scored yet)
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
    """The parameters the core runs with: stop strings are matched on the API side (which aborts the
    request at the core on a match), so the core never needs the text."""
    # With the engine's delta outputs this also sets output_kind="delta", detokenize=False.
    # The core never detokenizes: text and stop strings are the API side's.
    return params.replace(stop=(), include_stop_str_in_output=False, detokenize=False)


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
    """The sequences of a (cumulative) engine output as deltas against what was sent before.

    `num_sent` (sequence index -> tokens sent; -1 once its end was sent) is updated. This is the one place that turns the
    engine's cumulative outputs into deltas; with SamplingParams(output_kind="delta") it becomes a
    pass-through of the engine's own deltas.
    """
    sequences = []
    for out in output.outputs:
        start = num_sent.get(out.index, 0)
        if start < 0:
            continue  # finished, and already reported
        if start > len(out.token_ids):  # the sequence was rewritten (beam search reports once, at the end)
            start = 0
        new_ids = out.token_ids[start:]
        new_logprobs = out.logprobs[start:] if out.logprobs is not None else None
        num_sent[out.index] = len(out.token_ids) if out.finish_reason is None else -1
        if not new_ids and out.finish_reason is None:
            continue
        sequences.append([out.index, start, list(new_ids), new_logprobs, out.cumulative_logprob,
                          out.finish_reason, out.stop_reason, out.score])
    return sequences


def pack_prompt_logprobs(scores: PromptLogprobs | None) -> list[Any] | None:
    return None if scores is None else [scores.logprobs, scores.ranks]


def unpack_prompt_logprobs(packed: list[Any] | None) -> PromptLogprobs | None:
    return None if packed is None else PromptLogprobs(logprobs=packed[0], ranks=packed[1])
