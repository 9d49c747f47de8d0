"""Engine and replica faults: a failing step, a dead engine loop, a killed Ray Serve replica.

A fault must end the affected requests with an error that says what happened, never with a
hang, and the server must go on serving (in place, or through a replacement replica).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from tests.serve.conftest import free_port, make_engine, serve_app, wait_for
from tests.serve.test_reliability import StreamResult, engine_is_clean, stream_completion
from tokenmill.serve.api import REPLICA_HEADER, build_app

REPLACEMENT_TIMEOUT_S = 120.0


class StepFault:
    """Makes the model runner raise on its next `armed` calls (the engine's step catches it)."""

    def __init__(self, engine: Any) -> None:
        self.runner = engine.engine.runner
        self.real_run = self.runner.run
        self.armed = 0
        self.lock = threading.Lock()
        self.runner.run = self.run

    def run(self, batch: Any) -> Any:
        with self.lock:
            fail = self.armed > 0
            self.armed -= fail
        if fail:
            raise RuntimeError("injected fault in the model")
        return self.real_run(batch)

    def arm(self, times: int = 1) -> None:
        with self.lock:
            self.armed = times


@pytest.fixture(scope="module")
def faulty_server(loaded_model):
    engine = make_engine(loaded_model)
    fault = StepFault(engine)
    with serve_app(build_app(engine)) as live:
        yield engine, live, fault
    engine.shutdown()


def test_a_failing_step_is_a_500_with_its_message_and_the_server_keeps_serving(faulty_server):
    engine, live, fault = faulty_server
    fault.arm()
    r = live.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "internal_error" and "injected fault in the model" in error["message"]
    assert live.get("/health").status_code == 200
    assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
    ok = live.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_failing_step_mid_stream_ends_every_stream_in_the_batch_with_an_error(faulty_server):
    engine, live, fault = faulty_server
    body = {"prompt": "Write a long story.", "max_tokens": 100, "temperature": 0, "ignore_eos": True}

    async def run() -> list[StreamResult]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            streams = [asyncio.ensure_future(stream_completion(client, body)) for _ in range(3)]
            deadline = time.monotonic() + 30
            while engine.get_stats().num_running < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            fault.arm()
            return await asyncio.wait_for(asyncio.gather(*streams), 60)

    results = asyncio.run(run())
    for result in results:
        assert result.status == 200 and result.done  # the stream had started: the error is an SSE event
        assert len(result.errors) == 1 and "injected fault in the model" in result.errors[0]["message"]
        assert result.errors[0]["type"] == "internal_error" and not result.finish_reasons
    assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
    ok = live.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and live.get("/health").status_code == 200


# ---------------------------------------------------------------------- Ray Serve replicas
def fault_injectable_deployment() -> Any:
    """The LLMServer deployment with one extra, test-only method that crashes the engine loop."""
    from ray import serve

    from tokenmill.serve.deployment import LLMServer

    class FaultInjectableLLMServer(LLMServer.func_or_class):
        def crash_engine(self) -> str:
            def boom() -> bool:
                raise RuntimeError("injected engine crash")

            self.engine.engine.has_unfinished_requests = boom
            self.engine.abort("wake-the-loop")  # the idle loop wakes up, calls boom and dies
            return self.replica_id

    return serve.deployment(name="LLMServer")(FaultInjectableLLMServer)


@pytest.fixture(scope="module")
def ray_app():
    import ray
    from ray import serve

    from tokenmill.serve.deployment import APP_NAME, ServeConfig, stop

    config = ServeConfig(port=free_port(), num_gpus_per_replica=0,
                         engine_kwargs={"max_model_len": 128, "max_num_seqs": 4, "device": "cpu"})
    app = fault_injectable_deployment().options(
        num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0}, max_ongoing_requests=16,
        health_check_period_s=1, health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=2,
    ).bind(config)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{config.host}:{config.port}"
        assert wait_for(lambda: _get(url, "/health") is not None, 120)
        yield url, serve.get_app_handle(APP_NAME)
    finally:
        stop()


def _get(url: str, path: str) -> httpx.Response | None:
    try:
        return httpx.get(url + path, timeout=10)
    except httpx.HTTPError:
        return None


def _serving_replica(url: str) -> str | None:
    """The id of the replica that answers a small completion, or None when none does."""
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
    except httpx.HTTPError:
        return None
    return r.headers.get(REPLICA_HEADER) if r.status_code == 200 else None


def _wait_for_replacement(url: str, old_replica: str) -> str | None:
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    while time.monotonic() < deadline:
        replica = _serving_replica(url)
        if replica is not None and replica != old_replica:
            return replica
        time.sleep(0.5)
    return None


def test_a_dead_engine_turns_health_to_503_and_serve_replaces_the_replica(ray_app):
    url, handle = ray_app
    old = _serving_replica(url)
    assert old is not None
    assert handle.crash_engine.remote().result(timeout_s=30) == old
    health = _get(url, "/health")
    assert health is not None and health.status_code == 503, health
    assert "injected engine crash" in health.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and r.headers[REPLICA_HEADER] == old
    new = _wait_for_replacement(url, old)
    assert new is not None, "Serve did not replace the replica whose engine died"
    health = _get(url, "/health")
    assert health is not None and health.status_code == 200


def test_a_killed_replica_ends_its_streams_with_an_error_and_a_replacement_serves(ray_app):
    import ray

    from tokenmill.serve.deployment import APP_NAME

    url, _ = ray_app
    old = _serving_replica(url)
    assert old is not None
    events: list[str] = []
    outcome: dict[str, Any] = {}

    def stream() -> None:
        body = {"prompt": "Write a long story.", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                outcome["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert wait_for(lambda: len(events) >= 2, 60), outcome
    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#LLMServer#{old}", namespace="serve")
    ray.kill(actor, no_restart=True)
    thread.join(60)
    assert not thread.is_alive(), "the stream of a killed replica hung"
    completed = any('"finish_reason":"length"' in e for e in events)
    assert not completed and (outcome.get("error") is not None or any('"error"' in e for e in events)
                              or outcome.get("status", 200) >= 500), (outcome, events[-3:])
    new = _wait_for_replacement(url, old)
    assert new is not None, "no replacement replica served after the kill"
