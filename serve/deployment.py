"""Ray Serve deployment: one AsyncLLMEngine per replica behind the FastAPI app."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray import serve

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.serve.api import build_app

logger = logging.getLogger(__name__)

APP_NAME = "tokenmill"


@dataclass(frozen=True)
class ServeConfig:
    """How to deploy: the model and engine options, replicas and their resources, HTTP."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling instead of a fixed count
    max_replicas: int | None = None
    num_gpus_per_replica: float | None = None  # None: 1 when CUDA is available, else 0
    num_cpus_per_replica: float = 1.0
    ray_num_cpus: int | None = None  # CPUs given to the local Ray instance (None: all)
    api_key: str | None = None
    served_model_name: str | None = None
    request_timeout_s: float | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # LLMEngine.from_args keywords
    ray_address: str | None = None  # join this Ray cluster ("auto": the running one) instead of a local one
    prefix_routing: bool = False  # serve.router.PrefixAwareRouter instead of Serve's power-of-two router

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas={self.num_replicas} is invalid: allowed an integer >= 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas are invalid: set both (autoscaling) or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas} are invalid: "
                "allowed 0 <= min_replicas <= max_replicas, max_replicas >= 1"
            )
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"max_replicas={self.max_replicas} is invalid: allowed an integer >= 1")
        if self.num_gpus_per_replica is not None and self.num_gpus_per_replica < 0:
            raise ValueError(f"num_gpus_per_replica={self.num_gpus_per_replica} is invalid: allowed a number >= 0")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is invalid: allowed 1..65535")

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine_kwargs.get("max_num_seqs", 64))

    def gpus_per_replica(self) -> float:
        if self.num_gpus_per_replica is not None:
            return self.num_gpus_per_replica
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    """One replica: loads the model into its own engine and serves the OpenAI routes."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLMEngine.from_args(
            config.model, request_timeout_s=config.request_timeout_s, **config.engine_kwargs
        )

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.engine, api_key=self.config.api_key,
                         served_model_name=self.config.served_model_name, replica_id=self.replica_id)

    async def generate_tokens(self, request: Any) -> dict[str, Any]:
        """Deployment-handle route: a `router.PromptRequest` in, tokens and cache counters out."""
        from tokenmill.serve.router import complete_for_handle

        return await complete_for_handle(self.engine, request, self.replica_id)

    def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises."""
        if not self.engine.is_healthy:
            raise RuntimeError(f"engine loop is not running: {self.engine.dead_reason}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=5.0)


def build_application(config: ServeConfig) -> Any:
    """The bound Serve application for `config` (replicas, resources, concurrency limits)."""
    from tokenmill.serve.router import replica_placement, router_options

    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": config.gpus_per_replica(), "num_cpus": config.num_cpus_per_replica},
        **replica_placement(config),  # tensor parallel: a placement group of 1 + N bundles per replica
        **router_options(config),
        # Admit at least a full batch per replica; the engine queues the rest.
        "max_ongoing_requests": max(2 * config.max_num_seqs, 8),
        "health_check_period_s": 10,
    }
    if config.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_num_seqs,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return LLMServer.options(**options).bind(config)


def start(config: ServeConfig) -> str:
    """Start a fresh local Ray instance and the app; returns the base URL once every replica is ready."""
    if config.ray_address is not None:
        ray.init(address=config.ray_address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=config.ray_num_cpus, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def stop() -> None:
    """Shut Serve and Ray down (safe to call twice)."""
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def run_server(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None, block: bool = True) -> str:
    """Serve until Ctrl-C (when `block`), then shut Serve and Ray down cleanly."""
    try:
        url = start(config)
    except BaseException:
        stop()
        raise
    if on_ready is not None:
        on_ready(url)
    if not block:
        return url
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops as cleanly as Ctrl-C
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
            signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Serve and Ray")
    finally:
        stop()
    logger.info("stopped")
    return url


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
