"""Ray Serve layout: engine-core replicas hold the devices; API replicas (no GPU) serve HTTP.

    HTTP -> Serve proxy -> LLMServer (api_replicas of them: FastAPI, tokenization, detokenization, SSE)
                              \__ ZMQ/msgpack __ EngineCore (one per num_replicas: model, device, step loop)

Every API replica connects to every engine core and sends each request to the core with the
fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray import serve

from tokenmill.engine.async_engine import AsyncEngineConfig, AsyncLLMEngine
from tokenmill.serve.api import build_app
from tokenmill.serve.engine_core import STALLED_LOOP_S

logger = logging.getLogger(__name__)

APP_NAME = "tokenmill"


@dataclass(frozen=True)
class ServeConfig:
    """How to deploy: the model and engine options, replicas and their resources, HTTP."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1  # engine cores (each holds a device)
    api_replicas: int = 1  # API replicas sharing the cores
    min_replicas: int | None = None  # with max_replicas: autoscale the API replicas instead of a fixed count
    max_replicas: int | None = None
    num_gpus_per_replica: float | None = None  # per engine core; None: 1 when CUDA is available, else 0
    num_cpus_per_replica: float = 1.0  # per engine core (Ray sets its OMP_NUM_THREADS from it)
    num_cpus_per_api_replica: float = 0.5
    max_request_bytes: int = 1024**2  # request bodies past this get HTTP 413
    stream_interval: int = 1  # tokens per SSE chunk at most (vLLM's name); more coalesce under load
    ray_num_cpus: int | None = None  # CPUs given to the local Ray instance (None: all)
    api_key: str | None = None
    served_model_name: str | None = None
    request_timeout_s: float | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # LLMEngine.from_args keywords
    ray_address: str | None = None  # join this Ray cluster ("auto": the running one) instead of a local one
    prefix_routing: bool = False  # serve.router.PrefixAwareRouter instead of Serve's power-of-two router
    # The engine cores listen on the node's address: only clients that know this secret (the API
    # replicas get it with their config) may submit requests. Fresh for every deployment.
    core_token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas={self.num_replicas} is invalid: allowed an integer >= 1")
        if self.api_replicas < 1:
            raise ValueError(f"api_replicas={self.api_replicas} is invalid: allowed an integer >= 1")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={self.max_request_bytes} is invalid: allowed an integer >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval={self.stream_interval} is invalid: allowed an integer >= 1")
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


@serve.deployment(name="EngineCore")
class EngineCoreServer:
    """One engine core: the model, the device and the step loop (serve/engine_core.py), nothing else.

    It serves no HTTP; API replicas connect to `address()` over ZMQ. Serve health-checks it and
    replaces it when its loop dies or its process is killed.
    """

    def __init__(self, config: ServeConfig) -> None:
        from tokenmill.engine.llm_engine import LLMEngine
        from tokenmill.serve.engine_core import EngineCore

        replica_id = serve.get_replica_context().replica_id.unique_id
        engine = LLMEngine.from_args(config.model, **config.engine_kwargs)
        engine.warm_up()  # first-use costs before the first request, not during it
        host = ray.util.get_node_ip_address()
        self.core = EngineCore(engine, bind=f"tcp://{host}:*", core_id=replica_id, token=config.core_token).start()
        logger.info("engine core %s at %s", replica_id, self.core.address)

    def address(self) -> tuple[str, str]:
        """(ZMQ address, core id): a new core has a new id. Raises while this core is dead (the
        API replicas wait for its replacement)."""
        self.check_health()
        return self.core.address, self.core.core_id

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.core.engine.get_stats())

    def check_health(self) -> None:
        if not self.core.is_alive:
            raise RuntimeError(f"engine core loop is not running: {self.core.dead_reason}")
        stalled = self.core.stalled_for
        if stalled > STALLED_LOOP_S:  # alive but stuck: Serve replaces it, as a dead one
            if not getattr(self, "_stall_logged", False):
                self._stall_logged = True
                logger.error("engine core %s: its loop has not come round for %.0f s; it is at:\n%s",
                             self.core.core_id, stalled, self.core.loop_stack())
            raise RuntimeError(f"engine core loop stalled for {stalled:.0f} s outside a step")

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown(timeout_s=5.0)


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer:
    """One API replica (no GPU): HTTP, tokenization, detokenization and SSE for the engine cores it
    connects to. When a core dies its requests fail at once; the health check reconnects to the
    core's replacement as soon as Serve has started it."""

    def __init__(self, config: ServeConfig, cores: list[Any]) -> None:
        self.config = config
        self.core_handles = cores
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine: AsyncLLMEngine | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        addresses = [(await handle.address.remote())[0] for handle in self.core_handles]
        engine_config = AsyncEngineConfig(request_timeout_s=self.config.request_timeout_s,
                                          stream_interval=self.config.stream_interval,
                                          prefix_routing=self.config.prefix_routing,
                                          core_token=self.config.core_token)
        self.engine = await asyncio.to_thread(AsyncLLMEngine.connect, addresses, engine_config)
        return build_app(self.engine, api_key=self.config.api_key, served_model_name=self.config.served_model_name,
                         replica_id=self.replica_id, max_request_bytes=self.config.max_request_bytes)

    async def check_health(self) -> None:
        """Never fails for a dead core (Serve replaces the core, not this replica): reconnects instead."""
        if self.engine is None:
            return
        for index, connection in enumerate(self.engine.cores):
            if connection.is_alive:
                continue
            try:
                address, core_id = await asyncio.wait_for(self.core_handles[index].address.remote(), 5.0)
            except Exception:  # noqa: BLE001 - the replacement is not up yet; /health answers 503 meanwhile
                continue
            # A live core answered: its replacement, or the same core when only this side's
            # connection failed. Either way, connect again (within the health check's own time limit).
            try:
                await asyncio.to_thread(self.engine.replace_core, index, address, 5.0)
            except Exception as exc:  # noqa: BLE001 - it died meanwhile: try again at the next check
                logger.warning("API replica %s: could not connect to the engine core %s: %s", self.replica_id,
                               core_id, exc)
                continue
            logger.info("API replica %s: connected to the engine core %s", self.replica_id, core_id)

    async def generate_tokens(self, request: Any) -> dict[str, Any]:
        """Deployment-handle route: a `router.PromptRequest` in, tokens and cache counters out."""
        from tokenmill.serve.router import complete_for_handle

        return await complete_for_handle(self.engine, request, self.replica_id)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=5.0)


