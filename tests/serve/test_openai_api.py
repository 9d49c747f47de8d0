"""The HTTP API through the official `openai` client, against an in-process uvicorn server."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from tests.serve.conftest import MAX_MODEL_LEN, metric, serve_app, wait_for
from tokenmill.serve.api import build_app

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(engine):
    with serve_app(build_app(engine, api_key=API_KEY)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def kv_usage(server) -> float:
    return metric(server.get("/metrics").text, "tokenmill_kv_cache_usage_ratio")


# ---------------------------------------------------------------------- happy paths
def test_models_lists_the_served_model(server, client, model):
    card = server.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]
    assert card["id"] == model and card["root"] and card["max_model_len"] == MAX_MODEL_LEN
    assert server.get("/health").status_code == 200


def test_completion_usage_and_finish_reason(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert r.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_text_equals_non_streamed_text_for_greedy(client, model):
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_streaming_and_not(client, model):
    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_samples_with_seed_and_usage_counts_all_choices(client, model):
    r = client.completions.create(model=model, prompt="My favourite colour is", max_tokens=5, n=3, seed=7,
                                  temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 15  # all three choices counted, 5 tokens at most each
    again = client.completions.create(model=model, prompt="My favourite colour is", max_tokens=5, n=3, seed=7,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def test_n_streamed_choices(client, model):
    chunks = list(client.completions.create(model=model, prompt="Numbers:", max_tokens=4, n=2, seed=1, stream=True))
    indices = {c.index for chunk in chunks for c in chunk.choices}
    assert indices == {0, 1}
    finished = [c.index for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finished) == [0, 1]


def test_beam_search_and_ngram_params_via_extra_body(client, model):
    r = client.completions.create(model=model, prompt="The best way to learn is", max_tokens=8, n=2,
                                  extra_body={"num_beams": 3, "no_repeat_ngram_size": 2, "length_penalty": 1.0})
    assert len(r.choices) == 2 and all(c.text for c in r.choices)
    assert r.choices[0].text != r.choices[1].text  # distinct beams
    for choice in r.choices:
        tokens = choice.text.split()
        bigrams = list(zip(tokens, tokens[1:]))
        assert len(bigrams) == len(set(bigrams)) or len(tokens) < 3


def test_stop_string_is_not_in_the_output(client, model):
    free = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_logprobs_completions_and_chat(client, model):
    r = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(v is not None and v <= 0 for v in lp.token_logprobs)
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= t.top_logprobs[0].logprob + 1e-4 for t in content)  # greedy picks the top token


def test_batched_prompts_and_echo(client, model):
    r = client.completions.create(model=model, prompt=["Red, green,", "One, two,"], max_tokens=3, temperature=0,
                                  echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Red, green,") and r.choices[1].text.startswith("One, two,")
    solo = client.completions.create(model=model, prompt="One, two,", max_tokens=3, temperature=0)
    assert r.choices[1].text == "One, two," + solo.choices[0].text
    ids = client.completions.create(model=model, prompt=[[504, 2988]], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 2


def test_request_timeout_is_408(client, model):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=model, prompt="Write a long essay.", max_tokens=200, temperature=0,
                                  extra_body={"timeout_s": 0.2, "ignore_eos": True})
    assert err.value.status_code == 408 and "time limit" in str(err.value)


# ---------------------------------------------------------------------- errors
def test_unknown_field_is_400_naming_it(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={"top_kk": 3})
    assert "top_kk" in str(err.value) and err.value.body["param"] == "top_kk"


def test_invalid_value_is_400_naming_the_field(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=5)
    assert "temperature" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, n=4, extra_body={"num_beams": 2})
    assert err.value.body["param"] == "n"


def test_context_overflow_is_400_with_the_numbers(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hello world", max_tokens=MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in str(err.value) and "max_model_len" in str(err.value)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert "no-such-model" in str(err.value)


def test_missing_or_wrong_key_is_401(server, model):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = server.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_queue_full_is_429_and_the_server_keeps_serving(server, client, model):
    async def burst():
        import asyncio

        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(i):
            try:
                await aclient.completions.create(model=model, prompt=f"Item {i}:", max_tokens=4, temperature=0)
                return "ok"
            except openai.RateLimitError as exc:
                assert "queue" in str(exc)
                return "429"

        results = await asyncio.gather(*(one(i) for i in range(40)))
        await aclient.close()
        return results

    import asyncio

    results = asyncio.run(burst())
    assert "429" in results and "ok" in results
    r = client.completions.create(model=model, prompt="Still alive?", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None


def test_errors_leave_the_server_serving(client, model):
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="", max_tokens=2)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None


# ---------------------------------------------------------------------- disconnects and metrics
def raw_request(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


def test_client_disconnect_mid_stream_aborts_and_frees_kv(server, model):
    body = {"model": model, "prompt": "Write a long story.", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    request = raw_request(body)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        assert b"200 OK" in received
        assert kv_usage(server) > 0
    assert wait_for(lambda: kv_usage(server) == 0, 15), [
        line for line in server.get("/metrics").text.splitlines() if "num_requests" in line or "kv_cache" in line
    ]
    text = server.get("/metrics").text
    assert metric(text, "tokenmill_num_requests_running") == 0


def test_client_disconnect_while_waiting_for_a_full_answer_aborts(server, model):
    body = {"model": model, "prompt": "Write a long poem.", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_request(body))
        assert wait_for(lambda: kv_usage(server) > 0, 15)
    assert wait_for(lambda: kv_usage(server) == 0, 15)
    assert metric(server.get("/metrics").text, "tokenmill_num_requests_running") == 0


def test_metrics_counters_and_histograms(server, client, model):
    before = server.get("/metrics").text
    client.completions.create(model=model, prompt="Count: one, two,", max_tokens=4, temperature=0)
    after = server.get("/metrics").text
    assert metric(after, "tokenmill_generation_tokens_total") >= metric(before, "tokenmill_generation_tokens_total") + 4
    assert metric(after, "tokenmill_prompt_tokens_total") > metric(before, "tokenmill_prompt_tokens_total")
    for name in ("tokenmill_time_to_first_token_seconds_count", "tokenmill_inter_token_latency_seconds_count",
                 "tokenmill_e2e_request_latency_seconds_count"):
        assert metric(after, name) > metric(before, name)
    assert "tokenmill_num_requests_waiting" in after and "tokenmill_num_preemptions_total" in after


def test_health_is_503_when_the_loop_dies(loaded_model):
    from tests.serve.conftest import make_engine

    engine = make_engine(loaded_model)

    def broken_step():
        raise RuntimeError("simulated fault")

    engine.engine.step = broken_step
    try:
        with serve_app(build_app(engine)) as live:
            assert live.get("/health").status_code == 200
            r = live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 503 and "simulated fault" in r.json()["error"]["message"]
            health = live.get("/health")
            assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
            assert httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).status_code == 503
    finally:
        engine.shutdown()
