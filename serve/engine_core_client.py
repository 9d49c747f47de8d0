"""The API side's connection to one engine core: a ZMQ DEALER socket owned by one I/O thread.

Callers (any thread, any event loop) queue commands and wake the thread through a pipe; the
thread sends them, reads the core's step messages, turns them into RequestOutputs
(engine_core_outputs) and hands those to the callers' streams, one event-loop wake-up per
loop per step. When the core dies (a ["dead"] message, or its socket disconnects because its
process is gone) every request of this connection fails with EngineDeadError at once.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import uuid
from typing import Any, Callable, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from tokenmill.engine.errors import EngineDeadError, QueueFullError
from tokenmill.serve.engine_core_messages import core_params, encode_params, pack, unpack, unpack_prompt_logprobs
from tokenmill.serve.engine_core_outputs import RequestState

logger = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000  # ZMTP heartbeats (answered by ZMQ's I/O thread, not the core's Python loop)
HEARTBEAT_TIMEOUT_MS = 10_000


class Stream(Protocol):
    """Where a request's outputs go (engine/async_engine.RequestStream)."""

    request_id: str
    deadline: float | None

    def put_many(self, loop: Any, items: list[tuple["Stream", Any]]) -> None: ...

    @property
    def loop(self) -> Any: ...


class RequestTimeoutError(TimeoutError):
    """A request ran past its time limit; it was aborted and its KV blocks freed."""


