"""OpenAI request fields -> SamplingParams (HF GenerationConfig names).

API requests follow OpenAI's defaults, not the model's generation_config: temperature 1.0
(sampling), top_p 1.0, no top-k, no repetition penalty, length up to the context. Only the
model's EOS and pad tokens come from its generation_config.
"""

from __future__ import annotations

import re
from typing import Any

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.structured_output import check_spec
from tokenmill.engine.structured_output_params import StructuredOutputsParams
from tokenmill.serve.errors import APIError
from tokenmill.serve.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields

# SamplingParams field -> the request field a client sets (for error messages).
_REQUEST_NAMES = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "min_new_tokens": "min_tokens",
}
# Extras passed through under the same name when set.
_PASSTHROUGH = (
    "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "length_penalty",
    "early_stopping", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
)


def to_sampling_params(request: _SamplingFields, *, defaults: SamplingParams, vocab_size: int) -> SamplingParams:
    """Build the engine's params for a completions or chat request; APIError(400) when invalid."""
    _check_extensions(request)
    num_beams = request.num_beams or 1
    if request.do_sample is not None:
        do_sample = request.do_sample
    elif request.temperature is None:
        do_sample = num_beams == 1  # OpenAI samples by default; beam search is deterministic by default
    else:
        do_sample = request.temperature > 0
    temperature = request.temperature if request.temperature is not None else 1.0
    if not do_sample and temperature == 0:
        temperature = 1.0  # greedy: the value is unused

    kwargs: dict[str, Any] = {
        "eos_token_id": defaults.eos_token_id,
        "pad_token_id": defaults.pad_token_id,
        "max_new_tokens": _max_tokens(request),
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "top_k": min(request.top_k, vocab_size) if request.top_k is not None else 0,
        "num_beams": num_beams,
        "num_return_sequences": request.n,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stop": _stop(request.stop),
        "seed": request.seed,
        "logprobs": _logprobs(request),
        "min_new_tokens": request.min_tokens or 0,
        "prompt_logprobs": _prompt_logprobs(request),
        "structured_outputs": structured_outputs_of(request),
    }
    for name in _PASSTHROUGH:
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(_check_token_ids(request.stop_token_ids, "stop_token_ids", vocab_size))
    if request.logit_bias:
        kwargs["logit_bias"] = _logit_bias(request.logit_bias, vocab_size)
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        param = _param_of(str(exc))
        message = re.sub(r"^SamplingParams\.\w+=", f"{param}=", str(exc)) if param else str(exc)
        raise APIError(400, f"Invalid value for '{param}': {message}" if param else message, param=param) from exc


def _max_tokens(request: _SamplingFields) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    if request.max_tokens == 0:
        return 1  # echo with max_tokens 0: the prompt is scored; the one token drawn is not returned
    return request.max_tokens


def is_prompt_only(request: _SamplingFields) -> bool:
    """`max_tokens: 0` with `echo`: return the prompt (and its scoring), generate nothing (as vLLM does)."""
    return isinstance(request, CompletionRequest) and request.echo and request.max_tokens == 0


def _bad(field: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for '{field}': {message}", param=field)


def _check_extensions(request: _SamplingFields) -> None:
    """vLLM extensions whose combinations are not allowed (serve/extensions.py lists them)."""
    if request.priority != 0:
        raise _bad("priority", f"{request.priority} needs priority scheduling, which this server does not have; "
                               "allowed 0.")
    if request.max_tokens == 0 and not is_prompt_only(request):
        raise _bad("max_tokens", "0 is allowed only on /v1/completions with echo=true (prompt scoring); "
                                 "allowed an integer >= 1.")
    if request.prompt_logprobs is not None and request.stream:
        raise _bad("prompt_logprobs", "prompt log-probabilities are not available when stream=true.")
    if (request.stream_options is not None and request.stream_options.continuous_usage_stats
            and not request.stream_options.include_usage):
        raise _bad("stream_options.continuous_usage_stats", "needs stream_options.include_usage=true.")
    if isinstance(request, ChatCompletionRequest) and request.continue_final_message:
        if request.add_generation_prompt:
            raise _bad("continue_final_message", "cannot be combined with add_generation_prompt=true.")
        if request.messages[-1].role != "assistant":
            raise _bad("continue_final_message", "the last message must be the assistant's to continue.")


def _prompt_logprobs(request: _SamplingFields) -> int | None:
    k = request.prompt_logprobs
    if isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None:
        k = max(k or 0, request.logprobs)  # echo + logprobs: the prompt's tokens lead the logprobs
    return k


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(request: _SamplingFields) -> StructuredOutputsParams | None:
    """The one constraint among response_format, structured_outputs and guided_*; 400 when several or invalid."""
    found: dict[str, dict] = {}
    rf = request.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found["response_format"] = {"json_object": True}
        elif rf.json_schema is None or rf.json_schema.schema_ is None:
            raise _bad("response_format", "type 'json_schema' needs json_schema.schema.")
        else:
            found["response_format"] = {"json": rf.json_schema.schema_}
    if request.structured_outputs is not None:
        so = request.structured_outputs
        found["structured_outputs"] = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                                       "grammar": so.grammar, "json_object": so.json_object}
    for name, kind in _GUIDED.items():
        if getattr(request, name) is not None:
            found[name] = {kind: getattr(request, name)}
    if not found:
        return None
    if len(found) > 1:
        names = sorted(found)
        raise _bad(names[1], f"only one structured-output constraint per request; got {names}.")
    field, fields = next(iter(found.items()))
    try:
        spec = StructuredOutputsParams(**fields)
        check_spec(spec)
    except ValueError as exc:
        raise _bad(field, str(exc)) from exc
    if request.num_beams is not None and request.num_beams > 1:
        raise _bad("num_beams", "structured outputs work with sampling and greedy decoding, not beam search; "
                                "allowed 1.")
    return spec


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stops):
        raise APIError(400, "Invalid value for 'stop': stop strings must be non-empty.", param="stop")
    return stops


def _logprobs(request: _SamplingFields) -> int | None:
    if isinstance(request, CompletionRequest):
        return request.logprobs
    assert isinstance(request, ChatCompletionRequest)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "Invalid value for 'top_logprobs': it needs 'logprobs' set to true.", param="top_logprobs")
    if not request.logprobs:
        return None
    return request.top_logprobs or 0


def _check_token_ids(ids: list[int], field: str, vocab_size: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"Invalid value for '{field}': token ids {bad[:5]} are outside [0, {vocab_size}).",
                       param=field)
    return ids


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\d+", key) or not int(key) < vocab_size:
            raise APIError(400, f"Invalid value for 'logit_bias': key {key!r} is not a token id in [0, {vocab_size}).",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"Invalid value for 'logit_bias': bias {value} for token {key} is outside "
                                "[-100, 100].", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _param_of(message: str) -> str | None:
    match = re.match(r"SamplingParams\.(\w+)=", message)
    if not match:
        return None
    return _REQUEST_NAMES.get(match.group(1), match.group(1))
