"""The FastAPI app: OpenAI-compatible routes over one AsyncLLMEngine."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.serve.errors import APIError, error_body, error_response, install_error_handlers
from tokenmill.serve.generation import OpenAIServing
from tokenmill.serve.metrics import ServerMetrics
from tokenmill.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

REPLICA_HEADER = "x-tokenmill-replica"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Invalid parameters or unknown fields."),
        (401, "Missing or wrong API key."),
        (404, "Unknown model."),
        (413, "The request body is larger than the server's limit."),
        (429, "The waiting queue is full."),
        (503, "The engine is not running."),
    )
}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


class _ReplicaHeader:
    """Pure ASGI middleware adding the replica id to every response (streaming included)."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class _BodyLimit:
    """Pure ASGI middleware: a request body past `max_bytes` is a 413, found from Content-Length when
    the client sends one (before reading any of it), else while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"The request body is too large: {size} bytes; allowed at most "
                                           f"{self.max_bytes} bytes (the server's --max-request-bytes).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(_as_413(self._too_large(length.decode()))).__call__(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"more than {received}")
            return message

        await self.app(scope, limited_receive, send)


def _as_413(exc: StarletteHTTPException) -> APIError:
    return APIError(413, str(exc.detail), code="request_too_large")


def build_app(engine: AsyncLLMEngine, *, api_key: str | None = None, served_model_name: str | None = None,
              replica_id: str | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """An app serving `engine`; `api_key` guards /v1/*, `replica_id` goes into a response header,
    bodies past `max_request_bytes` get 413."""
    model_name = served_model_name or engine.model_name
    created = int(time.time())
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, model_name=model_name, metrics=metrics)
    bearer = HTTPBearer(auto_error=False, description="Needed when the server runs with --api-key.")

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key.", code="invalid_api_key")

    app = FastAPI(title="tokenmill", version="0.1.0",
                  description="OpenAI-compatible text generation over continuous batching.")
    install_error_handlers(app)
    app.state.engine = engine
    app.state.metrics = metrics
    if replica_id is not None:
        app.add_middleware(_ReplicaHeader, replica_id=replica_id)
    if max_request_bytes is not None:
        app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)

    @app.post("/v1/completions", dependencies=[Depends(check_key)], response_model=None,
              responses={200: {"model": CompletionResponse, "content": _STREAM}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)], response_model=None,
              responses={200: {"model": ChatCompletionResponse, "content": _STREAM}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/v1/models", dependencies=[Depends(check_key)], response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(id=model_name, created=created, root=engine.model_name,
                         max_model_len=engine.max_model_len, kv_cache_capacity_tokens=engine.kv_cache_capacity_tokens,
                         max_num_seqs=engine.max_num_seqs, replica_id=replica_id)
        return ModelList(data=[card])

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        body = error_body(f"The engine is not running: {engine.dead_reason}.", "service_unavailable")
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
