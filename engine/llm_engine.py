"""LLMEngine: requests in, one schedule -> run -> update step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Iterable

import torch

from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from tokenmill.engine.cpu_linear import restore_linear, use_small_rows_linear
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.errors import QueueFullError
from tokenmill.engine.executor import make_executor
from tokenmill.engine.host_memory import keep_freed_memory
from tokenmill.engine.model_loader import LoadedModel, load_model
from tokenmill.engine.model_runner import ModelRunner, kv_bytes_per_block, resolve_enforce_eager
from tokenmill.engine.output_processor import request_output
from tokenmill.engine.quantization import check_quantization, check_quantization_fits, model_quantization
from tokenmill.engine.outputs import RequestOutput, TokenDeltas
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import ScheduledBatch, Scheduler, group_max_seqs
from tokenmill.engine.sequence import SequenceGroup
from tokenmill.engine.step_update import StepUpdater
from tokenmill.engine.structured_output import StructuredOutputManager
from tokenmill.engine.threads import configure_threads

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 4096


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_hit_blocks_total: int


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed 'auto', {', '.join(map(repr, names))}")
    return dev, names[dtype]


def resolve_async_scheduling(async_scheduling: bool | None, device: torch.device, tensor_parallel: bool) -> bool:
    """None means the device's default: overlapped steps on one CUDA device, where the host builds
    step N+1 while the GPU runs step N (1.16x the output tok/s of synchronous steps on the H200's
    1B workload, BENCHMARKS.md); synchronous on the CPU, where host and forward share the cores and
    nothing overlaps, and under tensor parallelism, which does not support overlap."""
    if async_scheduling is None:
        return device.type == "cuda" and not tensor_parallel
    return bool(async_scheduling)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        threads = configure_threads(config.model.num_threads)
        device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
        if device.type == "cpu":
            keep_freed_memory()
        check_quantization(config.model.quantization, device if loaded is None else None)
        tensor_parallel = config.parallel.tensor_parallel_size > 1
        if tensor_parallel and config.scheduler.async_scheduling:
            raise ValueError("async_scheduling=True is invalid with tensor_parallel_size > 1: allowed False or None")
        check_quantization_fits(config.model.quantization, config.parallel.tensor_parallel_size)
        if loaded is None:
            loaded = load_model(
                config.model.model,
                device="cpu" if tensor_parallel else device,  # tensor parallel: the workers hold the weights
                dtype=dtype,
                cache_dir=config.model.cache_dir,
                attn_implementation=register_attention(),
                quantization=config.model.quantization,
            )
        elif model_quantization(loaded.model) != config.model.quantization:
            raise ValueError(
                f"quantization={config.model.quantization!r} is invalid for the given model, which is quantized as "
                f"{model_quantization(loaded.model)!r}: pass a model from load_model(..., quantization=...)"
            )
        self.loaded = loaded
        self.model = loaded.model
        param = next(self.model.parameters())
        device, dtype = (device, dtype) if tensor_parallel else (param.device, param.dtype)
        if device.type == "cpu" and not tensor_parallel:
            # Small decode steps: linear layers as W @ x.T over all threads (engine/cpu_linear.py).
            use_small_rows_linear(self.model, threads.num_threads)
        else:
            restore_linear(self.model)  # switched by a CPU engine before: the ranks shard plain layers
        if getattr(self.model.config, "_attn_implementation", None) != register_attention():
            # A model loaded elsewhere: route its attention through the paged cache.
            self.model.set_attn_implementation(register_attention())
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.model_name = config.model.model or "SmolLM2-135M-Instruct"
        self.max_model_len = self._resolve_max_model_len(config, loaded)
        self.scheduler_config = dataclasses.replace(
            config.scheduler, max_model_len=self.max_model_len,
            async_scheduling=resolve_async_scheduling(config.scheduler.async_scheduling, device, tensor_parallel),
        )
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]

        self.enforce_eager = resolve_enforce_eager(config.enforce_eager, device)
        if tensor_parallel:
            # The ranks run eager unless asked: their compiled forward traces the all-reduces, but
            # CUDA graphs of NCCL ranks have not run on a GPU here yet (README, Limitations).
            self.enforce_eager = config.enforce_eager is not False
            self.runner = make_executor(config, loaded, device, dtype, self.scheduler_config, self.enforce_eager)
            num_blocks = self.runner.num_blocks  # the least any rank can hold
        else:
            num_blocks = self._num_kv_blocks(config.cache, device, dtype)
            self.runner = self._make_runner(num_blocks)
            self.runner.capture_graphs()
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.updater = StepUpdater(
            self.block_manager, self.tokenizer, self.max_model_len, async_scheduling=self.scheduler_config.async_scheduling
        )
        self.structured = StructuredOutputManager(self.tokenizer, self.vocab_size, self._model_eos_ids())
        capacity = num_blocks * config.cache.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; max concurrency at max_model_len=%d: %.2fx",
            num_blocks,
            config.cache.block_size,
            capacity,
            self.max_model_len,
            capacity / self.max_model_len,
        )
        self.requests: dict[str, SequenceGroup] = {}
        self.rng = random.Random(config.model.seed)  # seeds for requests that bring none
        self.seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(
        cls,
        model: str | None = None,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_waiting_requests: int | None = None,
        async_scheduling: bool | None = None,
        kv_cache_memory_bytes: int = 512 * 1024**2,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        dtype: str = "auto",
        device: str = "auto",
        cache_dir: str | None = None,
        seed: int = 0,
        quantization: str | None = None,
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        ray_address: str | None = None,
        loaded: LoadedModel | None = None,
    ) -> "LLMEngine":
        config = EngineConfig(
            model=ModelConfig(
                model=model, dtype=dtype, device=device, cache_dir=cache_dir, max_model_len=max_model_len, seed=seed,
                quantization=quantization, num_threads=num_threads,
            ),
            cache=CacheConfig(
                block_size=block_size,
                num_kv_blocks=num_kv_blocks,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len or max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
                max_waiting_requests=max_waiting_requests,
                async_scheduling=async_scheduling,
            ),
            enforce_eager=enforce_eager,
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size, ray_address=ray_address),
        )
        return cls(config, loaded)

    @staticmethod
    def _resolve_max_model_len(config: EngineConfig, loaded: LoadedModel) -> int:
        limit = loaded.max_model_len
        asked = config.model.max_model_len
        if asked is None:
            return min(limit, DEFAULT_MAX_MODEL_LEN_CAP)
        if asked > limit:
            raise ValueError(f"max_model_len={asked} is invalid: allowed at most the model's limit {limit}")
        return asked

    def _make_runner(self, num_blocks: int) -> ModelRunner:
        sched = self.scheduler_config
        return ModelRunner(
            self.model, num_blocks=num_blocks, block_size=self.config.cache.block_size,
            max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=self.max_model_len, enforce_eager=self.enforce_eager,
        )

    def _num_kv_blocks(self, cache: CacheConfig, device: torch.device, dtype: torch.dtype) -> int:
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = kv_bytes_per_block(self.model.config, cache.block_size, dtype)
        if device.type != "cuda":
            return max(1, cache.kv_cache_memory_bytes // per_block)
        # Profile a forward at the largest batch, then give the cache what is left of the budget.
        tokens = self.scheduler_config.max_num_batched_tokens
        probe = self._make_runner(-(-tokens // cache.block_size))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        probe.profile_run(tokens, max_seq_len=self.max_model_len)
        peak = torch.cuda.max_memory_allocated(device) - sum(c.numel() * c.element_size() for c in probe.k_caches) * 2
        peak += probe.profile_graph_memory()
        del probe
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total * cache.gpu_memory_utilization) - peak
        if budget < per_block:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (peak {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return budget // per_block

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is invalid: a request with this id is already running")
        params = params or self.default_sampling_params()
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            text = None
            token_ids = [int(t) for t in prompt]
        self._validate_prompt(token_ids)
        if params.prompt_logprobs is not None and self.config.parallel.tensor_parallel_size > 1:
            raise ValueError(
                f"SamplingParams.prompt_logprobs={params.prompt_logprobs} is invalid with tensor_parallel_size > 1: "
                "allowed None"
            )
        self._validate_param_token_ids(params)
        max_new = params.max_tokens_for(len(token_ids))
        if max_new is None:
            max_new = self.max_model_len - len(token_ids)
        elif max_new < 1:
            raise ValueError(
                f"max_length={params.max_length} is invalid: allowed more than the prompt's {len(token_ids)} tokens"
            )
        if len(token_ids) + max_new > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_new_tokens ({max_new}) = {len(token_ids) + max_new} "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        bound = self.scheduler_config.max_waiting_requests
        if bound is not None and len(self.scheduler.waiting) >= bound:
            raise QueueFullError(f"the waiting queue is full ({bound} requests); retry later")
        eos = () if params.ignore_eos else (params.eos_token_ids or self._model_eos_ids())
        group = SequenceGroup(
            request_id,
            text,
            token_ids,
            params,
            eos_token_ids=eos,
            max_new_tokens=max_new,
            min_new_tokens=params.min_tokens_for(len(token_ids)),
            seed=params.seed if params.seed is not None else self.rng.getrandbits(63),
            seq_ids=self.seq_ids,
        )
        if group_max_seqs(group) > self.scheduler_config.max_num_seqs:
            raise ValueError(
                f"request runs {group_max_seqs(group)} sequences (num_beams/num_return_sequences): allowed at most "
                f"max_num_seqs ({self.scheduler_config.max_num_seqs})"
            )
        blocks = self.block_manager.num_blocks_for(len(token_ids) + max_new) * group_max_seqs(group)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request needs up to {blocks} KV blocks ({group_max_seqs(group)} sequences of "
                f"{len(token_ids) + max_new} tokens) but the whole cache has {self.block_manager.num_blocks}; "
                "lower max_new_tokens or num_beams/num_return_sequences, or raise num_kv_blocks"
            )
        self.updater.prepare_group(group)
        self.requests[request_id] = group
        if not self.structured.hold(group):  # a grammar still compiling: admitted by a later step
            self.scheduler.add(group)
        self.prompt_tokens_total += len(token_ids)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: allowed a non-empty string or list of token ids")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            bad = next(t for t in token_ids if t < 0 or t >= self.vocab_size)
            raise ValueError(f"prompt token id {bad} is invalid: allowed 0 <= id < {self.vocab_size}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens: allowed fewer than max_model_len ({self.max_model_len})"
            )

    def _validate_param_token_ids(self, params: SamplingParams) -> None:
        # Ids that index the logits are checked here, not in the step: a bad one found while sampling
        # would fail every request in the batch. (EOS and stop ids past the vocabulary never match: harmless.)
        fields = {
            "logit_bias": list(params.logit_bias or ()),
            "bad_words_ids": [t for word in params.bad_words_ids or () for t in word],
        }
        for name, ids in fields.items():
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"SamplingParams.{name} holds token id {bad[0]}: allowed ids in [0, {self.vocab_size})"
                )

    def _model_eos_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            group = self.requests.pop(rid, None)
            if group is not None:
                self.scheduler.remove(group)

    def warm_up(self) -> None:
        """Run a full-budget prefill and a full-batch decode of dummy prompts, then reset the counters.

        A server calls this before it takes requests, so that first-use costs (kernel and algorithm
        selection for each shape, allocator growth, page faults of the step's buffers) are paid here
        and not by the first users. Leaves no request, no block in use and zero counters.
        """
        if self.requests:
            raise RuntimeError("warm_up() is invalid with requests running: allowed only on an idle engine")
        sched = self.scheduler_config
        num_seqs = max(1, min(sched.max_num_seqs, self.block_manager.num_blocks))
        prompt_len = max(1, min(sched.max_num_batched_tokens // num_seqs, self.max_model_len - 3,
                                self.kv_cache_capacity_tokens // num_seqs - 3))
        params = SamplingParams(max_new_tokens=2, ignore_eos=True, do_sample=False, detokenize=False,
                                output_kind="final")
        ids = [f"tokenmill-warm-up-{i}" for i in range(num_seqs)]
        for i, rid in enumerate(ids):  # distinct prompts: a real prefill each, no prefix-cache hits
            self.add_request(rid, [(1 + i * prompt_len + j) % self.vocab_size for j in range(prompt_len)], params)
        while self.has_unfinished_requests():
            self.step()
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.block_manager.num_cache_hits = 0
        self.scheduler.num_preemptions_total = 0

    @property
    def compact_deltas(self) -> bool:
        """Whether `step()` gathers the outputs that carry only new token ids into one TokenDeltas
        per step (engine/outputs.py); the serving engine core turns it on."""
        return self.updater.compact_deltas

    @compact_deltas.setter
    def compact_deltas(self, on: bool) -> None:
        self.updater.compact_deltas = on

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput | TokenDeltas]:
        rejected = self._admit_structured()
        batch = self.scheduler.schedule()
        if batch.is_empty and not self.updater.has_in_flight:
            return rejected
        try:
            logits = None if batch.is_empty else self.runner.run(batch)
            outputs = self.updater.update(batch, logits)
        except Exception as exc:  # a fault inside the model or sampler fails this batch only
            logger.exception("engine step failed")
            outputs = self._fail(batch, exc)
        for out in outputs:
            if out.finished:
                group = self.requests.pop(out.request_id, None)
                if group is not None:
                    self.scheduler.remove(group)
        self.generation_tokens_total += self.updater.take_num_new_tokens()
        return rejected + outputs

    def _admit_structured(self) -> list[RequestOutput]:
        """Requests whose grammar finished compiling join the scheduler; a failed compile ends its request."""
        if not self.structured.pending:
            return []
        idle = self.scheduler.num_unfinished == 0  # nothing else to run: wait briefly instead of spinning
        failed = self.structured.admit(self.scheduler, lambda g: g.request_id in self.requests, 0.005 if idle else 0)
        for group in failed:
            self.requests.pop(group.request_id, None)
            for seq in group.seqs:
                seq.finish_reason = "error"
        return [request_output(g, finished=True) for g in failed]

    def _fail(self, batch: ScheduledBatch, exc: Exception) -> list[RequestOutput]:
        """Fail the batch's requests, and with overlapped steps those whose tokens were in flight."""
        groups = {id(g): g for g in batch.groups}
        for group in self.updater.drop_in_flight():
            groups.setdefault(id(group), group)
        outputs = []
        for group in groups.values():
            if group.released:
                continue
            group.error = f"{type(exc).__name__}: {exc}"
            for seq in group.seqs:
                seq.finish_reason = "error"
            outputs.append(request_output(group, finished=True))
        return outputs

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_hit_blocks_total=bm.num_cache_hits,
        )

    @property
    def is_healthy(self) -> bool:
        """False once the model can no longer run (a tensor-parallel worker died)."""
        return getattr(self.runner, "is_healthy", True)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (safe to call twice)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    @property
    def kv_cache_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size


__all__ = ["LLMEngine", "EngineStats"]
