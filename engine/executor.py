"""RayTPExecutor: tensor parallelism over Ray actors, with the same `run(batch) -> logits` as ModelRunner.

The scheduler, block manager and outputs stay in the driver (the engine). Each step the executor
packs the batch into one `StepInputs` message and hands it to every rank's `execute`; the ranks run
their shards (all-reduces inside the forward) and rank 0 returns the logits. On GPU ranks the
message travels through a Ray compiled graph (shared-memory channels set up once: a round trip of
~0.5 ms against ~2 ms for a Ray task per rank, measured without a model); on CPU ranks, and where the
graph cannot be compiled, as one Ray task per rank (a few KB inlined in the task, a large one put in
the object store once): the graph's channels poll while they wait, which on a CPU host takes the
cores the ranks compute on (2x the CPU seconds, slower steps on 2 cores; BENCHMARKS.md). A dead worker
or a step past `step_timeout_s` marks the executor dead: that step and every later one raise
`ExecutorDeadError` at once, nothing waits forever.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from tokenmill.engine.config import CacheConfig, ParallelConfig
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.tp_inputs import pack_step
from tokenmill.engine.tp_sharding import check_tensor_parallel
from tokenmill.engine.tp_worker import TPWorker

logger = logging.getLogger(__name__)

# A message up to this size travels inside the task itself (Ray inlines small arguments); a larger one
# goes to the object store once and every rank reads it from there.
INLINE_MESSAGE_BYTES = 64 * 1024


class ExecutorDeadError(RuntimeError):
    """A tensor-parallel worker died or stopped answering; the engine cannot run steps any more."""


class RayTPExecutor:
    def __init__(self, parallel: ParallelConfig, cache: CacheConfig, *, model_source: Any, device: torch.device,
                 dtype: torch.dtype, model_config: Any, runner_options: dict[str, Any]) -> None:
        """`runner_options`: each rank's ModelRunner keywords (max_num_seqs, max_num_batched_tokens,
        max_model_len, enforce_eager)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group  # noqa: F401

        check_tensor_parallel(model_config, parallel.tensor_parallel_size)
        self.parallel = parallel
        self.world_size = parallel.tensor_parallel_size
        self.dead_reason: str | None = None
        self.owns_ray = False
        self.placement_group = None
        self.workers: list[Any] = []
        self.last_overhead_s = 0.0  # driver-observed step time minus rank 0's forward, latest step
        self.total_overhead_s = 0.0
        self.num_steps = 0
        self.step_graph = None  # the compiled graph over the ranks' `execute`, once the ranks are ready
        if not ray.is_initialized():
            ray.init(address=parallel.ray_address, include_dashboard=False, log_to_driver=True)
            self.owns_ray = True
        try:
            self._start_workers(device, dtype)
            self.num_blocks = self._load(model_source, device, dtype, cache, runner_options)
            self.set_step_messages("graph" if device.type == "cuda" else "tasks")
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start-up
    def _start_workers(self, device: torch.device, dtype: torch.dtype) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cuda = device.type == "cuda"
        resources = {"num_gpus": 1, "num_cpus": self.parallel.worker_num_cpus} if cuda else \
            {"num_gpus": 0, "num_cpus": self.parallel.worker_num_cpus}
        group = get_current_placement_group()
        first_bundle = 1  # a Serve replica holds bundle 0 of its group; the ranks take the next N
        if group is None or len(group.bundle_specs) < self.world_size + 1:
            bundle = {"CPU": self.parallel.worker_num_cpus, **({"GPU": 1} if cuda else {})}
            group = placement_group([bundle] * self.world_size, strategy="STRICT_PACK")  # one node
            self.placement_group = group
            first_bundle = 0
            try:
                ray.get(group.ready(), timeout=self.parallel.startup_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"tensor_parallel_size={self.world_size} needs {self.world_size} x {bundle} in the Ray cluster; "
                    f"not available within {self.parallel.startup_timeout_s:.0f} s (cluster: {ray.cluster_resources()})"
                ) from None
        actor = ray.remote(TPWorker)
        threads = self.parallel.worker_num_threads
        self.workers = [
            actor.options(
                **resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first_bundle + r),
            ).remote(r, self.world_size, threads)
            for r in range(self.world_size)
        ]
        host, port = self._get(self.workers[0].node_address.remote(), self.parallel.startup_timeout_s)
        backend = "nccl" if cuda else "gloo"
        self._get([w.init_distributed.remote(f"{host}:{port}", backend, self.parallel.step_timeout_s)
                   for w in self.workers], self.parallel.startup_timeout_s)
        self.worker_pids = self._get([w.pid.remote() for w in self.workers], self.parallel.startup_timeout_s)

    def _load(self, source: Any, device: torch.device, dtype: torch.dtype, cache: CacheConfig,
              runner_options: dict[str, Any]) -> int:
        import ray

        if not isinstance(source, str):
            source = ray.put(source)  # one copy in the object store, read by every rank
        worker_device = "cuda" if device.type == "cuda" else "cpu"
        blocks = self._get([w.load_model.remote(source, worker_device, dtype, cache, runner_options)
                            for w in self.workers], self.parallel.startup_timeout_s)
        num_blocks = min(blocks)
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache on some rank (blocks per rank: {blocks})")
        # Every rank at once: with CUDA graphs on, each captures its decode graphs, whose
        # all-reduces the others must join.
        self._get([w.init_cache.remote(num_blocks, cache.block_size) for w in self.workers],
                  self.parallel.startup_timeout_s)
        return num_blocks

    def set_step_messages(self, kind: str) -> str:
        """How each step reaches the ranks: "graph" (a Ray compiled graph) or "tasks" (a Ray task per
        rank). Returns the kind in use: "tasks" when a graph cannot be compiled."""
        if kind not in ("graph", "tasks"):
            raise ValueError(f"step messages {kind!r} are invalid: allowed 'graph', 'tasks'")
        if kind == "tasks" and self.step_graph is not None:
            graph, self.step_graph = self.step_graph, None
            graph.teardown()
        if kind == "graph" and self.step_graph is None:
            self.step_graph = self._compile_step_graph()
        return "graph" if self.step_graph is not None else "tasks"

    def _compile_step_graph(self) -> Any:
        """The ranks' `execute` as one Ray compiled graph, or None (a task per rank) where it fails."""
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as message:
                graph = MultiOutputNode([w.execute.bind(message) for w in self.workers])
            return graph.experimental_compile()
        except Exception as exc:  # noqa: BLE001 - an older Ray or an unsupported setup: tasks still work
            logger.warning("tensor parallel: no compiled graph (%s: %s); one Ray task per rank per step",
                           type(exc).__name__, exc)
            return None

    # ------------------------------------------------------------------ the step
    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num_sampled, vocab] (float32) from rank 0, as ModelRunner.run."""
        if self.dead_reason is not None:
            raise ExecutorDeadError(f"the tensor-parallel executor is dead: {self.dead_reason}")
        import ray

        start = time.perf_counter()
        message = pack_step(batch)
        if self.step_graph is not None:
            graph = self.step_graph
            results = self._get(lambda: graph.execute(message), self.parallel.step_timeout_s)
        else:
            if message.nbytes > INLINE_MESSAGE_BYTES:
                message = ray.put(message)  # once in the object store, read by every rank
            results = self._get(lambda: [w.execute.remote(message) for w in self.workers], self.parallel.step_timeout_s)
        logits, forward_s = results[0]
        self.last_overhead_s = max(0.0, time.perf_counter() - start - forward_s)
        self.total_overhead_s += self.last_overhead_s
        self.num_steps += 1
        return logits

    def _get(self, refs: Any, timeout_s: float) -> Any:
        """ray.get that turns a dead actor or a timeout into ExecutorDeadError (and remembers it).
        ``refs`` may be a callable that submits the work: a compiled graph whose rank died between
        steps fails at submission already."""
        import ray

        try:
            if callable(refs):
                refs = refs()
            if isinstance(refs, list) and all(isinstance(r, ray.ObjectRef) for r in refs):
                # Wait for whichever rank answers first, so one dead rank fails the step at once
                # instead of after the collective timeout of the ranks still waiting for it. (A
                # compiled graph's references: Ray's monitor fails them when a rank dies.)
                deadline = time.monotonic() + timeout_s
                pending = refs
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                    if not ready:
                        raise ray.exceptions.GetTimeoutError()
                    ray.get(ready)  # raises this rank's error, if any
            return ray.get(refs, timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, TimeoutError):
            self.dead_reason = f"a tensor-parallel worker did not answer within {timeout_s:.0f} s"
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:  # channel: the graph saw it
            self.dead_reason = f"a tensor-parallel worker died ({type(exc).__name__})"
        except ray.exceptions.RayTaskError as exc:
            self.dead_reason = f"a tensor-parallel worker failed: {exc.cause!r}"
        logger.error("tensor-parallel executor dead: %s", self.dead_reason)
        self._kill_workers()  # the survivors may be stuck in a collective: free them and their memory
        raise ExecutorDeadError(self.dead_reason)

    # ------------------------------------------------------------------ shutdown
    def _kill_workers(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        # The graph after its ranks: its teardown waits for the ranks' loops, and a survivor stuck
        # in a collective with a dead rank would hold it until the collective timed out.
        graph, self.step_graph = self.step_graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:  # noqa: BLE001 - torn down already (Ray's monitor, on a rank's death)
                pass

    def shutdown(self) -> None:
        """Kill the workers and release their placement group (safe to call twice)."""
        import ray

        if not ray.is_initialized():
            return
        self._kill_workers()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001 - already removed
                pass
            self.placement_group = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def make_executor(config: Any, loaded: Any, device: torch.device, dtype: torch.dtype, scheduler: Any,
                  enforce_eager: bool) -> RayTPExecutor:
    """The executor for an engine config with tensor_parallel_size > 1.

    Each rank loads the model's folder itself when there is one (a converted GGUF model has one in the
    cache); a model built in memory (tests, notebooks) is shipped once through the object store.
    """
    from pathlib import Path

    path = loaded.model_path
    source: Any = path if path and (Path(path) / "config.json").is_file() else loaded.model
    return RayTPExecutor(config.parallel, config.cache, model_source=source, device=device, dtype=dtype,
                         model_config=loaded.model.config,
                         runner_options=dict(max_num_seqs=scheduler.max_num_seqs,
                                             max_num_batched_tokens=scheduler.max_num_batched_tokens,
                                             max_model_len=scheduler.max_model_len, enforce_eager=enforce_eager))
