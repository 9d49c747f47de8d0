"""The three offline backends the throughput benchmark compares, on the same weights:

- tokenmill: `LLM.generate` (continuous batching over the paged KV cache);
- hf-generate: transformers' `model.generate` in static batches with left padding; each batch runs
  to its longest request, so only the tokens each request asked for count as useful output;
- hf-generate-batch: transformers' continuous batching (the manager behind `model.generate_batch`),
  fed each request with its own `max_new_tokens`;
- llamacpp: llama.cpp through llama-cpp-python (an optional extra) on the same GGUF file, greedy,
  one request after another; skipped with the reason when it is not installed.

EOS never ends a request (tokenmill: ignore_eos; transformers: min_new_tokens = max_new_tokens,
or eos disabled in continuous batching), so every backend produces the lengths asked for.
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.bench.models import attention
from tokenmill.engine.cpu_linear import restore_linear
from tokenmill.bench.workload import BenchRequest

WARMUP_PROMPT_LEN = 8
WARMUP_OUTPUT_LEN = 4


@dataclass(frozen=True)
class DecodeSpec:
    """How every request of a workload decodes (greedy: num_beams=1)."""

    name: str
    num_beams: int = 1
    no_repeat_ngram_size: int = 0


@dataclass(frozen=True)
class RunResult:
    backend: str
    workload: str
    num_requests: int
    num_output_tokens: int  # useful: the tokens the requests asked for and got
    num_computed_tokens: int  # every output position the backend computed (padding waste included)
    seconds: float
    peak_memory_bytes: int
    memory_kind: str  # "rss" (process, CPU) or "cuda_max_allocated"
    skipped: str | None = None  # why the backend did not run
    cpu_seconds: float = 0.0  # process CPU time (all threads) in the timed run: robust to a busy machine

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def computed_tokens_per_s(self) -> float:
        return self.num_computed_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "output_tokens_per_s": self.output_tokens_per_s,
            "computed_tokens_per_s": self.computed_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_cpu_s": self.output_tokens_per_cpu_s,
        }

    @property
    def output_tokens_per_cpu_s(self) -> float:
        return self.num_output_tokens / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


def skipped(backend: str, workload: str, reason: str) -> RunResult:
    return RunResult(backend, workload, 0, 0, 0, 0.0, 0, "", skipped=reason)


class PeakMemory:
    """Peak memory inside a `with` block: CUDA max allocated, or the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self.rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warmup_requests(vocab_size: int) -> list[BenchRequest]:
    ids = tuple(range(vocab_size // 2, vocab_size // 2 + WARMUP_PROMPT_LEN))
    return [BenchRequest(prompt_ids=ids, prompt_text=None, output_len=WARMUP_OUTPUT_LEN)] * 2


# ---------------------------------------------------------------------------------- tokenmill
def tokenmill_kv_blocks(requests: list[BenchRequest], spec: DecodeSpec, block_size: int) -> int:
    """KV blocks for the whole workload at once (each beam may hold its own copy of the output)."""
    tokens = sum(r.prompt_len + r.output_len * spec.num_beams for r in requests)
    return math.ceil(tokens / block_size) + 2 * spec.num_beams * len(requests) + 16


def run_tokenmill(
    loaded: Any, requests: list[BenchRequest], spec: DecodeSpec, engine_kwargs: dict[str, Any], warmup: bool
) -> RunResult:
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.sampling_params import SamplingParams

    device = next(loaded.model.parameters()).device
    llm = LLM(loaded=loaded, **engine_kwargs)

    def params(r: BenchRequest) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=r.output_len,
            ignore_eos=True,
            do_sample=False,
            num_beams=spec.num_beams,
            no_repeat_ngram_size=spec.no_repeat_ngram_size,
        )

    try:
        if warmup:
            warm = _warmup_requests(llm.llm_engine.vocab_size)
            llm.generate([list(r.prompt_ids) for r in warm], [params(r) for r in warm], use_tqdm=False)
        prompts = [list(r.prompt_ids) for r in requests]
        with PeakMemory(device) as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, [params(r) for r in requests], use_tqdm=False)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        generated = [len(o.outputs[0].token_ids) for o in outputs]
        failed = [o.outputs[0].finish_reason for o in outputs if o.outputs[0].finish_reason not in ("length", "stop")]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(outputs)} requests ended with finish_reason {failed[0]!r} (see the engine's log)"
            )
    finally:
        del llm
        free_memory(device)
    useful = sum(min(g, r.output_len) for g, r in zip(generated, requests))
    return RunResult("tokenmill", spec.name, len(requests), useful, sum(generated), seconds, mem.peak_bytes, mem.kind,
                     cpu_seconds=cpu_seconds)


