"""OpenAI request fields -> SamplingParams (HF GenerationConfig names).

API requests follow OpenAI's defaults, not the model's generation_config: temperature 1.0
(sampling), top_p 1.0, no top-k, no repetition penalty, length up to the context. Only the
model's EOS and pad tokens come from its generation_config.
"""

from __future__ import annotations

import re
from typing import Any

from tokenmill.engine.sampling_params import SamplingParams
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
    return request.max_tokens


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
