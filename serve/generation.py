"""The /v1/completions and /v1/chat/completions handlers (streaming and not)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.engine.async_engine import AsyncLLMEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.errors import EngineDeadError, QueueFullError
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.disconnect import ClientDisconnected, SSEResponse, run_unless_disconnected
from tokenmill.serve.errors import APIError, sse_error
from tokenmill.serve.formatting import (
    StreamTracker,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    prompt_only,
    usage_of,
    vllm_prompt_logprobs,
)
from tokenmill.serve.metrics import RequestTimer, ServerMetrics
from tokenmill.serve.params import is_prompt_only, to_sampling_params
from tokenmill.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)


@dataclass
class _Prompt:
    engine_input: str | list[int]
    text: str  # for echo


# apply_chat_template's own arguments: chat_template_kwargs may not override them.
_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, *, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(self.tokenizer)

    # ------------------------------------------------------------------ endpoints
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompts = await self._completion_prompts(body.prompt)
        params = self._params(body)
        job = _Job(self, "cmpl", body, params, body.logprobs)
        await job.start(prompts, body.timeout_s)
        if body.stream:
            return SSEResponse(job.sse(lambda d, tt: self._completion_chunk(job, body, prompts, d, tt)))
        finals = await job.collect(request)
        tt = job.token_text()
        choices = []
        for i, final in enumerate(finals):
            echo = prompts[i].text if body.echo else ""
            scored = vllm_prompt_logprobs(final.prompt_token_ids, final.prompt_logprobs, tt) \
                if body.prompt_logprobs is not None else None
            for out in final.outputs:
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(out, 0, len(out.token_ids), body.logprobs, tt, len(echo))
                    if body.echo:
                        logprobs = join_logprobs(echo_logprobs(final.prompt_token_ids, final.prompt_logprobs,
                                                               body.logprobs, tt), logprobs)
                choices.append(CompletionChoice(index=i * body.n + out.index, text=echo + out.text,
                                                logprobs=logprobs, finish_reason=out.finish_reason,
                                                prompt_logprobs=scored))
        choices.sort(key=lambda c: c.index)
        response = CompletionResponse(id=job.id, created=job.created, model=self.model_name, choices=choices,
                                      usage=usage_of(finals))
        return JSONResponse(response.model_dump())

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = self._params(body)  # first: its 400s name the field before the template runs
        prompts = [await self._chat_prompt(body)]
        k = params.logprobs
        job = _Job(self, "chatcmpl", body, params, k)
        await job.start(prompts, body.timeout_s)
        if body.stream:
            return SSEResponse(job.sse(lambda d, tt: self._chat_chunk(job, d, tt), first=self._chat_first_chunk(job),
                                       num_prompt_tokens=len(prompts[0].engine_input)))
        finals = await job.collect(request)
        tt = job.token_text()
        choices = [
            ChatChoice(index=out.index, message=AssistantMessage(content=out.text),
                       logprobs=chat_logprobs(out, 0, len(out.token_ids), k, tt) if k is not None else None,
                       finish_reason=out.finish_reason)
            for out in finals[0].outputs
        ]
        choices.sort(key=lambda c: c.index)
        scored = vllm_prompt_logprobs(finals[0].prompt_token_ids, finals[0].prompt_logprobs, tt) \
            if body.prompt_logprobs is not None else None
        response = ChatCompletionResponse(id=job.id, created=job.created, model=self.model_name, choices=choices,
                                          usage=usage_of(finals), prompt_logprobs=scored)
        return JSONResponse(response.model_dump())

    # ------------------------------------------------------------------ request preparation
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        if not self.engine.is_healthy:
            raise APIError(503, f"The engine is not running: {self.engine.dead_reason}.")

    def _params(self, body: Any) -> SamplingParams:
        return to_sampling_params(body, defaults=self.engine.default_sampling_params(), vocab_size=self.vocab_size)

    async def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "Invalid value for 'prompt': the list of prompts is empty.", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, item))
                continue
            if len(item) >= self.engine.max_model_len:  # before decoding a text nobody will use
                raise APIError(400, f"Invalid value for 'prompt': prompt has {len(item)} tokens: allowed fewer "
                                    f"than max_model_len ({self.engine.max_model_len}).", param="prompt")
            bad = [t for t in item if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"Invalid value for 'prompt': token ids {bad[:5]} are outside "
                                    f"[0, {self.vocab_size}).", param="prompt")
            text = await self.engine.in_tokenizer_pool(self.tokenizer.decode, item)  # off the event loop
            prompts.append(_Prompt(list(item), text))
        return prompts

    async def _chat_prompt(self, body: ChatCompletionRequest) -> _Prompt:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"The model '{self.model_name}' has no chat template; use /v1/completions.",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        extra = dict(body.chat_template_kwargs or {})
        reserved = sorted(set(extra) & _TEMPLATE_ARGUMENTS)
        if reserved:
            raise APIError(400, f"Invalid value for 'chat_template_kwargs': {reserved} are set by the request itself "
                                f"(use the request fields); allowed other template variables.",
                           param="chat_template_kwargs")
        render = functools.partial(self.tokenizer.apply_chat_template, messages, tokenize=False,
                                   add_generation_prompt=body.add_generation_prompt,
                                   continue_final_message=body.continue_final_message, **extra)
        try:
            text = await self.engine.in_tokenizer_pool(render)  # a long conversation renders off the event loop
        except Exception as exc:  # noqa: BLE001 - template errors are the client's (role order, ...)
            raise APIError(400, f"Invalid value for 'messages': the chat template rejected them: {exc}",
                           param="messages") from exc
        try:  # in the engine's tokenizer pool; a prompt past the context fails early
            ids = await self.engine.encode(text, add_special_tokens=False)
        except ValueError as exc:
            raise APIError(400, f"Invalid value for 'messages': {exc}", param="messages") from exc
        return _Prompt(ids, text)

    # ------------------------------------------------------------------ chunks
    def _completion_chunk(self, job: "_Job", body: CompletionRequest, prompts: list[_Prompt], deltas: list,
                          tt: TokenText) -> dict[str, Any]:
        choices = []
        for d in deltas:
            echo = ""
            first = body.echo and d.token_start == 0 and job.first_delta(d.index)
            if first:
                echo = prompts[d.index // body.n].text
            logprobs = None
            if body.logprobs is not None:
                offset = len(echo) + len(d.output.text) - len(d.text)
                part = completion_logprobs(d.output, d.token_start, d.token_stop, body.logprobs, tt, offset)
                if first:
                    final = job.latest[d.index // body.n]
                    part = join_logprobs(echo_logprobs(final.prompt_token_ids, final.prompt_logprobs, body.logprobs,
                                                       tt), part)
                logprobs = part.model_dump()
            choices.append({"index": d.index, "text": echo + d.text, "logprobs": logprobs,
                            "finish_reason": d.finish_reason})
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": self.model_name,
                "choices": choices}

    def _chat_first_chunk(self, job: "_Job") -> dict[str, Any]:
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(job.n)]
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": self.model_name,
                "choices": choices}

    def _chat_chunk(self, job: "_Job", deltas: list, tt: TokenText) -> dict[str, Any]:
        k = job.logprobs
        choices = []
        for d in deltas:
            logprobs = chat_logprobs(d.output, d.token_start, d.token_stop, k, tt) if k is not None else None
            choices.append({
                "index": d.index,
                "delta": {"content": d.text} if d.text else {},
                "logprobs": logprobs.model_dump() if logprobs is not None else None,
                "finish_reason": d.finish_reason,
            })
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": self.model_name,
                "choices": choices}


class _Job:
    """The engine requests of one API call (one per prompt) and their metrics."""

    def __init__(self, serving: OpenAIServing, prefix: str, body: Any, params: SamplingParams,
                 logprobs: int | None) -> None:
        self.serving = serving
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body = body
        self.n = body.n
        self.prompt_only = is_prompt_only(body)
        self.latest: dict[int, RequestOutput] = {}  # prompt index -> its newest output
        self.params = params
        self.logprobs = logprobs
        self.streams: list[RequestStream] = []
        self.timers: list[RequestTimer] = []
        self._echoed: set[int] = set()

    async def start(self, prompts: list[_Prompt], timeout_s: float | None) -> None:
        engine = self.serving.engine
        try:
            for i, prompt in enumerate(prompts):
                timer = self.serving.metrics.start_request()
                stream = await engine.add_request(f"{self.id}-{i}", prompt.engine_input, self.params,
                                                  timeout_s=timeout_s)
                self.streams.append(stream)
                self.timers.append(timer)  # rejected requests (400/429) stay out of the latency histograms
        except BaseException as exc:
            self.abort()
            error = _as_api_error(exc)
            if error is exc:
                raise
            raise error from exc

    def abort(self) -> None:
        """Abort whatever still runs (no-op for finished requests and finished timers)."""
        for stream in self.streams:
            stream.abort()
        for timer in self.timers:
            timer.finish("abort")

    def token_text(self) -> TokenText:
        return TokenText(self.serving.tokenizer, as_ids=self.body.return_tokens_as_token_ids)

    def first_delta(self, index: int) -> bool:
        if index in self._echoed:
            return False
        self._echoed.add(index)
        return True

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all streams as they come; errors become APIError."""
        try:
            async for i, output in _merge(self.streams):
                if self.prompt_only:
                    output = prompt_only(output)
                self.latest[i] = output
                self.timers[i].on_output(output)
                if output.error is not None or any(o.finish_reason == "error" for o in output.outputs):
                    self.timers[i].finish("error")
                    raise APIError(500, f"The model failed on this request: {output.error or 'unknown error'}")
                if output.finished:
                    reasons = {o.finish_reason for o in output.outputs} or {"stop"}
                    self.timers[i].finish("length" if reasons == {"length"} else "stop")
                yield i, output
        except APIError:
            raise
        except BaseException as exc:
            error = _as_api_error(exc)
            if error is exc:
                raise
            for timer in self.timers:
                timer.finish("error")
            raise error from exc
        finally:
            self.abort()

    async def collect(self, request: Request) -> list[RequestOutput]:
        async def gather() -> list[RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async for i, output in self.outputs():
                finals[i] = output
            return [finals[i] for i in range(len(self.streams))]

        try:
            return await run_unless_disconnected(request.receive, gather())
        except ClientDisconnected:
            self.abort()
            raise APIError(499, "The client closed the connection.", code="client_closed_request") from None

    async def sse(self, make_chunk: Any, first: dict[str, Any] | None = None, num_prompt_tokens: int = 0
                  ) -> AsyncIterator[str]:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options.continuous_usage_stats)
        tracker = StreamTracker(self.n)
        tt = self.token_text()
        finals: dict[int, RequestOutput] = {}

        def extra() -> dict[str, Any]:
            if not include_usage:
                return {}
            if not continuous:
                return {"usage": None}
            if not self.latest:
                return {"usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": 0,
                                  "total_tokens": num_prompt_tokens}}
            return {"usage": usage_of([self.latest[i] for i in sorted(self.latest)]).model_dump()}

        try:
            if first is not None:
                yield _sse({**first, **extra()})
            async for i, output in self.outputs():
                deltas = tracker.deltas(i, output)
                if deltas:
                    yield _sse({**make_chunk(deltas, tt), **extra()})
                if output.finished:
                    finals[i] = output
            if include_usage:
                usage = usage_of([finals[i] for i in sorted(finals)])
                yield _sse({"id": self.id, "object": _chunk_object(self.id), "created": self.created,
                            "model": self.serving.model_name, "choices": [], "usage": usage.model_dump()})
        except APIError as exc:
            yield sse_error(exc)
        finally:
            self.abort()
        yield "data: [DONE]\n\n"


def _chunk_object(job_id: str) -> str:
    return "chat.completion.chunk" if job_id.startswith("chatcmpl") else "text_completion"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, (APIError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit)):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is busy: {exc}. Retry later.", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    if isinstance(exc, RequestTimeoutError):
        return APIError(408, str(exc), param="timeout_s", code="request_timeout")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=_param_from_message(str(exc)))
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}")


def _param_from_message(message: str) -> str | None:
    for name in ("max_tokens", "max_new_tokens", "prompt", "n", "num_beams", "num_return_sequences"):
        if name in message:
            return {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}.get(name, name)
    return None


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams; one stream is iterated directly."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
            await queue.put((i, done))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
