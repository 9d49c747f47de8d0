"""Property-based fuzzing of SamplingParams: any value of any field is either accepted or a ValueError
naming the field, and whatever is accepted runs on a tiny model without hurting the engine."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.engine.sampling_params import SamplingParams

VOCAB = 384  # tests.engine.helpers.VOCAB
MAX_STEPS = 64

# Values of the wrong type or far out of range, for any field.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=2 * VOCAB), max_size=3),
    st.dictionaries(st.integers(min_value=-3, max_value=2 * VOCAB), st.floats(-200, 200), max_size=2),
)
small_int = st.integers(min_value=-2, max_value=6)
token_id = st.integers(min_value=-2, max_value=VOCAB + 8)  # a few past the tiny vocabulary
unit = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)

VALID_OR_NEAR: dict[str, st.SearchStrategy] = {
    "max_new_tokens": st.one_of(st.none(), st.integers(-1, 6)),
    "max_length": st.one_of(st.none(), st.integers(-1, 24)),
    "min_new_tokens": small_int,
    "min_length": st.integers(-1, 20),
    "do_sample": st.booleans(),
    "num_beams": st.integers(0, 3),
    "num_return_sequences": st.integers(0, 3),
    "length_penalty": st.floats(-3, 3),
    "early_stopping": st.sampled_from([True, False, "never", "always"]),
    "temperature": st.floats(min_value=-1, max_value=3),
    "top_k": st.integers(-1, 2 * VOCAB),
    "top_p": unit,
    "min_p": st.one_of(st.none(), unit),
    "typical_p": unit,
    "epsilon_cutoff": unit,
    "eta_cutoff": unit,
    "repetition_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "no_repeat_ngram_size": small_int,
    "bad_words_ids": st.one_of(st.none(), st.lists(st.lists(token_id, max_size=3), max_size=2)),
    "logit_bias": st.one_of(st.none(), st.dictionaries(token_id, st.floats(-150, 150), max_size=3)),
    "eos_token_id": st.one_of(st.none(), token_id, st.lists(token_id, max_size=2)),
    "pad_token_id": st.one_of(st.none(), token_id),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
    "stop_token_ids": st.lists(token_id, max_size=2),
    "ignore_eos": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(-1, 2**64)),
    "logprobs": st.one_of(st.none(), st.integers(-1, 25)),
    "prompt_logprobs": st.one_of(st.none(), st.integers(-1, 25)),
    "structured_outputs": st.one_of(st.none(), st.just({"regex": "[ab]+"}), st.just({"choice": []}), st.just({"json": {"type": "integer"}, "regex": "x"})),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "output_kind": st.sampled_from(["cumulative", "delta", "final", "stream", ""]),
    "detokenize": st.booleans(),
}
assert set(VALID_OR_NEAR) == SamplingParams.field_names(), "a new SamplingParams field needs a strategy here"

# Fields normalised into tuples/dicts before validation: fuzzed with values of their container type.
# Junk of another type (a bare int, a bool, a string for logit_bias) escapes as TypeError or as a
# ValueError that names no field: see test_container_fields_reject_junk_naming_the_field.
CONTAINER_FIELDS = ("stop", "stop_token_ids", "bad_words_ids", "logit_bias", "eos_token_id")
KWARGS = st.fixed_dictionaries(
    {}, optional={name: strategy if name in CONTAINER_FIELDS else st.one_of(strategy, JUNK)
                  for name, strategy in VALID_OR_NEAR.items()}
)
FIELD_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)=")


def build(kwargs: dict) -> SamplingParams | None:
    """The params, or None after checking that the rejection is a ValueError naming a field it was given."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        match = FIELD_IN_MESSAGE.match(str(exc))
        assert match is not None, f"{kwargs} -> ValueError without a field name: {exc}"
        # Cross-field rules name one of the fields involved; the default of an unset field is never wrong.
        assert match.group(1) in kwargs, f"{kwargs} -> {exc}"
        assert "allowed" in str(exc), f"{kwargs} -> {exc}"
        return None


def all_finite(params: SamplingParams) -> bool:
    return all(math.isfinite(getattr(params, f)) for f in (
        "temperature", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
        "length_penalty", "presence_penalty", "frequency_penalty") ) and (params.min_p is None or math.isfinite(params.min_p))


