"""Per-request generation parameters, named and defaulted as transformers' GenerationConfig."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Union

from tokenmill.engine.structured_output_params import StructuredOutputsParams

EarlyStopping = Union[bool, str]
OUTPUT_KINDS = ("cumulative", "delta", "final")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite real number (NaN and infinities are rejected everywhere)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SamplingParams.{field_name}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request.

    Names and defaults follow `transformers.GenerationConfig`; `stop`, `stop_token_ids`,
    `ignore_eos`, `seed`, `logprobs`, `presence_penalty`, `frequency_penalty`, `logit_bias`
    and `skip_special_tokens` are serving extras.
    """

    # Length.
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + output, as in HF; used when max_new_tokens is None
    min_new_tokens: int = 0
    min_length: int = 0  # prompt + output, as in HF
    # Strategy.
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    # Sampling warpers (only with do_sample).
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    # Logits processors.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    logit_bias: dict[int, float] | None = None
    # Stopping.
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Outputs.
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top-k per prompt position (raw model distribution), vLLM's name
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # What each step's RequestOutput holds (vLLM's RequestOutputKind): "cumulative" everything so far,
    # "delta" only what is new since the last output, "final" one output when the request finishes.
    output_kind: str = "cumulative"
    # False: no text and no stop-string checks in the engine (a front end that detokenizes does both).
    detokenize: bool = True
    # Constrained decoding (vLLM's name): the output follows a JSON schema, regex, choice or grammar.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Normalise list-like inputs into hashable tuples (the object stays frozen), checking their
        # shape first so a wrong type is a ValueError that names the field.
        def setf(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def int_tuple(name: str, value: Any, allowed: str) -> tuple[int, ...]:
            if not isinstance(value, (list, tuple)) or not all(_is_int(t) for t in value):
                raise _bad(name, value, allowed)
            return tuple(value)

        if self.stop is None:
            setf("stop", ())
        elif isinstance(self.stop, str):
            setf("stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            setf("stop", tuple(self.stop))
        else:
            raise _bad("stop", self.stop, "a string, a list of strings, or None")
        setf("stop_token_ids", int_tuple("stop_token_ids", self.stop_token_ids or (), "a list of token ids"))
        if isinstance(self.eos_token_id, (list, tuple)):
            setf("eos_token_id", int_tuple("eos_token_id", self.eos_token_id, "a token id, a list of them, or None"))
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, (list, tuple)) for w in words):
                raise _bad("bad_words_ids", words, "a list of non-empty lists of token ids")
            setf("bad_words_ids", tuple(int_tuple("bad_words_ids", w, "lists of token ids") for w in words))
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict):
                raise _bad("logit_bias", bias, "a mapping of token id to a number in [-100, 100]")
            try:
                setf("logit_bias", {int(k): float(v) for k, v in bias.items()})
            except (TypeError, ValueError):
                raise _bad("logit_bias", bias, "a mapping of token id to a number in [-100, 100]") from None
        if isinstance(self.structured_outputs, dict):
            try:
                setf("structured_outputs", StructuredOutputsParams(**self.structured_outputs))
            except (TypeError, ValueError) as exc:
                raise _bad("structured_outputs", self.structured_outputs,
                           f"exactly one of json/regex/choice/grammar/json_object ({exc})") from None
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        is_int, is_num = _is_int, _is_num
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise _bad("max_new_tokens", self.max_new_tokens, "an integer >= 1 or None")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            raise _bad("max_length", self.max_length, "an integer >= 1 or None")
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise _bad(name, v, "an integer >= 0")
        if not isinstance(self.do_sample, bool):
            raise _bad("do_sample", self.do_sample, "True or False")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise _bad("num_beams", self.num_beams, "an integer >= 1")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise _bad("num_return_sequences", self.num_return_sequences, "an integer >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise _bad(
                "num_return_sequences",
                self.num_return_sequences,
                f"an integer <= num_beams ({self.num_beams}) in beam search",
            )
        if not is_num(self.length_penalty):
            raise _bad("length_penalty", self.length_penalty, "a number")
        if self.early_stopping not in (True, False, "never"):
            raise _bad("early_stopping", self.early_stopping, 'True, False or "never"')
        if not is_num(self.temperature) or self.temperature < 0:
            raise _bad("temperature", self.temperature, "a number >= 0")
        if self.do_sample and self.temperature == 0:
            raise _bad("temperature", self.temperature, "a number > 0 when do_sample=True (use do_sample=False for greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise _bad("top_k", self.top_k, "an integer >= 0 (0 disables top-k)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "a number in (0, 1]")
        if self.min_p is not None and (not is_num(self.min_p) or not 0 <= self.min_p <= 1):
            raise _bad("min_p", self.min_p, "a number in [0, 1] or None")
        if not is_num(self.typical_p) or not 0 < self.typical_p <= 1:
            raise _bad("typical_p", self.typical_p, "a number in (0, 1]")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            v = getattr(self, name)
            if not is_num(v) or not 0 <= v < 1:
                raise _bad(name, v, "a number in [0, 1)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1.0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise _bad(name, v, "a number in [-2, 2]")
        if self.bad_words_ids is not None:
            if any(len(w) == 0 or min(w) < 0 for w in self.bad_words_ids):
                raise _bad("bad_words_ids", self.bad_words_ids, "a list of non-empty lists of token ids >= 0")
        if self.logit_bias is not None:
            for k, v in self.logit_bias.items():
                if k < 0 or not -100 <= v <= 100:
                    raise _bad("logit_bias", {k: v}, "token ids >= 0 mapped to numbers in [-100, 100]")
        eos = self.eos_token_id
        if eos is not None:
            ids = eos if isinstance(eos, tuple) else (eos,)
            if not all(is_int(t) and t >= 0 for t in ids):
                raise _bad("eos_token_id", eos, "a token id >= 0, a list of them, or None")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise _bad("pad_token_id", self.pad_token_id, "a token id >= 0 or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise _bad("stop", self.stop, "non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "True or False")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise _bad("seed", self.seed, "an integer in [0, 2**63) or None")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise _bad("logprobs", self.logprobs, "an integer in [0, 20] or None")
        if self.output_kind not in OUTPUT_KINDS:
            raise _bad("output_kind", self.output_kind, ", ".join(map(repr, OUTPUT_KINDS)))
        if not isinstance(self.detokenize, bool):
            raise _bad("detokenize", self.detokenize, "True or False")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= 20):
            raise _bad("prompt_logprobs", self.prompt_logprobs, "an integer in [0, 20] or None")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:
            raise _bad(
                "num_return_sequences",
                self.num_return_sequences,
                "1 for greedy decoding (set do_sample=True or num_beams >= num_return_sequences)",
            )
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise _bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams or None")
            if self.num_beams > 1:
                raise _bad("num_beams", self.num_beams, "1 with structured_outputs (constrained beam search is not supported)")
        if self.num_beams > 1 and (self.stop or self.presence_penalty or self.frequency_penalty):
            raise _bad("num_beams", self.num_beams, "1 when stop strings or presence/frequency penalties are set")

    # ------------------------------------------------------------------ derived
    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def max_tokens_for(self, num_prompt_tokens: int) -> int | None:
        """How many tokens may be generated after a prompt of this length (None: up to max_model_len)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - num_prompt_tokens
        return None

    def min_tokens_for(self, num_prompt_tokens: int) -> int:
        """How many tokens must be generated before EOS is allowed (HF min_length and min_new_tokens)."""
        return max(self.min_new_tokens, self.min_length - num_prompt_tokens, 0)

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_generation_config(cls, config: Any, **overrides: Any) -> "SamplingParams":
        """Build from a `transformers.GenerationConfig` (or its dict); `overrides` win.

        Unknown override names raise ValueError; GenerationConfig fields tokenmill does not
        model are ignored only when they hold their default (otherwise rejected).
        """
        # Only the fields the config sets explicitly (HF's own defaults, e.g. max_length=20, stay ours).
        if hasattr(config, "to_diff_dict"):
            source = config.to_diff_dict()
        elif hasattr(config, "to_dict"):
            source = config.to_dict()
        else:
            source = dict(config or {})
        names = cls.field_names()
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown SamplingParams fields {sorted(unknown)}; allowed: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for name in names:
            if name in source and source[name] is not None:
                kwargs[name] = source[name]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        kwargs.pop("logprobs", None)
        kwargs.pop("prompt_logprobs", None)
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["SamplingParams"]
