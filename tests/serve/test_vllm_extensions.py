"""vLLM's OpenAI extensions, prompt scoring (echo + logprobs) and structured outputs, through the `openai` client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

from tests.serve.conftest import serve_app
from tokenmill.serve.api import build_app
from tokenmill.serve.extensions import extensions_markdown


@pytest.fixture(scope="module")
def server(engine):
    with serve_app(build_app(engine)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def sse_chunks(server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions" if "prompt" in body else server.url + "/v1/chat/completions",
                      json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def bad_request(client_call) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        client_call()
    return err.value.body


# ---------------------------------------------------------------------- prompt scoring
def test_echo_logprobs_legacy_shape_and_prompt_only(client, model, engine):
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    num_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:num_prompt]) == prompt and r.choices[0].text.startswith(prompt)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[tok] == value and 1 <= len(top) <= 2 and max(top.values()) >= value  # the token + the best one
    # max_tokens 0: the prompt's scoring only, the same values; nothing generated.
    only = client.completions.create(model=model, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:num_prompt], abs=1e-5)
    # vLLM's prompt_logprobs field carries the same numbers.
    v = client.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    scored = v.model_extra["prompt_logprobs"] if "prompt_logprobs" in (v.model_extra or {}) else \
        v.choices[0].model_extra["prompt_logprobs"]
    ids = engine.tokenizer.encode(prompt)
    assert scored[0] is None and len(scored) == len(ids)
    for position, token_id in enumerate(ids[1:], start=1):
        entry = scored[position][str(token_id)]
        assert entry["logprob"] == pytest.approx(lp.token_logprobs[position], abs=1e-5) and entry["rank"] >= 1
        assert len(scored[position]) in (2, 3)


def test_echo_logprobs_stream_equals_non_stream(server, client, model):
    body = {"model": model, "prompt": "One, two, three,", "max_tokens": 3, "temperature": 0, "logprobs": 0,
            "echo": True, "stream": True}
    chunks = sse_chunks(server, body)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    values = [v for c in chunks if c["choices"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    full = client.completions.create(model=model, prompt="One, two, three,", max_tokens=3, temperature=0,
                                     logprobs=0, echo=True)
    assert text == full.choices[0].text and tokens == full.choices[0].logprobs.tokens
    assert values == pytest.approx(full.choices[0].logprobs.token_logprobs, abs=1e-5)
    only = sse_chunks(server, {**body, "max_tokens": 0})
    assert "".join(c["choices"][0]["text"] for c in only if c["choices"]) == "One, two, three,"


def test_batched_token_prompts_score_like_lm_eval_sends_them(client, model, engine):
    ids = [engine.tokenizer.encode("Red, green, blue"), engine.tokenizer.encode("A cat sat")]
    r = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    for choice, prompt in zip(sorted(r.choices, key=lambda c: c.index), ids):
        assert len(choice.logprobs.token_logprobs) == len(prompt) + 1
        single = client.completions.create(model=model, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
        assert choice.logprobs.token_logprobs[:-1] == pytest.approx(single.choices[0].logprobs.token_logprobs,
                                                                     abs=1e-4)


def test_prompt_logprobs_errors(client, model):
    body = bad_request(lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, stream=True,
                                                         extra_body={"prompt_logprobs": 1}))
    assert body["param"] == "prompt_logprobs"
    body = bad_request(lambda: client.completions.create(model=model, prompt="Hi", max_tokens=0))
    assert body["param"] == "max_tokens" and "echo" in body["message"]
    body = bad_request(lambda: client.completions.create(model=model, prompt="Hi", extra_body={"prompt_logprobs": 21}))
    assert body["param"] == "prompt_logprobs"


# ---------------------------------------------------------------------- other extensions
def test_continuous_usage_stats_in_every_chunk(server, model):
    body = {"model": model, "prompt": "Count: 1, 2,", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse_chunks(server, body)
    assert all(c["usage"] is not None for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1]["choices"] == []
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)
    chat = sse_chunks(server, {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                               "stream": True, "stream_options": {"include_usage": True,
                                                                  "continuous_usage_stats": True}})
    assert all(c["usage"] is not None and c["usage"]["prompt_tokens"] > 0 for c in chat)
    plain = sse_chunks(server, {**body, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 6


def test_sampling_extensions_honoured(client, model):
    r = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0,
                                  extra_body={"min_tokens": 8, "ignore_eos": True, "skip_special_tokens": False,
                                              "spaces_between_special_tokens": False, "priority": 0})
    assert r.usage.completion_tokens == 8
    base = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    stop = base.choices[0].text[2:4]
    kept = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text.endswith(stop)


def test_return_tokens_as_token_ids(client, model, engine):
    r = client.completions.create(model=model, prompt="Hi there", max_tokens=3, temperature=0, logprobs=2, echo=True,
                                  extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp.tokens)
    assert [int(t.split(":")[1]) for t in lp.tokens[:2]] == engine.tokenizer.encode("Hi there")[:2]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in lp.top_logprobs[1:] for k in top)
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    assert all(t.token.startswith("token_id:") for t in c.choices[0].logprobs.content)


def test_priority_other_than_zero_is_400(client, model):
    body = bad_request(lambda: client.completions.create(model=model, prompt="Hi", max_tokens=1,
                                                         extra_body={"priority": 3}))
    assert body["param"] == "priority" and "priority scheduling" in body["message"]


def test_chat_template_extensions(client, model, engine):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("The capital of France is")
    assert r.usage.prompt_tokens == len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    body = bad_request(lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                                              extra_body={"continue_final_message": True}))
    assert body["param"] == "continue_final_message"
    ok = client.chat.completions.create(model=model, messages=messages[:1], max_tokens=1,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert ok.choices[0].message is not None
    body = bad_request(lambda: client.chat.completions.create(model=model, messages=messages[:1], max_tokens=1,
                                                              extra_body={"chat_template_kwargs": {"tokenize": True}}))
    assert body["param"] == "chat_template_kwargs" and "tokenize" in body["message"]


def test_fields_outside_the_table_stay_400(client, model):
    for field in ("use_beam_search", "truncate_prompt_tokens", "guided_decoding_backend"):
        body = bad_request(lambda: client.completions.create(model=model, prompt="Hi", max_tokens=1,
                                                             extra_body={field: 1}))
        assert body["param"] == field


def test_readme_lists_the_extension_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert extensions_markdown() in readme


# ---------------------------------------------------------------------- structured outputs
class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    member: bool


def test_openai_parse_with_a_pydantic_model(client, model):
    completion = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Give me a person as JSON."}],
        response_format=Person, max_tokens=60, temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_guided_forms_follow_their_constraint(client, model):
    ask = [{"role": "user", "content": "Is the sky blue?"}]
    c = client.chat.completions.create(model=model, messages=ask, max_tokens=5, temperature=1.0, seed=3,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert c.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=model, prompt="Phone:", max_tokens=20, temperature=1.0, seed=4,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for extra in ({"structured_outputs": {"json": schema}}, {"guided_json": schema},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}):
        out = client.chat.completions.create(model=model, messages=ask, max_tokens=20, temperature=0,
                                             extra_body=extra)
        assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)
    g = client.completions.create(model=model, prompt="Pick:", max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "a" ("b" | "c")+'},
                                              "n": 1})
    assert re.fullmatch(r"a[bc]+", g.choices[0].text)


def test_structured_output_errors_are_400(client, model):
    ask = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"guided_regex": "(("}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_choice": ["a"], "num_beams": 2}, "num_beams"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ]
    for extra, param in cases:
        body = bad_request(lambda: client.chat.completions.create(model=model, messages=ask, max_tokens=2,
                                                                  extra_body=extra))
        assert body["param"] == param, (extra, body)