# ---------------------------------------------------------------------------------- HF generate
def _left_padded(batch: list[BenchRequest], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.prompt_len for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, width]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, width]
    for row, r in enumerate(batch):
        input_ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_ids)
        attention_mask[row, width - r.prompt_len :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _hf_generate_batch(model: Any, batch: list[BenchRequest], spec: DecodeSpec, pad_id: int) -> int:
    """Generate one static batch to its longest request; returns the output positions per row."""
    input_ids, attention_mask = _left_padded(batch, pad_id, model.device)
    max_new = max(r.output_len for r in batch)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        num_beams=spec.num_beams,
        no_repeat_ngram_size=spec.no_repeat_ngram_size,
        max_new_tokens=max_new,
        min_new_tokens=max_new,  # EOS cannot end a row early (the benchmark ignores EOS)
        pad_token_id=pad_id,
        use_cache=True,
    )
    return out.shape[1] - input_ids.shape[1]


def run_hf_generate(model: Any, requests: list[BenchRequest], spec: DecodeSpec, batch_size: int, warmup: bool) -> RunResult:
    if batch_size < 1:
        raise ValueError(f"hf_batch_size={batch_size} is invalid: allowed an integer >= 1")
    restore_linear(model)  # HF's own layers, not those a tokenmill engine switched (engine/cpu_linear.py)
    device = model.device
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        eos = model.generation_config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    name = f"hf-generate (batch {batch_size})"
    with attention(model, "sdpa"), torch.inference_mode():
        if warmup:
            _hf_generate_batch(model, _warmup_requests(model.get_output_embeddings().weight.shape[0]), spec, pad_id)
        useful = computed = 0
        with PeakMemory(device) as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(0, len(requests), batch_size):
                batch = requests[i : i + batch_size]
                num_positions = _hf_generate_batch(model, batch, spec, pad_id)
                useful += sum(min(r.output_len, num_positions) for r in batch)
                computed += num_positions * len(batch)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    free_memory(device)
    return RunResult(name, spec.name, len(requests), useful, computed, seconds, mem.peak_bytes, mem.kind,
                     cpu_seconds=cpu_seconds)


# ---------------------------------------------------------------------------------- HF continuous batching
HF_PAGE_TOKENS = 256  # tokens per KV page (transformers' default)


def accepted_kwargs(function: Any, **kwargs: Any) -> dict[str, Any]:
    """`kwargs` less those `function` does not take (transformers' signatures change between 5.x releases)."""
    params = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def continuous_batching_config(config_class: Any, *, page_tokens: int, **fields: Any) -> Any:
    """transformers' ContinuousBatchingConfig in the installed version's own terms.

    The tokens per KV page are `block_size` in transformers 5.17 and `page_size` in later 5.x
    (where `block_size` is a deprecated alias); the other fields (num_blocks, max_batch_tokens,
    max_requests_per_batch) are the same in both. A field the installed version lacks is a TypeError
    naming it, which the caller reports as the reason the backend was skipped.
    """
    params = inspect.signature(config_class).parameters
    size_name = next((n for n in ("page_size", "block_size") if n in params), None)
    if size_name is None:
        raise TypeError(f"{config_class.__name__} takes neither page_size nor block_size (takes {sorted(params)})")
    missing = sorted(k for k in fields if k not in params)
    if missing:
        raise TypeError(f"{config_class.__name__} of this transformers version lacks {missing}")
    return config_class(**{size_name: page_tokens}, **fields)


def _wait_all(manager: Any, request_ids: list[str]) -> dict[str, Any]:
    pending, results = set(request_ids), {}
    while pending:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' continuous batching loop stopped with {len(pending)} requests left")
            continue
        if result.is_finished() and result.request_id in pending:
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            pending.discard(result.request_id)
            results[result.request_id] = result
    return results


