"""One tensor-parallel rank: a Ray actor holding its shard of the model and its share of the KV cache.

Lifecycle (driven by `RayTPExecutor`): `node_address()` on rank 0 gives the rendezvous address,
`init_distributed()` joins the torch.distributed group (gloo on CPU, NCCL on CUDA), `load_model()`
loads and shards the weights and returns how many KV blocks fit in this rank's memory,
`init_cache()` allocates the agreed number, then `execute()` once per step.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.host_memory import keep_freed_memory
from tokenmill.engine.model_runner import ModelRunner, kv_bytes_per_block
from tokenmill.engine.tp_inputs import StepInputs, unpack_step
from tokenmill.engine.tp_sharding import shard_model


class TPWorker:
    def __init__(self, rank: int, world_size: int, num_threads: int | None) -> None:
        self.rank = rank
        self.world_size = world_size
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.runner: ModelRunner | None = None
        self.runner_options: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None
        self.last_forward_s = 0.0

    # ------------------------------------------------------------------ start-up
    def pid(self) -> int:
        return os.getpid()

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port for the process-group rendezvous (asked of rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return host, sock.getsockname()[1]

    def init_distributed(self, address: str, backend: str, timeout_s: float) -> None:
        if backend == "gloo":  # a CPU rank runs the forward on the host: see engine/host_memory.py
            keep_freed_memory()
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes this actor's one GPU as device 0
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))

    def load_model(self, source: Any, device: str, dtype: torch.dtype, cache: Any, runner_options: dict[str, Any]) -> int:
        """Load (a folder path) or receive (a module) the whole model, keep this rank's shard.

        Returns the number of KV blocks this rank can hold.
        """
        attn = register_attention()
        if isinstance(source, str):
            from tokenmill.engine.model_loader import load_model

            model = load_model(source, device="cpu", dtype=dtype, attn_implementation=attn).model
        else:
            model = source
        shard_model(model, self.rank, self.world_size)
        if getattr(model.config, "_attn_implementation", None) != attn:
            model.set_attn_implementation(attn)
        self.model = model.to(device).eval()
        self.runner_options = runner_options  # ModelRunner keywords, the driver's own
        return self._num_kv_blocks(cache, torch.device(device), dtype)

    def _num_kv_blocks(self, cache: Any, device: torch.device, dtype: torch.dtype) -> int:
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = kv_bytes_per_block(self.model.config, cache.block_size, dtype)  # this rank's heads only
        if device.type != "cuda":
            # On the CPU the ranks share host memory: the engine's budget is split between them.
            return max(1, cache.kv_cache_memory_bytes // self.world_size // per_block)
        max_tokens = self.runner_options["max_num_batched_tokens"]
        probe = ModelRunner(self.model, num_blocks=-(-max_tokens // cache.block_size), block_size=cache.block_size,
                            **self.runner_options)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        probe.profile_run(max_tokens, self.runner_options["max_model_len"])
        peak = torch.cuda.max_memory_allocated(device) - sum(c.numel() * c.element_size() for c in probe.k_caches) * 2
        peak += probe.profile_graph_memory()  # every rank captures at once: its all-reduces meet
        del probe
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        return max(0, int(total * cache.gpu_memory_utilization) - peak) // per_block

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=block_size, **self.runner_options)
        self.runner.capture_graphs()  # CUDA and not enforce_eager only

    # ------------------------------------------------------------------ the step
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor | None, float]:
        """Run this rank's shard of the step; rank 0 returns (logits [num_sampled, vocab] float32, forward s)."""
        start = time.perf_counter()
        logits = self.runner.run(unpack_step(inputs))
        self.last_forward_s = time.perf_counter() - start
        return (logits.cpu() if self.rank == 0 else None), self.last_forward_s

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