def check_accepted(params: SamplingParams) -> None:
    # Accepted params are normalised and survive replace().
    assert isinstance(params.stop, tuple) and isinstance(params.stop_token_ids, tuple)
    assert params.replace() == params


SCALAR_FIELDS = sorted(set(VALID_OR_NEAR) - set(CONTAINER_FIELDS))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(SCALAR_FIELDS), data=st.data())
def test_one_scalar_field_any_value(name, data):
    value = data.draw(st.one_of(VALID_OR_NEAR[name], JUNK), label=name)
    params = build({name: value})
    if params is not None:
        check_accepted(params)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(kwargs=KWARGS)
def test_any_combination_of_fields_is_accepted_or_a_value_error_naming_a_field(kwargs):
    params = build(kwargs)
    if params is not None:
        check_accepted(params)


NAN = float("nan")


@pytest.mark.parametrize("kwargs", [
    {"stop": 5}, {"stop_token_ids": True}, {"bad_words_ids": 3}, {"bad_words_ids": [5]}, {"logit_bias": "0"},
    {"eos_token_id": ["a"]}, {"temperature": NAN}, {"repetition_penalty": NAN}, {"length_penalty": NAN},
], ids=lambda kwargs: "-".join(f"{k}={v!r}" for k, v in kwargs.items()))
def test_junk_container_values_and_nan_are_rejected_by_name(kwargs):
    (field,) = kwargs
    with pytest.raises(ValueError, match=f"SamplingParams.{field}=.*allowed"):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tiny_engine():
    from tests.engine.helpers import tiny_pair
    from tokenmill.engine.llm_engine import LLMEngine

    loaded, _ = tiny_pair("llama")
    return LLMEngine.from_args(loaded=loaded, max_model_len=64, max_num_seqs=8, num_kv_blocks=32, block_size=8,
                               max_num_batched_tokens=64, device="cpu")


def generate(engine, rid: str, params: SamplingParams) -> list:
    engine.add_request(rid, [5, 17, 42, 99], params)
    for _ in range(MAX_STEPS):
        outputs = [o for o in engine.step() if o.request_id == rid and o.finished]
        if outputs:
            return outputs
    raise AssertionError(f"request {rid} with {params} did not finish in {MAX_STEPS} steps")


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(kwargs=st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)},
                                    optional={k: v for k, v in VALID_OR_NEAR.items()
                                              if k not in ("max_new_tokens", "max_length")}),
       data=st.data())
def test_accepted_params_generate_on_a_tiny_model(tiny_engine, kwargs, data):
    params = build(kwargs)
    if params is None:
        return
    rid = f"fuzz-{data.draw(st.integers(0, 2**32), label='rid')}"
    try:
        final = generate(tiny_engine, rid, params)[0]
    except ValueError as exc:  # the engine's own limits (beams > max_num_seqs, ...) name the field
        assert any(name in str(exc) for name in kwargs) or "max_num_seqs" in str(exc), exc
        assert rid not in tiny_engine.requests
        return
    assert final.error is None, final.error
    outputs = final.outputs
    assert 1 <= len(outputs) <= max(params.num_return_sequences, 1)
    for out in outputs:
        assert out.finish_reason in ("length", "stop"), out
        assert len(out.token_ids) <= kwargs["max_new_tokens"]
        assert all(0 <= t < VOCAB for t in out.token_ids)
    stats = tiny_engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_a_request_with_out_of_vocabulary_ids_is_rejected_before_it_can_fail_a_batch(tiny_engine):
    neighbour = SamplingParams(max_new_tokens=3)
    tiny_engine.add_request("neighbour", [5, 17, 42], neighbour)
    for field, value in (("logit_bias", {VOCAB: 5.0}), ("bad_words_ids", [[3, VOCAB]])):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} holds token id {VOCAB}"):
            tiny_engine.add_request(f"bad-{field}", [5, 17, 42], SamplingParams(max_new_tokens=3, **{field: value}))
    finals = []
    for _ in range(MAX_STEPS):
        finals += [o for o in tiny_engine.step() if o.finished]
        if not tiny_engine.has_unfinished_requests():
            break
    assert [(o.request_id, o.error, len(o.outputs[0].token_ids)) for o in finals] == [("neighbour", None, 3)]
