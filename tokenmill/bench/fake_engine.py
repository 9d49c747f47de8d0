"""An engine without a model, for measuring the serving layer alone.

`FakeEngine` has the interface an `EngineCore` drives (add_request, abort_request, step, stats)
and gives every running request one token per step, after `step_time_s` (0: as fast as the core
loop turns). Behind a real engine core and API replica it shows what the HTTP side can carry:
SSE chunks and tokens per second per API process, independent of the model's speed.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Iterable

from tokenmill.engine.errors import QueueFullError
from tokenmill.engine.llm_engine import EngineStats
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

FILLER_TEXT = " the quick brown fox jumps over the lazy dog and runs far away"


class FakeEngine:
    def __init__(self, tokenizer: Any, *, step_time_s: float = 0.0, max_num_seqs: int = 256,
                 max_model_len: int = 4096, max_waiting: int = 100_000) -> None:
        self.tokenizer = tokenizer
        self.model_name = "fake-engine"
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.step_time_s = step_time_s
        self.max_waiting = max_waiting
        self.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_seqs)
        self.block_manager = SimpleNamespace(block_size=16)
        self.kv_cache_capacity_tokens = max_num_seqs * max_model_len
        self.filler = tokenizer.encode(FILLER_TEXT, add_special_tokens=False)  # the tokens every request "generates"
        self.requests: dict[str, list[Any]] = {}  # request id -> [params, tokens generated, prompt length]
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if len(self.requests) >= self.scheduler_config.max_num_seqs + self.max_waiting:
            raise QueueFullError("the fake engine's queue is full")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is invalid: a request with this id is already running")
        self.requests[request_id] = [params, 0, len(prompt_token_ids)]
        self.prompt_tokens_total += len(prompt_token_ids)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.step_time_s:
            time.sleep(self.step_time_s)
        outputs = []
        for rid in list(self.requests)[: self.scheduler_config.max_num_seqs]:  # first come, first served
            entry = self.requests[rid]
            params, generated, prompt_len = entry
            token = self.filler[generated % len(self.filler)]
            entry[1] = generated = generated + 1
            limit = params.max_tokens_for(prompt_len) or self.max_model_len - prompt_len
            done = generated >= limit
            out = CompletionOutput(index=0, text="", token_ids=[token], cumulative_logprob=0.0,
                                   finish_reason="length" if done else None)
            outputs.append(RequestOutput(rid, None, [], [out], finished=done))
            if done:
                del self.requests[rid]
        self.generation_tokens_total += len(outputs)
        return outputs

    def get_stats(self) -> EngineStats:
        running = min(len(self.requests), self.scheduler_config.max_num_seqs)
        return EngineStats(num_running=running, num_waiting=len(self.requests) - running, kv_cache_usage=0.0,
                           num_free_blocks=0, num_total_blocks=0, num_preemptions_total=0,
                           prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total, prefix_cache_hit_blocks_total=0)
