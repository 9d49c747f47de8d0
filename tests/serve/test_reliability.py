"""Reliability over HTTP: sustained concurrent load, KV-cache exhaustion, client disconnects, time limits.

Every test checks the engine is left clean afterwards: nothing running or waiting, every KV
block back in the free queue.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.serve.conftest import make_engine, metric, serve_app, wait_for
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.api import build_app

NUM_CLIENTS = 64
LOAD_DURATION_S = 60.0  # clients start new requests until then; in-flight ones finish
MAX_REQUESTS_PER_CLIENT = 12
NUM_KV_TOKENS = 12
PROBE_PROMPT = "The three primary colours are"  # asked greedily by every client: one answer for all


def engine_is_clean(engine: Any) -> bool:
    stats = engine.get_stats()
    return (stats.num_running == 0 and stats.num_waiting == 0
            and stats.num_free_blocks == stats.num_total_blocks)


def labelled_metric(text: str, name: str, label: str) -> float:
    prefix = f"{name}{{{label}}} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@dataclass
class StreamResult:
    status: int
    events: list[Any] = field(default_factory=list)  # parsed JSON payloads
    done: bool = False  # saw `data: [DONE]`

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events if "error" in e]

    @property
    def text(self) -> str:
        return "".join(c["text"] for e in self.events for c in e.get("choices", []))

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events for c in e.get("choices", []) if c.get("finish_reason")]

    @property
    def usage(self) -> dict[str, int] | None:
        return next((e["usage"] for e in self.events if e.get("usage")), None)


async def stream_completion(client: httpx.AsyncClient, body: dict[str, Any],
                            stop_after_events: int | None = None) -> StreamResult:
    """POST a streaming completion; with `stop_after_events`, drop the connection after that many events."""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        result = StreamResult(response.status_code)
        if response.status_code != 200:
            await response.aread()
            result.events.append(response.json())
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result.done = True
                continue
            result.events.append(json.loads(line[len("data: "):]))
            if stop_after_events is not None and len(result.events) >= stop_after_events:
                break  # leaving the block closes the connection mid-stream
    return result


@pytest.fixture(scope="module")
def load_server(loaded_model):
    engine = make_engine(loaded_model, max_num_seqs=16, max_waiting_requests=32)
    with serve_app(build_app(engine)) as live:
        yield engine, live
    engine.shutdown()


# ---------------------------------------------------------------------- load
def test_64_streaming_clients_each_request_answered_once_and_engine_left_clean(load_server):
    engine, live = load_server
    outcomes: dict[str, int] = {"ok": 0, "429": 0}
    failures: list[str] = []
    probe_texts: set[str] = set()

    async def client_loop(client: httpx.AsyncClient, cid: int, deadline: float) -> None:
        rng = random.Random(cid)
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            probe = n == 0 or rng.random() < 0.2
            max_tokens = 6 if probe else rng.randint(1, 8)
            body = {"prompt": PROBE_PROMPT if probe else f"Client {cid} asks question {n}: why is the sky",
                    "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
            body.update({"temperature": 0} if probe else {"temperature": 0.8, "seed": cid * 100 + n})
            result = await stream_completion(client, body)
            if result.status == 429:
                assert result.events[0]["error"]["code"] == "queue_full"
                outcomes["429"] += 1
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                continue
            if result.status != 200 or result.errors or not result.done or len(result.finish_reasons) != 1:
                failures.append(f"client {cid} request {n}: {result}")
                continue
            usage = result.usage
            if usage is None or not 1 <= usage["completion_tokens"] <= max_tokens:
                failures.append(f"client {cid} request {n}: usage {usage} for max_tokens={max_tokens}")
                continue
            if probe:
                probe_texts.add(result.text)
            outcomes["ok"] += 1

    async def run() -> None:
        limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
            deadline = time.monotonic() + LOAD_DURATION_S
            await asyncio.wait_for(asyncio.gather(*(client_loop(client, c, deadline) for c in range(NUM_CLIENTS))),
                                   LOAD_DURATION_S + 120)

    asyncio.run(run())
    assert not failures, failures[:5]
    assert outcomes["ok"] >= NUM_CLIENTS, outcomes  # every client got answers, not only 429s
    assert len(probe_texts) == 1, probe_texts  # greedy answers do not depend on the batch they ran in
    assert wait_for(lambda: engine_is_clean(engine), 15), engine.get_stats()
    text = live.get("/metrics").text
    assert metric(text, "tokenmill_kv_cache_usage_ratio") == 0
    assert metric(text, "tokenmill_num_requests_running") == 0 and metric(text, "tokenmill_num_requests_waiting") == 0
    assert labelled_metric(text, "tokenmill_requests_total", 'finish_reason="error"') == 0
    assert live.get("/health").status_code == 200


# ---------------------------------------------------------------------- client faults
def test_clients_dropping_mid_stream_are_aborted_and_others_unaffected(load_server):
    engine, live = load_server
    survivor = {"prompt": "List three fruits:", "max_tokens": 8, "temperature": 0}
    leaver = {"prompt": "Write a very long story about the sea.", "max_tokens": 200, "temperature": 0,
              "ignore_eos": True}
    rng = random.Random(0)
    drop_points = [rng.randint(1, 6) for _ in range(10)]

    async def run() -> tuple[StreamResult, list[StreamResult], list[StreamResult]]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            solo = await stream_completion(client, survivor)
            jobs = [stream_completion(client, leaver, stop_after_events=k) for k in drop_points]
            jobs += [stream_completion(client, survivor) for _ in range(6)]
            results = await asyncio.wait_for(asyncio.gather(*jobs), 120)
            return solo, results[: len(drop_points)], results[len(drop_points):]

    aborts_before = labelled_metric(live.get("/metrics").text, "tokenmill_requests_total", 'finish_reason="abort"')
    solo, left, stayed = asyncio.run(run())
    assert [len(r.events) for r in left] == drop_points and not any(r.done for r in left)
    for r in stayed:
        assert r.status == 200 and r.done and not r.errors
        assert r.text == solo.text and r.finish_reasons == solo.finish_reasons
    # 10 requests of 200 tokens would keep the engine busy for minutes: it is idle because they were aborted.
    assert wait_for(lambda: engine_is_clean(engine), 15), engine.get_stats()
    aborts = labelled_metric(live.get("/metrics").text, "tokenmill_requests_total", 'finish_reason="abort"')
    assert aborts - aborts_before == len(drop_points)


# ---------------------------------------------------------------------- KV exhaustion
def test_kv_exhaustion_preempts_and_resumes_with_unloaded_greedy_outputs(loaded_model):
    # 5 requests that start in 1 block (16 tokens a block) and grow into a 2nd, against a 3-block cache:
    # running requests run out of blocks and are preempted, then recomputed.
    engine = make_engine(loaded_model, num_kv_blocks=3, max_num_seqs=8)
    prompts = [f"Story {i}: once upon a time" for i in range(5)]
    params = SamplingParams(max_new_tokens=NUM_KV_TOKENS, do_sample=False, ignore_eos=True)

    async def one(prompt: str, rid: str) -> list[int]:
        final = None
        async for final in engine.generate(prompt, params, rid):
            pass
        assert final is not None and final.finished
        return final.outputs[0].token_ids

    async def loaded() -> list[list[int]]:
        return await asyncio.wait_for(asyncio.gather(*(one(p, f"kv-{i}") for i, p in enumerate(prompts))), 180)

    try:
        preemptions_before = engine.get_stats().num_preemptions_total
        together = asyncio.run(loaded())
        assert engine.get_stats().num_preemptions_total > preemptions_before
        assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
        alone = [asyncio.run(one(p, f"solo-{i}")) for i, p in enumerate(prompts)]
        assert [len(t) for t in together] == [NUM_KV_TOKENS] * len(prompts)
        assert together == alone
        assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- time limits
def test_streaming_request_past_its_timeout_ends_with_a_timeout_event_and_frees_blocks(load_server):
    engine, live = load_server
    body = {"prompt": "Write an essay.", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "timeout_s": 0.5}

    async def run() -> StreamResult:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            return await asyncio.wait_for(stream_completion(client, body), 60)

    started = time.monotonic()
    result = asyncio.run(run())
    assert time.monotonic() - started < 30
    assert result.status == 200 and result.done
    assert [e["type"] for e in result.errors] == ["timeout_error"] and result.errors[0]["param"] == "timeout_s"
    assert "time limit" in result.errors[0]["message"]
    assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()


def test_server_wide_time_limit_applies_to_requests_without_one(loaded_model):
    engine = make_engine(loaded_model, request_timeout_s=2.0)  # 200 tokens take far longer; "Hi" far less
    try:
        with serve_app(build_app(engine)) as live:
            body = {"prompt": "Write an essay.", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            started = time.monotonic()
            r = live.post("/v1/completions", json=body)
            assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
            assert time.monotonic() - started < 30
            # Asking for more time than the server allows does not extend its limit.
            r = live.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Write an essay."}],
                                                        "max_tokens": 200, "ignore_eos": True, "timeout_s": 1000})
            assert r.status_code == 408
            assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
            short = live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
            assert short.status_code == 200
    finally:
        engine.shutdown()
