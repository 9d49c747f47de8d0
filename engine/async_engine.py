"""AsyncLLMEngine: the asyncio front of one or more engine cores.

The engine core (serve/engine_core.py) runs `LLMEngine.step()` in a loop and speaks token ids
over ZMQ. This front does the rest on the caller's side: tokenization (in a worker pool, so a
huge prompt never blocks other requests), early length checks, detokenization and stop strings
(serve/engine_core_outputs.py), time limits, and per-request async streams.

`AsyncLLMEngine.from_args(...)` starts a core in a thread of this process (one process, as the
tests and a plain script use it); `AsyncLLMEngine.connect(addresses)` talks to cores running
elsewhere (their own processes: the Ray Serve layout). Requests go to the live core with the
fewest requests in flight, or with `prefix_routing` to the core that was sent the prompt's prefix
(serve/core_routing.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.core_routing import CoreRouter
from tokenmill.serve.engine_core_client import CoreConnection, RequestTimeoutError
from tokenmill.serve.engine_core_outputs import RequestState

# Past this many characters a prompt is first measured on a prefix: a prompt far over the context
# is rejected after tokenizing about max_model_len tokens of it, not all of it.
_PREFIX_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class AsyncEngineConfig:
    request_timeout_s: float | None = None  # default limit per request (None: no limit)
    stream_interval: int = 1  # wake a stream's consumer every this many tokens (and at the end)
    tokenizer_workers: int = 2  # threads that tokenize prompts
    prefix_routing: bool = False  # several cores: prompts sharing a prefix go to the core caching it
    core_token: str | None = None  # the secret the cores were started with (tcp cores: see EngineCore)

    def __post_init__(self) -> None:
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(
                f"request_timeout_s={self.request_timeout_s} is invalid: allowed a number > 0 or None"
            )
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise ValueError(f"stream_interval={self.stream_interval} is invalid: allowed an integer >= 1")
        if self.tokenizer_workers < 1:
            raise ValueError(f"tokenizer_workers={self.tokenizer_workers} is invalid: allowed an integer >= 1")


class RequestStream:
    """The outputs of one request, as an async iterator.

    Outputs are cumulative, so when the consumer is slower than the engine only the newest
    one is returned (nothing is lost). `abort()` (or `aclose()`) stops the request and frees
    its KV blocks at the core's next step boundary.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, deadline: float | None,
                 abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() value, read by the I/O thread
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self._done = False
        self.core_id: str | None = None  # the engine core running it

    # -- I/O-thread side: one wake-up of `loop` for all its streams' outputs of a step
    @staticmethod
    def put_many(loop: asyncio.AbstractEventLoop, items: list[tuple["RequestStream", Any]]) -> None:
        def deliver() -> None:
            for stream, item in items:
                stream._queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(deliver)
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