def build_application(config: ServeConfig) -> Any:
    """The bound Serve application: `num_replicas` engine cores, `api_replicas` API replicas sharing them."""
    from tokenmill.serve.router import replica_placement, router_options

    shutdown = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 2}
    core_options = {
        "ray_actor_options": {"num_gpus": config.gpus_per_replica(), "num_cpus": config.num_cpus_per_replica},
        **replica_placement(config),  # tensor parallel: a placement group of 1 + N bundles per core
    }
    cores = [
        EngineCoreServer.options(
            name="EngineCore" if i == 0 else f"EngineCore{i}", num_replicas=1,
            health_check_period_s=2, health_check_timeout_s=30, **core_options, **shutdown,
        ).bind(config)
        for i in range(config.num_replicas)
    ]
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": 0, "num_cpus": config.num_cpus_per_api_replica},
        **router_options(config),
        # Admit at least a full batch of every core per replica; the cores queue the rest.
        "max_ongoing_requests": max(2 * config.max_num_seqs * config.num_replicas, 8),
        "health_check_period_s": 1, **shutdown,
    }
    if config.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.max_num_seqs,
        }
    else:
        options["num_replicas"] = config.api_replicas
    return LLMServer.options(**options).bind(config, cores)


def start(config: ServeConfig, *, handle_signals: bool = False) -> str:
    """Start Ray (a fresh local instance, or the cluster at `config.ray_address`) and the app; returns
    the base URL once every replica is ready.

    With `handle_signals`, SIGTERM (and SIGINT when a shell ignored it) raise KeyboardInterrupt in
    the main thread from the moment Ray is up (ray.init installs handlers of its own).
    """
    if config.ray_address is not None:
        ray.init(address=config.ray_address, log_to_driver=True)
    else:
        # Ray starts its workers at nice 15: the engine cores' step loops would yield the CPU to every
        # other process on the machine. Workers of the local instance run at normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=config.ray_num_cpus, include_dashboard=False, log_to_driver=True)
    if handle_signals:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops as cleanly as Ctrl-C
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
            signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def stop(timeout_s: float = 5.0) -> None:
    """Shut Serve and Ray down (safe to call twice), in bounded time.

    When the whole process group got SIGTERM (systemd's default), Serve's controller is already
    gone and would be waited for 30 s: give it `timeout_s`, then stop Ray, which ends every
    process it started.
    """
    try:
        if ray.is_initialized():
            _shutdown_serve(timeout_s)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _shutdown_serve(timeout_s: float) -> None:
    """serve.shutdown() with a bound on the wait for the controller."""
    from ray.serve.context import _check_cached_client_alive, _disconnect

    client, _ = _check_cached_client_alive()  # None when the controller is gone already
    if client is not None:
        client.shutdown(timeout_s=timeout_s)
    _disconnect()


def run_server(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None, block: bool = True) -> str:
    """Serve until Ctrl-C or SIGTERM (when `block`), then stop Serve and Ray within STOP_TIMEOUT_S."""
    handle_signals = block and threading.current_thread() is threading.main_thread()
    try:
        url = start(config, handle_signals=handle_signals)
        if on_ready is not None:
            on_ready(url)
        if not block:
            return url
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Serve and Ray")
        stop_within(STOP_TIMEOUT_S)
        logger.info("stopped")
        # Everything Ray started is gone; its exit hooks would still spend seconds on it: exit now.
        logging.shutdown()
        os._exit(0)
    except BaseException:
        stop_within(STOP_TIMEOUT_S)
        raise


STOP_TIMEOUT_S = 7.0


def stop_within(timeout_s: float) -> bool:
    """Stop Serve and Ray gracefully if that fits in `timeout_s`, then end whatever Ray started that is left.

    The processes to end are this process's descendants when the stop begins: Ray's node processes
    and the workers they started (engine cores, API replicas, proxy, controller). Stopping the
    whole process group signals them too, and some then never answer a graceful stop.
    Returns True when the graceful stop finished on its own.
    """
    import psutil

    started = time.monotonic()
    processes = psutil.Process().children(recursive=True)
    graceful = threading.Thread(target=stop, kwargs={"timeout_s": max(timeout_s / 3, 1.0)}, daemon=True)
    graceful.start()
    graceful.join(max(timeout_s - 2.0, 1.0))
    left = [p for p in processes if p.is_running()]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=max(timeout_s - (time.monotonic() - started), 1.0))
    if left:
        logger.info("ended %d Ray processes that outlived the graceful stop", len(left))
    return not graceful.is_alive() and not left


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
