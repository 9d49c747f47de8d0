"""Serve-test fixtures: the default model loaded once, engines on it, in-process uvicorn servers."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

# Small limits keep every request short on CPU.
MAX_MODEL_LEN = 256
ENGINE_KWARGS: dict[str, Any] = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8, "max_num_batched_tokens": 512}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_engine(loaded: Any = None, request_timeout_s: float | None = None, **overrides: Any) -> Any:
    from tokenmill.engine.async_engine import AsyncLLMEngine

    kwargs = {**ENGINE_KWARGS, **overrides}
    if loaded is not None:
        kwargs["loaded"] = loaded
    return AsyncLLMEngine.from_args(None, request_timeout_s=request_timeout_s, **kwargs)


@pytest.fixture(scope="session")
def loaded_model() -> Any:
    """The default model, loaded once (as the engine loads it) for every engine of the session."""
    from tokenmill.engine.attention_backend import register_attention
    from tokenmill.engine.model_loader import load_model

    return load_model(None, attn_implementation=register_attention())


class LiveServer:
    """uvicorn serving an app in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)


def serve_app(app: Any) -> LiveServer:
    return LiveServer(app)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def engine(loaded_model: Any) -> Iterator[Any]:
    eng = make_engine(loaded_model, max_waiting_requests=4)
    yield eng
    eng.shutdown()
