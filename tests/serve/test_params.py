"""OpenAI request -> SamplingParams mapping (no model needed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.errors import APIError
from tokenmill.serve.params import to_sampling_params
from tokenmill.serve.protocol import ChatCompletionRequest, CompletionRequest

DEFAULTS = SamplingParams(eos_token_id=2, pad_token_id=2, max_length=20, top_k=50, temperature=0.7, do_sample=True)
VOCAB = 1000


def completion(**fields):
    return to_sampling_params(CompletionRequest(prompt="x", **fields), defaults=DEFAULTS, vocab_size=VOCAB)


def chat(**fields):
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)
    return to_sampling_params(request, defaults=DEFAULTS, vocab_size=VOCAB)


def test_openai_defaults_not_the_generation_config():
    p = completion()
    assert (p.do_sample, p.temperature, p.top_p, p.top_k) == (True, 1.0, 1.0, 0)
    assert p.max_new_tokens is None and p.max_length is None  # up to the context
    assert p.eos_token_id == 2 and p.pad_token_id == 2  # only these come from the model
    assert p.num_return_sequences == 1 and p.logprobs is None


def test_temperature_zero_is_greedy():
    p = completion(temperature=0)
    assert p.do_sample is False and p.is_greedy
    assert completion(temperature=0.5).do_sample and completion(temperature=0.5).temperature == 0.5


def test_length_and_choices():
    p = completion(max_tokens=7, n=3, min_tokens=2)
    assert (p.max_new_tokens, p.num_return_sequences, p.min_new_tokens) == (7, 3, 2)
    assert chat(max_completion_tokens=5, max_tokens=9).max_new_tokens == 5


def test_beam_search_is_deterministic_unless_asked():
    p = completion(n=2, num_beams=4, length_penalty=0.5, early_stopping=True)
    assert (p.num_beams, p.num_return_sequences, p.do_sample) == (4, 2, False)
    assert (p.length_penalty, p.early_stopping) == (0.5, True)
    assert completion(num_beams=2, temperature=0.8).do_sample  # beam sampling when a temperature is given
    with pytest.raises(APIError) as err:
        completion(n=5, num_beams=4)
    assert err.value.status == 400 and err.value.param == "n" and "num_beams" in err.value.message


def test_extras_pass_through():
    p = completion(top_k=5, min_p=0.1, typical_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=3,
                   stop_token_ids=[5, 6], ignore_eos=True, presence_penalty=0.5, frequency_penalty=-0.5, seed=3,
                   stop=["\n"], logit_bias={"7": 5.0})
    assert (p.top_k, p.min_p, p.typical_p, p.repetition_penalty, p.no_repeat_ngram_size) == (5, 0.1, 0.9, 1.2, 3)
    assert p.stop_token_ids == (5, 6) and p.ignore_eos and p.stop == ("\n",) and p.seed == 3
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -0.5, {7: 5.0})
    assert completion(stop="END").stop == ("END",)
    assert completion(top_k=10**6).top_k == VOCAB  # clamped to the vocabulary


def test_logprobs():
    assert completion(logprobs=3).logprobs == 3
    assert chat(logprobs=True).logprobs == 0
    assert chat(logprobs=True, top_logprobs=4).logprobs == 4
    assert chat().logprobs is None
    with pytest.raises(APIError) as err:
        chat(top_logprobs=2)
    assert err.value.param == "top_logprobs"


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"logit_bias": {"3": 101.0}}, "logit_bias"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"do_sample": True, "temperature": 0}, "temperature"),
])
def test_invalid_values_name_the_field(fields, param):
    with pytest.raises(APIError) as err:
        completion(**fields)
    assert err.value.status == 400 and err.value.param == param and param in err.value.message


def test_unknown_and_out_of_range_fields_are_rejected_by_the_schema():
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        CompletionRequest(prompt="x", best_of=2)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", temperature=2.5)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", top_p=float("nan"))
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x", "color": "red"}])


def test_vllm_prompt_scoring_fields():
    assert completion(echo=True, logprobs=3).prompt_logprobs == 3
    assert completion(echo=True, logprobs=1, prompt_logprobs=5).prompt_logprobs == 5
    assert completion(logprobs=2).prompt_logprobs is None  # no echo: generated tokens only
    assert completion(echo=True, max_tokens=0).max_new_tokens == 1  # drawn, then dropped by the API
    for bad in (dict(max_tokens=0), dict(priority=1), dict(prompt_logprobs=1, stream=True),
                dict(stream=True, stream_options={"continuous_usage_stats": True})):
        with pytest.raises(APIError) as err:
            completion(**bad)
        assert err.value.status == 400 and err.value.param.split(".")[0] in bad
    with pytest.raises(APIError) as err:
        chat(max_tokens=0)
    assert err.value.param == "max_tokens"


def test_structured_output_forms_map_to_one_spec():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    forms = [
        dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        dict(structured_outputs={"json": schema}),
        dict(guided_json=schema),
        dict(guided_json=json.dumps(schema)),
    ]
    specs = [chat(**f).structured_outputs for f in forms]
    assert len({s.key for s in specs}) == 1 and specs[0].json == schema
    assert chat(response_format={"type": "json_object"}).structured_outputs.kind == "json_object"
    assert chat(response_format={"type": "text"}).structured_outputs is None
    assert chat(guided_choice=["a", "b"]).structured_outputs.choice == ("a", "b")
    assert chat(guided_regex="[0-9]+").structured_outputs.regex == "[0-9]+"
    assert chat(structured_outputs={"grammar": 'root ::= "x"'}).structured_outputs.kind == "grammar"
    for bad, param in ((dict(guided_regex="(("), "guided_regex"), (dict(guided_choice=[]), "guided_choice"),
                       (dict(guided_regex="a", response_format={"type": "json_object"}), "response_format"),
                       (dict(guided_choice=["a"], num_beams=2), "num_beams")):
        with pytest.raises(APIError) as err:
            chat(**bad)
        assert err.value.param == param, (bad, err.value.param)
