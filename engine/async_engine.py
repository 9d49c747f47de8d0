"""AsyncLLMEngine: runs `LLMEngine.step()` in a background thread and streams outputs to asyncio callers.

One thread owns the engine. Callers never touch it: they send commands (add, abort, stop)
through a queue that the thread applies between steps, so engine calls are serialized with
`step()` without holding a lock across a step. Outputs travel back to each request's
asyncio queue with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestTimeoutError(TimeoutError):
    """A request ran past its time limit; it was aborted and its KV blocks freed."""


@dataclass(frozen=True)
class AsyncEngineConfig:
    request_timeout_s: float | None = None  # default limit per request (None: no limit)

    def __post_init__(self) -> None:
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(
                f"request_timeout_s={self.request_timeout_s} is invalid: allowed a number > 0 or None"
            )


class RequestStream:
    """The outputs of one request, as an async iterator.

    Outputs are cumulative, so when the consumer is slower than the engine only the newest
    one is returned (nothing is lost). `abort()` (or `aclose()`) stops the request and frees
    its KV blocks at the next step boundary.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, deadline: float | None,
                 abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() value, read by the loop thread
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self._done = False

    # -- loop-thread side
    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass

    # -- caller side
    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def abort(self) -> None:
        """Stop the request (no-op once finished)."""
        if not self._done:
            self._done = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int]
    params: SamplingParams | None
    future: asyncio.Future


class AsyncLLMEngine:
    """Asyncio front of one `LLMEngine`; safe to use from one or many event loops."""

    def __init__(self, engine: Any, config: AsyncEngineConfig | None = None) -> None:
        self.engine = engine
        self.config = config or AsyncEngineConfig()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # orders "is dead?" checks against the loop's death
        self._streams: dict[str, RequestStream] = {}  # owned by the loop thread
        self._dead: BaseException | None = None
        self._stats = engine.get_stats()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, model: str | None = None, *, request_timeout_s: float | None = None,
                  **engine_kwargs: Any) -> "AsyncLLMEngine":
        from tokenmill.engine.llm_engine import LLMEngine

        config = AsyncEngineConfig(request_timeout_s=request_timeout_s)
        return cls(LLMEngine.from_args(model, **engine_kwargs), config)

    # ------------------------------------------------------------------ public API
    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive() and getattr(self.engine, "is_healthy", True)

    @property
    def dead_reason(self) -> str | None:
        return None if self._dead is None else repr(self._dead)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_cache_capacity_tokens(self) -> int | None:
        return getattr(self.engine, "kv_cache_capacity_tokens", None)

    @property
    def max_num_seqs(self) -> int | None:
        config = getattr(self.engine, "scheduler_config", None)
        return getattr(config, "max_num_seqs", None)

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def get_stats(self) -> Any:
        """The engine's stats after the latest step (read without touching the engine)."""
        return self._stats

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                          *, timeout_s: float | None = None) -> RequestStream:
        """Queue a request; raises what `LLMEngine.add_request` raises (ValueError, QueueFullError)."""
        loop = asyncio.get_running_loop()
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} is invalid: allowed a number > 0")
        # A request may ask for less time than the engine's limit, never more.
        limits = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        limit = min(limits) if limits else None
        deadline = None if limit is None else time.monotonic() + limit
        stream = RequestStream(request_id, loop, deadline, self._abort)
        future = loop.create_future()
        self._submit(_Add(stream, prompt, params, future))
        try:
            await future
        except asyncio.CancelledError:
            self._abort(request_id)  # applied after the add: the queue is FIFO
            raise
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, *, timeout_s: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's (cumulative) outputs; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(request_id or uuid.uuid4().hex, prompt, params, timeout_s=timeout_s)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; requests still in flight end with EngineDeadError."""
        try:
            self._submit(("stop",))
        except EngineDeadError:
            pass
        self._thread.join(timeout_s)
        getattr(self.engine, "shutdown", lambda: None)()  # tensor-parallel workers, if any

    # ------------------------------------------------------------------ caller -> loop
    def _submit(self, command: Any) -> None:
        with self._submit_lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop is not running: {self._dead!r}")
            self._commands.put(command)

    def _abort(self, request_id: str) -> None:
        try:
            self._submit(("abort", request_id))
        except EngineDeadError:
            pass

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    break
                self._expire_deadlines()
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._stats = self.engine.get_stats()
            self._die(EngineDeadError("the engine was shut down"))
        except BaseException as exc:  # noqa: BLE001 - any fault ends the loop; callers must not hang
            logger.exception("engine loop died")
            self._die(exc)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Add):
                self._apply_add(command)
            elif command[0] == "abort":
                stream = self._streams.pop(command[1], None)
                if stream is not None:
                    self.engine.abort_request(command[1])
            elif command[0] == "stop":
                return False
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._stats = self.engine.get_stats()
                return True

    def _apply_add(self, command: _Add) -> None:
        rid = command.stream.request_id
        try:
            if rid in self._streams:
                raise ValueError(f"request_id={rid!r} is invalid: a request with this id is running")
            self.engine.add_request(rid, command.prompt, command.params)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            _resolve(command.future, exc)
            return
        self._streams[rid] = command.stream
        _resolve(command.future, None)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        expired = [s for s in self._streams.values() if s.deadline is not None and now > s.deadline]
        for stream in expired:
            del self._streams[stream.request_id]
            self.engine.abort_request(stream.request_id)
            stream.put(RequestTimeoutError(f"request {stream.request_id} ran past its time limit and was aborted"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)

    def _die(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine loop died: {exc!r}")
        with self._submit_lock:
            self._dead = error
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                _resolve(command.future, error)
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()


def _resolve(future: asyncio.Future, exc: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed
        pass


__all__ = ["AsyncEngineConfig", "AsyncLLMEngine", "EngineDeadError", "RequestStream", "RequestTimeoutError"]