class AsyncLLMEngine:
    """Asyncio front of engine cores; safe to use from one or many event loops."""

    def __init__(self, cores: list[CoreConnection], config: AsyncEngineConfig | None = None, *,
                 local_cores: list[Any] | None = None) -> None:
        if not cores:
            raise ValueError("cores is empty: allowed at least one engine core connection")
        self.config = config or AsyncEngineConfig()
        self.cores = list(cores)
        self._local_cores = local_cores or []  # cores running in this process (stopped with it)
        info = cores[0].info
        self.tokenizer = info["tokenizer"]
        self.model_name: str = info["model_name"]
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.max_num_seqs: int | None = info["max_num_seqs"]
        self._default_params: SamplingParams = info["default_sampling_params"]
        # Prefix blocks as the cores cache them (block_size tokens each).
        self._core_router = CoreRouter(self.config.prefix_routing, block_tokens=info.get("block_size", 16))
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.tokenizer_workers,
                                                           thread_name_prefix="tokenmill-tokenize")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, model: str | None = None, *, request_timeout_s: float | None = None,
                  stream_interval: int = 1, **engine_kwargs: Any) -> "AsyncLLMEngine":
        """An engine core in a thread of this process (transport: ZMQ inproc), and its front."""
        from tokenmill.engine.llm_engine import LLMEngine
        from tokenmill.serve.engine_core import EngineCore

        config = AsyncEngineConfig(request_timeout_s=request_timeout_s, stream_interval=stream_interval)
        return cls.from_engine(LLMEngine.from_args(model, **engine_kwargs), config)

    @classmethod
    def from_engine(cls, engine: Any, config: AsyncEngineConfig | None = None) -> "AsyncLLMEngine":
        """A front for an `LLMEngine` built by the caller: its core runs in a thread of this process."""
        from tokenmill.serve.engine_core import EngineCore

        core = EngineCore(engine, bind=f"inproc://tokenmill-core-{uuid.uuid4().hex}")
        core.start()
        try:
            connection = CoreConnection(core.address, context=core.context)
        except BaseException:
            core.shutdown()
            raise
        return cls([connection], config, local_cores=[core])

    @classmethod
    def connect(cls, addresses: list[str], config: AsyncEngineConfig | None = None) -> "AsyncLLMEngine":
        """A front for engine cores already running at `addresses` (tcp://host:port)."""
        connections: list[CoreConnection] = []
        try:
            for address in addresses:
                connections.append(CoreConnection(address, token=(config or AsyncEngineConfig()).core_token))
        except BaseException:
            for c in connections:
                c.close()
            raise
        return cls(connections, config)

    def replace_core(self, index: int, address: str, connect_timeout_s: float = 60.0) -> None:
        """Connect to the replacement of a dead core (`index` into `cores`)."""
        old = self.cores[index]
        if old.is_alive:
            raise RuntimeError(f"core {index} at {old.address} is alive: nothing to replace")
        self.cores[index] = CoreConnection(address, token=self.config.core_token, connect_timeout_s=connect_timeout_s)

    # ------------------------------------------------------------------ public API
    @property
    def engine(self) -> Any:
        """The LLMEngine, when its core runs in this process (tests reach into it); else None."""
        return self._local_cores[0].engine if self._local_cores else None

    @property
    def is_healthy(self) -> bool:
        engines = [core.engine for core in self._local_cores]  # tensor-parallel workers report here
        return all(c.is_alive for c in self.cores) and all(getattr(e, "is_healthy", True) for e in engines)

    @property
    def dead_reason(self) -> str | None:
        reasons = [c.dead_reason or "its connection stopped" for c in self.cores if not c.is_alive]
        return "; ".join(reasons) if reasons else None

    @property
    def kv_cache_capacity_tokens(self) -> int | None:
        return sum(c.info["kv_cache_capacity_tokens"] for c in self.cores)

    def default_sampling_params(self) -> SamplingParams:
        return self._default_params

    def get_stats(self) -> Any:
        """The cores' stats after their latest step, summed (kv_cache_usage: the mean)."""
        stats = [c.stats for c in self.cores]
        total = {k: sum(s[k] for s in stats) for k in stats[0]}
        total["kv_cache_usage"] = total["kv_cache_usage"] / len(stats)
        return SimpleNamespace(**total)

    async def in_tokenizer_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the tokenizer worker pool (prompt work that must not block the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenize in the worker pool; a prompt longer than the context fails (ValueError) as soon as
        a prefix of it is known to be too long."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        limit = self.max_model_len
        prefix_chars = limit * _PREFIX_CHARS_PER_TOKEN
        if len(text) > prefix_chars:
            num_prefix_tokens = len(self.tokenizer.encode(text[:prefix_chars], add_special_tokens=False))
            if num_prefix_tokens > limit + 8:  # cutting the text may merge a few tokens at the cut, never many
                raise ValueError(f"prompt has more than {limit} tokens ({len(text)} characters; the first "
                                 f"{prefix_chars} alone are {num_prefix_tokens} tokens): allowed fewer than "
                                 f"max_model_len ({limit})")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens) if text else []

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                          *, timeout_s: float | None = None) -> RequestStream:
        """Queue a request; raises ValueError (bad prompt or params), QueueFullError, EngineDeadError."""
        loop = asyncio.get_running_loop()
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} is invalid: allowed a number > 0")
        params = params or self._default_params
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = await self.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self._check_prompt(token_ids, params)
        # A request may ask for less time than the engine's limit, never more.
        limits = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        deadline = None if not limits else time.monotonic() + min(limits)
        core = self._pick_core(token_ids)
        stream = RequestStream(request_id, loop, deadline, core.abort)
        stream.core_id = core.info["core_id"]  # which core runs it (routing benchmarks, logs)
        state = RequestState(request_id, text, token_ids, params, self.tokenizer, self.config.stream_interval)
        future = loop.create_future()
        core.add(state, stream, lambda error: _resolve(future, error))
        try:
            await future
        except asyncio.CancelledError:
            core.abort(request_id)  # applied after the add: the command queue is FIFO
            raise
        return stream

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own prompt checks, made before anything is queued."""
        if not token_ids:
            raise ValueError("prompt is empty: allowed a non-empty string or list of token ids")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens: allowed fewer than max_model_len "
                             f"({self.max_model_len})")
        max_new = params.max_tokens_for(len(token_ids))
        if max_new is not None and len(token_ids) + max_new > self.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_new_tokens ({max_new}) = "
                             f"{len(token_ids) + max_new} exceeds max_model_len ({self.max_model_len})")

    def _pick_core(self, token_ids: list[int]) -> CoreConnection:
        if not any(c.is_alive for c in self.cores):
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")
        return self._core_router.pick(self.cores, token_ids)

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
        for core in self.cores:
            core.abort(request_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the cores started here and the connections; requests in flight end with EngineDeadError."""
        for core in self._local_cores:
            core.shutdown(timeout_s)
        for connection in self.cores:
            connection.close("the engine was shut down")
        self._pool.shutdown(wait=False, cancel_futures=True)


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