class CoreConnection:
    """One engine core as seen from an API process."""

    def __init__(self, address: str, *, context: zmq.Context | None = None, connect_timeout_s: float = 60.0,
                 token: str | None = None) -> None:
        self.address = address
        # A connection over TCP has a ZMQ context of its own (I/O thread included), ended with it: a
        # replacement's connection never shares the state of one that died (a replacement core once
        # could not be reached from an API replica whose shared context had served the dead core's
        # connection). In-process cores pass theirs (inproc needs the core's context).
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        self.info = self._handshake(connect_timeout_s, token)
        self.stats: dict[str, Any] = self.info.pop("stats")
        self.dead_reason: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._states: dict[str, tuple[RequestState, Stream]] = {}  # owned by the I/O thread
        self._pending_adds: dict[str, tuple[RequestState, Stream, Callable[[BaseException | None], None]]] = {}
        self._lock = threading.Lock()  # orders "is dead?" checks against the connection's death
        self._num_added = 0  # requests handed to this connection (callers, under _lock)
        self._num_ended = 0  # of them, ended: answered, rejected, aborted, expired or lost (the I/O thread)
        self._thread = threading.Thread(target=self._run, name="tokenmill-core-client", daemon=True)
        self._thread.start()

    def _handshake(self, timeout_s: float, token: str | None) -> dict[str, Any]:
        self.socket.send(pack(["hello", token]))
        if not self.socket.poll(int(timeout_s * 1000)):
            connected = self._monitor_saw(zmq.EVENT_CONNECTED)  # tells a core that is unreachable from one that is silent
            self._close_sockets()
            raise EngineDeadError(f"the engine core at {self.address} did not answer within {timeout_s} s "
                                  f"({'connected, no reply' if connected else 'no connection made'})")
        message = unpack(self.socket.recv())
        if message[0] != "welcome":
            self._close_sockets()
            raise EngineDeadError(f"the engine core at {self.address} answered {message[0]!r}: {message[1:]!r}")
        return pickle.loads(message[1])

    # ------------------------------------------------------------------ callers
    @property
    def num_in_flight(self) -> int:
        """Requests added and not ended yet (what routing balances)."""
        return self._num_added - self._num_ended

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    def add(self, state: RequestState, stream: Stream, done: Callable[[BaseException | None], None]) -> None:
        """Send a request; `done(error or None)` is called from the I/O thread once the core answers."""
        self._submit(("add", state, stream, done), counts=True)

    def abort(self, request_id: str) -> None:
        try:
            self._submit(("abort", request_id))
        except EngineDeadError:
            pass

    def close(self, reason: str = "the engine client was shut down") -> None:
        try:
            self._submit(("close", reason))
        except EngineDeadError:
            return
        self._thread.join(10)

    def _submit(self, command: tuple[Any, ...], counts: bool = False) -> None:
        with self._lock:
            if self.dead_reason is not None:
                raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
            self._num_added += counts
            self._commands.put(command)
            # Written under the lock: the I/O thread closes the pipe only after it has marked the
            # connection dead under this lock, so the descriptor is still open here.
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full: the thread is awake already
                pass

    # ------------------------------------------------------------------ I/O thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        deliveries: dict[Any, list[tuple[Stream, Any]]] = {}
        reason = "the engine client was shut down"
        try:
            while True:
                timeout = 50 if any(s.deadline is not None for _, s in self._states.values()) else None
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    os.read(self._wake_r, 65536)
                    closing = self._apply_commands()
                    if closing is not None:
                        reason = closing
                        break
                if self.socket in events:
                    dead = self._receive(deliveries)
                    if dead is not None:
                        reason = dead
                        break
                if self.monitor in events and self._monitor_saw(zmq.EVENT_DISCONNECTED):
                    reason = f"the engine core at {self.address} disconnected (its process stopped)"
                    break
                self._expire_deadlines(deliveries)
                self._deliver(deliveries)
        except BaseException as exc:  # noqa: BLE001 - callers must not hang
            logger.exception("engine client I/O thread died")
            reason = f"the engine client failed: {exc!r}"
        self._die(reason, deliveries)

    def _apply_commands(self) -> str | None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return None
            kind = command[0]
            if kind == "add":
                _, state, stream, done = command
                rid = state.request_id
                if rid in self._states or rid in self._pending_adds:
                    self._num_ended += 1
                    done(ValueError(f"request_id={rid!r} is invalid: a request with this id is running"))
                    continue
                self._pending_adds[rid] = (state, stream, done)
                params = encode_params(core_params(state.params))
                self.socket.send(pack(["add", rid, state.prompt_token_ids, params]))
            elif kind == "abort":
                rid = command[1]
                pending = self._pending_adds.pop(rid, None)
                if pending is not None:  # aborted before the core answered the add: it may still accept it
                    self._num_ended += 1
                    pending[2](RuntimeError(f"request {rid} was aborted"))
                    self.socket.send(pack(["abort", [rid]]))
                elif self._states.pop(rid, None) is not None:
                    self._num_ended += 1
                    self.socket.send(pack(["abort", [rid]]))
            elif kind == "close":
                return command[1]

    def _receive(self, deliveries: dict[Any, list[tuple[Stream, Any]]]) -> str | None:
        while True:
            try:
                message = unpack(self.socket.recv(zmq.NOBLOCK))
            except zmq.Again:
                return None
            if message[0] == "dead":
                return message[1]
            if message[0] == "step":
                self._on_step(message, deliveries)

    def _on_step(self, message: list[Any], deliveries: dict[Any, list[tuple[Stream, Any]]]) -> None:
        _, outputs, accepted, rejected, stats = message[:5]
        deltas = message[5] if len(message) > 5 else ([], [], [])  # a core from before the columns
        self.stats = stats
        for rid in accepted:
            pending = self._pending_adds.pop(rid, None)
            if pending is not None:
                state, stream, done = pending
                self._states[rid] = (state, stream)
                done(None)
        for rid, kind, text in rejected:
            pending = self._pending_adds.pop(rid, None)
            if pending is not None:
                self._num_ended += 1
                error = {"queue_full": QueueFullError, "value": ValueError}.get(kind, RuntimeError)(text)
                pending[2](error)
        ended: list[str] = []
        for rid, finished, error, num_cached, sequences, prompt_logprobs in outputs:
            entry = self._states.get(rid)
            if entry is not None:  # else aborted meanwhile
                entry[0].prompt_logprobs = unpack_prompt_logprobs(prompt_logprobs) or entry[0].prompt_logprobs
                self._apply(rid, entry, finished, error, num_cached, sequences, ended, deliveries)
        for rid, new_ids, cumulative in zip(*deltas):
            entry = self._states.get(rid)
            if entry is not None:
                sequences = [[0, 0, new_ids, None, cumulative, None, None, None]]
                self._apply(rid, entry, False, None, entry[0].num_cached_tokens, sequences, ended, deliveries)
        if ended:
            self.socket.send(pack(["abort", ended]))

    def _apply(self, rid: str, entry: tuple[RequestState, Stream], finished: bool, error: str | None,
               num_cached: int, sequences: list[list[Any]], ended: list[str],
               deliveries: dict[Any, list[tuple[Stream, Any]]]) -> None:
        """One request's output of a step: its state moves on, its stream gets what is due."""
        state, stream = entry
        if state.update(finished, error, num_cached, sequences):
            del self._states[rid]
            self._num_ended += 1
            if not finished:
                ended.append(rid)  # a stop string ended it here: stop the core working on it
        if state.should_emit():
            deliveries.setdefault(stream.loop, []).append((stream, state.output()))

    def _close_sockets(self) -> None:
        """Close the socket and its monitor, and end the context when it is this connection's own
        (in a daemon thread: ending a context waits for its I/O thread, which must never hold us)."""
        self.socket.close(linger=0)
        self.monitor.close(linger=0)
        if self._own_context:
            threading.Thread(target=self.context.term, name="tokenmill-core-client-term", daemon=True).start()

    def _monitor_saw(self, wanted: int) -> bool:
        """Whether the monitor has reported `wanted` (a zmq.EVENT_*), reading its queued events."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return False
            if event["event"] == wanted:
                return True

    def _expire_deadlines(self, deliveries: dict[Any, list[tuple[Stream, Any]]]) -> None:
        now = time.monotonic()
        expired = [rid for rid, (_, s) in self._states.items() if s.deadline is not None and now > s.deadline]
        for rid in expired:
            _, stream = self._states.pop(rid)
            self._num_ended += 1
            deliveries.setdefault(stream.loop, []).append(
                (stream, RequestTimeoutError(f"request {rid} ran past its time limit and was aborted")))
        if expired:
            self.socket.send(pack(["abort", expired]))

    @staticmethod
    def _deliver(deliveries: dict[Any, list[tuple[Stream, Any]]]) -> None:
        for loop, items in deliveries.items():
            items[0][0].put_many(loop, items)
        deliveries.clear()

    def _die(self, reason: str, deliveries: dict[Any, list[tuple[Stream, Any]]]) -> None:
        with self._lock:
            self.dead_reason = reason
        error = EngineDeadError(reason if reason.startswith("the engine") else f"the engine loop died: {reason}")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._num_ended += 1
                command[3](error)
        self._num_ended += len(self._pending_adds) + len(self._states)
        for _, _, done in self._pending_adds.values():
            done(error)
        for _, stream in self._states.values():
            deliveries.setdefault(stream.loop, []).append((stream, error))
        self._pending_adds.clear()
        self._states.clear()
        self._deliver(deliveries)
        self._close_sockets()
        os.close(self._wake_r)
        os.close(self._wake_w)
