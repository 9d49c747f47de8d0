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


# ---------------------------------------------------------------------- Ray Serve: engine core and API replicas
def fault_injectable_core() -> Any:
    """The EngineCore deployment with one extra, test-only method that crashes its step loop."""
    from ray import serve

    from tokenmill.serve.deployment import EngineCoreServer

    class FaultInjectableEngineCore(EngineCoreServer.func_or_class):
        def crash_loop(self) -> str:
            def boom() -> bool:
                raise RuntimeError("injected engine crash")

            self.core.engine.has_unfinished_requests = boom  # the idle loop calls it within 0.2 s and dies
            return self.core.core_id

    return serve.deployment(name="EngineCore")(FaultInjectableEngineCore)


@pytest.fixture(scope="module")
def ray_app():
    import ray
    from ray import serve

    from tokenmill.serve.deployment import APP_NAME, LLMServer, ServeConfig, stop

    config = ServeConfig(port=free_port(), num_gpus_per_replica=0,
                         engine_kwargs={"max_model_len": 128, "max_num_seqs": 4, "device": "cpu"})
    quick = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 2, "health_check_timeout_s": 30}
    core = fault_injectable_core().options(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
                                           health_check_period_s=1, **quick).bind(config)
    app = LLMServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.25, "num_gpus": 0},
                            max_ongoing_requests=16, health_check_period_s=1, **quick).bind(config, [core])
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{config.host}:{config.port}"
        assert wait_for(lambda: _healthy(url), 120)
        yield url, serve.get_deployment_handle("EngineCore", APP_NAME)
    finally:
        stop()


def _get(url: str, path: str) -> httpx.Response | None:
    try:
        return httpx.get(url + path, timeout=10)
    except httpx.HTTPError:
        return None


def _healthy(url: str) -> bool:
    health = _get(url, "/health")
    return health is not None and health.status_code == 200


def _core_id(core_handle: Any) -> str:
    return core_handle.address.remote().result(timeout_s=30)[1]


def _serving_replica(url: str) -> str | None:
    """The id of the API replica that answers a small completion, or None when none does."""
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
    except httpx.HTTPError:
        return None
    return r.headers.get(REPLICA_HEADER) if r.status_code == 200 else None


def _wait_until_served(url: str, different_from: str | None = None) -> str | None:
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    while time.monotonic() < deadline:
        replica = _serving_replica(url)
        if replica is not None and replica != different_from:
            return replica
        time.sleep(0.5)
    return None


class LongStream:
    """A long streaming completion read in a thread: its events and how it ended."""

    def __init__(self, url: str) -> None:
        self.events: list[str] = []
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        body = {"prompt": "Write a long story.", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                self.outcome["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line)
        except httpx.HTTPError as exc:
            self.outcome["error"] = exc

    def ended_with_an_error(self) -> bool:
        completed = any('"finish_reason":"length"' in e for e in self.events)
        return not completed and (self.outcome.get("error") is not None or any('"error"' in e for e in self.events)
                                  or self.outcome.get("status", 200) >= 500)


def test_a_dead_engine_loop_turns_health_to_503_and_serve_replaces_the_core(ray_app):
    url, core = ray_app
    assert _serving_replica(url) is not None
    old_core = _core_id(core)
    assert core.crash_loop.remote().result(timeout_s=30) == old_core
    assert wait_for(lambda: (_get(url, "/health") or httpx.Response(200)).status_code == 503, 10)
    assert "injected engine crash" in _get(url, "/health").json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "injected engine crash" in r.json()["error"]["message"]
    assert _wait_until_served(url) is not None, "no request was served after the core's replacement"
    assert _core_id(core) != old_core and _healthy(url)


def test_a_killed_engine_core_ends_in_flight_streams_with_an_error_and_a_replacement_serves(ray_app):
    import ray

    from tokenmill.serve.deployment import APP_NAME

    url, core = ray_app
    assert _serving_replica(url) is not None
    old_core = _core_id(core)
    stream = LongStream(url)
    assert wait_for(lambda: len(stream.events) >= 2, 60), stream.outcome
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#EngineCore#{old_core}", namespace="serve"), no_restart=True)
    stream.thread.join(30)
    assert not stream.thread.is_alive(), "the stream of a killed engine core hung"
    assert stream.ended_with_an_error(), (stream.outcome, stream.events[-3:])
    assert any("disconnected" in e for e in stream.events), stream.events[-2:]  # the error says what happened
    assert _wait_until_served(url) is not None, "no request was served after the core's replacement"
    assert _core_id(core) != old_core


def test_a_killed_api_replica_ends_its_streams_with_an_error_and_a_replacement_serves(ray_app):
    import ray

    from tokenmill.serve.deployment import APP_NAME

    url, _ = ray_app
    old = _serving_replica(url)
    assert old is not None
    stream = LongStream(url)
    assert wait_for(lambda: len(stream.events) >= 2, 60), stream.outcome
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#LLMServer#{old}", namespace="serve"), no_restart=True)
    stream.thread.join(60)
    assert not stream.thread.is_alive(), "the stream of a killed replica hung"
    assert stream.ended_with_an_error(), (stream.outcome, stream.events[-3:])
    assert _wait_until_served(url, different_from=old) is not None, "no replacement replica served after the kill"
