"""Tensor parallelism on Ray actors (gloo on the CPU): same tokens as one process, faults end in errors."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray
import torch

from tests.engine.helpers import random_prompts, tiny_config, tiny_pair
from tokenmill.engine.cpu_linear import SmallRowsLinear, use_small_rows_linear
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.config import ParallelConfig
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.executor import ExecutorDeadError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.tp_inputs import pack_step, unpack_step
from tokenmill.engine.tp_sharding import check_tensor_parallel


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # One private local Ray instance for the module; 4 logical CPUs so two 2-rank engines fit at once.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_engine(tp: int, **kwargs) -> LLMEngine:
    loaded, _ = tiny_pair("llama")
    kwargs.setdefault("num_kv_blocks", 96)
    if tp > 1 and torch.backends.mkl.is_available():  # a model a CPU engine ran before: switched layers
        assert use_small_rows_linear(loaded.model, num_threads=2) > 0
    engine = LLMEngine.from_args(loaded=loaded, tensor_parallel_size=tp, block_size=4, **kwargs)
    assert not any(type(m) is SmallRowsLinear for m in loaded.model.modules()) or tp == 1
    return engine


@pytest.fixture(scope="module")
def engines():
    single, double = make_engine(1), make_engine(2)
    assert double.runner.step_graph is None  # CPU ranks: a Ray task per rank by default
    assert double.runner.set_step_messages("graph") == "graph"  # the GPU default, tested here on the CPU
    yield single, double
    double.shutdown()


def generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list[list[int]]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    done: dict[str, list[list[int]]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = [c.token_ids for c in out.outputs]
    return done


def test_tp2_greedy_tokens_equal_tp1(engines):
    single, double = engines
    # Shared prefixes (prefix-cache hits), prompts longer than a block, several sequences per request (forks).
    prompts = random_prompts([3, 11, 26, 7], seed=3)
    params = [SamplingParams(max_new_tokens=10)] * 3 + [SamplingParams(max_new_tokens=6, num_beams=3)]
    assert generate(double, prompts, params) == generate(single, prompts, params)
    # A second round that reuses the first round's cached prefix blocks.
    again = [prompts[2][:20] + [5, 6, 7], prompts[1] + [9]]
    hits = double.get_stats().prefix_cache_hit_blocks_total
    assert generate(double, again, params[:2]) == generate(single, again, params[:2])
    assert double.get_stats().prefix_cache_hit_blocks_total > hits
    assert double.runner.num_steps > 0
    assert double.runner.step_graph is not None  # the steps went through the compiled graph


def test_tp2_chunked_prefill_matches_tp1():
    prompts = random_prompts([40, 9, 33], seed=5)
    params = [SamplingParams(max_new_tokens=5)] * 3
    single = make_engine(1, max_num_batched_tokens=16, max_model_len=128)
    double = make_engine(2, max_num_batched_tokens=16, max_model_len=128)
    try:
        assert generate(double, prompts, params) == generate(single, prompts, params)
    finally:
        double.shutdown()


def test_tp2_ranks_through_the_compiled_forward_match_tp1(engines):
    """enforce_eager=False: each rank's decode steps run the compiled forward (inductor here; on CUDA
    CUDA graphs on top), the all-reduces and the vocabulary all-gather traced into the graph."""
    single, _ = engines
    prompts = random_prompts([5, 12, 8], seed=9)
    params = [SamplingParams(max_new_tokens=6)] * 3
    compiled = make_engine(2, enforce_eager=False)
    try:
        assert generate(compiled, prompts, params) == generate(single, prompts, params)
        stats = ray.get([w.__ray_call__.remote(
            lambda w: (w.runner.decode_graphs is not None,
                       __import__("torch")._dynamo.utils.counters["stats"]["unique_graphs"]))
            for w in compiled.runner.workers])
        assert all(has_graphs and graphs >= 1 for has_graphs, graphs in stats), stats
    finally:
        compiled.shutdown()


def test_tp2_sampling_seeded_and_batch_invariant(engines):
    single, double = engines
    seeded = SamplingParams(do_sample=True, temperature=0.9, top_k=0, seed=1234, max_new_tokens=12)
    prompt = random_prompts([9], seed=7)
    alone = generate(double, prompt, [seeded])["r0"]
    others = random_prompts([4, 15, 6], seed=8)
    crowd = generate(double, prompt + others, [seeded] + [SamplingParams(do_sample=True, max_new_tokens=12)] * 3)
    assert crowd["r0"] == alone  # the seeded request does not depend on its batch
    assert generate(double, prompt, [seeded])["r0"] == alone  # nor on the run
    assert generate(single, prompt, [seeded])["r0"] == alone  # and TP 2 samples what TP 1 samples


def test_kv_cache_holds_local_heads_and_is_sized_per_rank():
    engine = make_engine(2, num_kv_blocks=None, kv_cache_memory_bytes=2 * 1024**2)
    try:
        heads = ray.get(engine.runner.workers[0].__ray_call__.remote(lambda w: w.runner.k_caches[0].shape))
        full_kv_heads = tiny_config("llama").num_key_value_heads
        assert heads[2] == full_kv_heads // 2  # [num_blocks, block_size, local kv heads, head_dim]
        # The LM head holds half of the vocabulary, untied from the whole input embedding.
        head, embed = ray.get(engine.runner.workers[1].__ray_call__.remote(
            lambda w: (tuple(w.model.lm_head.weight.shape), tuple(w.model.get_input_embeddings().weight.shape))))
        config = tiny_config("llama")
        assert head == (-(-config.vocab_size // 2), config.hidden_size)
        assert embed == (config.vocab_size, config.hidden_size)
        # Each rank gets half of the CPU budget and holds half of the heads: same block count as one process.
        assert engine.block_manager.num_blocks == make_engine(1, num_kv_blocks=None,
                                                              kv_cache_memory_bytes=2 * 1024**2).block_manager.num_blocks
    finally:
        engine.shutdown()


def test_shutdown_leaves_no_processes_behind():
    engine = make_engine(2)
    pids = list(engine.runner.worker_pids)
    group = engine.runner.placement_group
    assert all(psutil.pid_exists(p) for p in pids)
    engine.shutdown()
    engine.shutdown()  # twice is fine
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# A rank killed just before a step, and (graph) one that died while the engine was idle: Ray's
# monitor has torn the graph down by the next step, which then fails at submission.
@pytest.mark.parametrize("step_messages, idle_s", [("tasks", 0), ("graph", 0), ("graph", 3)])
def test_killed_worker_fails_requests_and_engine_turns_unhealthy(step_messages, idle_s):
    engine = make_engine(2)
    assert engine.runner.set_step_messages(step_messages) == step_messages
    async_engine = None
    try:
        prompts = random_prompts([6, 8], seed=11)
        for i, p in enumerate(prompts):
            engine.add_request(f"k{i}", p, SamplingParams(max_new_tokens=200, ignore_eos=True))
        engine.step()
        engine.step()
        os.kill(engine.runner.worker_pids[1], 9)
        time.sleep(idle_s)
        start = time.monotonic()
        finished = {}
        while engine.has_unfinished_requests() and time.monotonic() - start < 60:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert time.monotonic() - start < 60  # no hang: the step fails instead of waiting
        assert set(finished) == {"k0", "k1"}
        assert all(o.error and "ExecutorDeadError" in o.error for o in finished.values())
        assert not engine.is_healthy
        # A serving front over this engine reports it unhealthy too, and its core ends (so that
        # Serve's health check replaces it): the front is told, or refused when it came too late.
        try:
            async_engine = AsyncLLMEngine.from_engine(engine)
            assert not async_engine.is_healthy
            deadline = time.monotonic() + 10
            while async_engine.dead_reason is None and time.monotonic() < deadline:
                time.sleep(0.05)
            reason = async_engine.dead_reason or ""
        except EngineDeadError as exc:
            reason = str(exc)
        assert "tensor-parallel worker died" in reason
        with pytest.raises(ExecutorDeadError):
            engine.runner.run(None)  # every later step fails at once
    finally:
        if async_engine is not None:
            async_engine.shutdown(timeout_s=5)
        engine.shutdown()


def test_step_message_round_trips(engines):
    single, _ = engines
    prompts = random_prompts([5, 9], seed=2)
    for i, p in enumerate(prompts):
        single.add_request(f"m{i}", p, SamplingParams(max_new_tokens=2))
    batch = single.scheduler.schedule()
    rebuilt = unpack_step(pack_step(batch))
    try:
        for seq, new, step_seq in zip(batch.seqs, batch.num_new_tokens, rebuilt.seqs):
            start = seq.num_computed_tokens
            assert step_seq.token_ids[start : start + new] == seq.token_ids[start : start + new]
            assert step_seq.block_table == seq.block_table
        assert [rebuilt.samples(i) for i in range(len(batch.seqs))] == [batch.samples(i) for i in range(len(batch.seqs))]
        logits = single.runner.run(rebuilt)  # the public ModelRunner accepts the rebuilt batch
        torch.testing.assert_close(logits, single.runner.run(batch))
    finally:
        single.abort_request(["m0", "m1"])


def test_step_messages_as_ray_tasks_give_the_same_tokens(engines):
    """Each step as a Ray task per rank (the CPU default, and where no graph compiles): the same
    tokens. (Last user of the shared TP engine: its graph is torn down here.)"""
    with pytest.raises(ValueError, match="allowed 'graph', 'tasks'"):
        engines[1].runner.set_step_messages("zmq")
    single, double = engines
    prompts = random_prompts([9, 4], seed=8)
    params = [SamplingParams(max_new_tokens=8)] * 2
    want = generate(single, prompts, params)
    assert double.runner.set_step_messages("tasks") == "tasks"
    assert double.runner.step_graph is None
    steps = double.runner.num_steps
    assert generate(double, prompts, params) == want
    assert double.runner.num_steps > steps


@pytest.mark.parametrize("arch, size, needle", [
    ("gpt2", 2, "no tensor-parallel plan"),
    ("qwen2", 2, "num_key_value_heads=1 is not divisible"),
    ("llama", 3, "num_attention_heads=4 is not divisible"),
])
def test_models_that_cannot_shard_are_named(arch, size, needle):
    with pytest.raises(ValueError, match=needle):
        check_tensor_parallel(tiny_config(arch), size)


def test_bad_tensor_parallel_size_is_a_value_error():
    with pytest.raises(ValueError, match="tensor_parallel_size=0 is invalid"):
        ParallelConfig(tensor_parallel_size=0)
