"""What the health checks see: an engine core ends once its engine turns unhealthy (a dead
tensor-parallel worker), a dead core hands out no address, and an API replica whose connection
failed on its own connects again to the live core instead of answering 503 forever."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from tokenmill.engine.llm_engine import EngineStats
from tokenmill.serve.deployment import EngineCoreServer, LLMServer
from tokenmill.serve.engine_core import EngineCore


class IdleEngine:
    """Just enough engine for an idle core loop."""

    is_healthy = True

    def has_unfinished_requests(self) -> bool:
        return False


def test_a_core_ends_when_its_engine_turns_unhealthy():
    engine = IdleEngine()
    core = EngineCore(engine, bind="inproc://tokenmill-health-unhealthy").start()
    try:
        time.sleep(0.3)
        assert core.is_alive
        engine.is_healthy = False  # what the executor reports once a rank died
        deadline = time.monotonic() + 5
        while core.is_alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not core.is_alive
        assert "tensor-parallel worker died" in core.dead_reason
    finally:
        core.shutdown(timeout_s=5)


def test_a_dead_core_hands_out_no_address():
    server = SimpleNamespace(core=EngineCore(IdleEngine(), bind="inproc://tokenmill-health-address").start())
    server.check_health = lambda: EngineCoreServer.func_or_class.check_health(server)
    address = EngineCoreServer.func_or_class.address
    try:
        assert address(server)[1] == "core"
        server.core.dead_reason = "the engine loop died: boom"
        with pytest.raises(RuntimeError, match="boom"):
            address(server)
    finally:
        server.core.shutdown(timeout_s=5)


@dataclass
class FakeConnection:
    is_alive: bool
    info: dict = field(default_factory=lambda: {"core_id": "core-1"})


class FakeAsyncEngine:
    def __init__(self, connection: FakeConnection) -> None:
        self.cores = [connection]
        self.replaced: list[tuple[int, str]] = []
        self.fail_next = False

    def replace_core(self, index: int, address: str, connect_timeout_s: float = 60.0) -> None:
        self.replaced.append((index, address))
        if self.fail_next:  # the core died between answering its address and the handshake
            self.fail_next = False
            raise RuntimeError("the engine core answered 'dead'")
        self.cores[index] = FakeConnection(True)


class FakeCoreHandle:
    """A deployment handle whose `address.remote()` answers like EngineCoreServer.address."""

    def __init__(self, core_id: str | None) -> None:
        self.core_id = core_id  # None: the core is dead (address() raises)
        self.address = self

    async def remote(self) -> tuple[str, str]:
        if self.core_id is None:
            raise RuntimeError("engine core loop is not running")
        return "tcp://10.0.0.1:5555", self.core_id


class ApiReplica(SimpleNamespace):
    """LLMServer's health check on fake parts (no Serve replica around it)."""

    async def check_health(self) -> None:
        await LLMServer.func_or_class.check_health(self)


def api_replica(connection: FakeConnection, handle: FakeCoreHandle) -> ApiReplica:
    return ApiReplica(engine=FakeAsyncEngine(connection), core_handles=[handle], replica_id="api-0")


def test_an_api_replica_reconnects_to_the_same_live_core_when_only_its_connection_died():
    server = api_replica(FakeConnection(is_alive=False), FakeCoreHandle("core-1"))  # same core id: alive
    asyncio.run(server.check_health())
    assert server.engine.replaced == [(0, "tcp://10.0.0.1:5555")]
    asyncio.run(server.check_health())  # connected now: nothing more to do
    assert len(server.engine.replaced) == 1


def test_an_api_replica_waits_while_its_core_is_dead_and_never_fails_its_own_check():
    server = api_replica(FakeConnection(is_alive=False), FakeCoreHandle(None))
    asyncio.run(server.check_health())  # no exception: Serve replaces the core, not this replica
    assert server.engine.replaced == []
    server.core_handles[0].core_id = "core-2"  # the replacement is up
    asyncio.run(server.check_health())
    assert server.engine.replaced == [(0, "tcp://10.0.0.1:5555")]


def test_an_api_replica_check_survives_a_core_that_dies_during_the_reconnect():
    server = api_replica(FakeConnection(is_alive=False), FakeCoreHandle("core-1"))
    server.engine.fail_next = True
    asyncio.run(server.check_health())  # no exception: the next check tries again
    assert not server.engine.cores[0].is_alive
    asyncio.run(server.check_health())
    assert server.engine.cores[0].is_alive and len(server.engine.replaced) == 2


class StallingEngine(IdleEngine):
    """An idle engine whose loop gets stuck (outside any step) once `stall` is set, or whose one
    request takes a long step."""

    def __init__(self) -> None:
        self.stall = threading.Event()
        self.release = threading.Event()
        self.pending_step_s: float | None = None

    def has_unfinished_requests(self) -> bool:
        if self.stall.is_set():
            self.release.wait(30)  # where a stuck loop sits: named in the log
        return self.pending_step_s is not None

    def step(self) -> list:
        time.sleep(self.pending_step_s or 0)
        self.pending_step_s = None
        return []

    def get_stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0)


def test_a_stalled_core_loop_fails_the_health_check_with_its_stack(monkeypatch, caplog):
    from tokenmill.serve import deployment

    monkeypatch.setattr(deployment, "STALLED_LOOP_S", 0.5)
    engine = StallingEngine()
    server = SimpleNamespace(core=EngineCore(engine, bind="inproc://tokenmill-health-stall").start())
    check = lambda: EngineCoreServer.func_or_class.check_health(server)  # noqa: E731
    try:
        engine.pending_step_s = 1.5  # a long step is not a stall
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            check()
            time.sleep(0.1)
        assert engine.pending_step_s is None  # the step ran
        engine.stall.set()
        time.sleep(1.0)
        with caplog.at_level("ERROR", logger="tokenmill.serve.deployment"), pytest.raises(RuntimeError, match="stalled"):
            check()
        assert "has_unfinished_requests" in caplog.text and "release.wait" in caplog.text
        assert server.core.is_alive  # alive but stuck: only the health check can tell
    finally:
        engine.release.set()
        engine.stall.clear()
        server.core.shutdown(timeout_s=5)


def test_a_silent_core_and_an_unreachable_one_are_told_apart_at_the_hello():
    import zmq

    from tokenmill.engine.errors import EngineDeadError
    from tokenmill.serve.engine_core_client import CoreConnection

    silent = zmq.Context.instance().socket(zmq.ROUTER)  # accepts connections, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(EngineDeadError, match="connected, no reply"):
            CoreConnection(f"tcp://127.0.0.1:{port}", connect_timeout_s=1.0)
    finally:
        silent.close()
    with pytest.raises(EngineDeadError, match="no connection made"):
        CoreConnection(f"tcp://127.0.0.1:{port}", connect_timeout_s=0.5)  # nobody listens there now