def run_hf_generate_batch(
    model: Any, requests: list[BenchRequest], spec: DecodeSpec, max_num_seqs: int, max_batch_tokens: int, warmup: bool
) -> RunResult:
    name = "hf-generate-batch"
    if spec.num_beams > 1:
        return skipped(name, spec.name, "transformers' continuous batching has no beam search")
    from transformers import GenerationConfig

    restore_linear(model)  # HF's own layers, not those a tokenmill engine switched (engine/cpu_linear.py)
    device = model.device
    total_tokens = sum(r.prompt_len + r.output_len for r in requests) + 2 * (WARMUP_PROMPT_LEN + WARMUP_OUTPUT_LEN)
    gen_config = GenerationConfig(
        do_sample=False, no_repeat_ngram_size=spec.no_repeat_ngram_size, eos_token_id=-1, pad_token_id=0
    )
    try:
        from transformers import ContinuousBatchingConfig

        cb_config = continuous_batching_config(
            ContinuousBatchingConfig,
            page_tokens=HF_PAGE_TOKENS,
            num_blocks=math.ceil(total_tokens / HF_PAGE_TOKENS) + len(requests) + 2,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_num_seqs,
        )
        manager_kwargs = accepted_kwargs(
            model.continuous_batching_context_manager,
            generation_config=gen_config,
            continuous_batching_config=cb_config,
            block=True,
            timeout=30,
            warmup=device.type == "cuda",  # captures CUDA graphs; nothing to do on CPU
        )
        with attention(model, "sdpa"):
            with model.continuous_batching_context_manager(**manager_kwargs) as manager:
                if warmup:
                    warm = _warmup_requests(model.get_output_embeddings().weight.shape[0])
                    ids = [manager.add_request(list(r.prompt_ids), max_new_tokens=r.output_len, eos_token_id=-1) for r in warm]
                    _wait_all(manager, ids)
                with PeakMemory(device) as mem:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    ids = [
                        manager.add_request(list(r.prompt_ids), max_new_tokens=r.output_len, eos_token_id=-1)
                        for r in requests
                    ]
                    results = _wait_all(manager, ids)
                    _sync(device)
                    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    except Exception as error:  # report and go on: the other backends' numbers still stand
        return skipped(name, spec.name, f"{type(error).__name__}: {error}")
    finally:
        free_memory(device)
    generated = [len(results[i].generated_tokens) for i in ids]
    useful = sum(min(g, r.output_len) for g, r in zip(generated, requests))
    return RunResult(name, spec.name, len(requests), useful, sum(generated), seconds, mem.peak_bytes, mem.kind,
                     cpu_seconds=cpu_seconds)


# ---------------------------------------------------------------------------------- llama.cpp
LLAMACPP_INSTALL = "pip install 'tokenmill[llamacpp]' (llama-cpp-python; builds llama.cpp from source where no wheel fits)"


def llamacpp_unavailable_reason(gguf_path: str | None, spec: DecodeSpec) -> str | None:
    """Why the llama.cpp backend cannot run this workload, or None when it can."""
    if spec.num_beams > 1:
        return "llama-cpp-python has no beam search"
    if gguf_path is None or not str(gguf_path).lower().endswith(".gguf"):
        return f"llama.cpp needs a .gguf model file (the model here is {gguf_path!r}); use the default model or --model FILE.gguf"
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama-cpp-python is not installed ({error}); {LLAMACPP_INSTALL}"
    return None


def run_llamacpp(gguf_path: str | None, requests: list[BenchRequest], spec: DecodeSpec, num_threads: int,
                 warmup: bool) -> RunResult:
    """llama.cpp (llama-cpp-python) on the same GGUF file, greedy, one request after another (it
    has no batching of independent requests); EOS is ignored as for the other backends."""
    name = f"llama.cpp ({num_threads} threads)"
    reason = llamacpp_unavailable_reason(gguf_path, spec)
    if reason is not None:
        return skipped(name, spec.name, reason)
    from llama_cpp import Llama

    longest = max(r.prompt_len + r.output_len for r in requests)
    n_ctx = max(longest, WARMUP_PROMPT_LEN + WARMUP_OUTPUT_LEN if warmup else 0) + 8
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=num_threads, n_threads_batch=num_threads,
                n_batch=512, verbose=False)

    def generate(r: BenchRequest) -> int:
        count = 0
        # temp=0: greedy. The generator never stops by itself; the request's length does.
        for _ in llm.generate(list(r.prompt_ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            count += 1
            if count >= r.output_len:
                break
        return count

    try:
        if warmup:
            for r in _warmup_requests(llm.n_vocab()):
                generate(r)
        with PeakMemory(torch.device("cpu")) as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            generated = [generate(r) for r in requests]
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm
        gc.collect()
    useful = sum(min(g, r.output_len) for g, r in zip(generated, requests))
    return RunResult(name, spec.name, len(requests), useful, sum(generated), seconds, mem.peak_bytes, mem.kind,
                     cpu_seconds=cpu_seconds)
