"""AsyncLLMEngine on the default model: streaming, abort on cancel, errors, timeouts, loop death."""

from __future__ import annotations

import asyncio

import pytest

from tests.serve.conftest import make_engine, wait_for
from tokenmill.engine.async_engine import RequestTimeoutError
from tokenmill.engine.errors import EngineDeadError, QueueFullError
from tokenmill.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, do_sample=False)


def idle(engine) -> bool:
    stats = engine.get_stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0


def test_generate_streams_cumulative_outputs_until_finished(engine):
    async def run():
        return [out async for out in engine.generate("The capital of France is", GREEDY, "stream-1")]

    outputs = asyncio.run(run())
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 8
    final = outputs[-1].outputs[0]
    assert final.finish_reason == "length" and final.text
    assert wait_for(lambda: idle(engine))


def test_concurrent_requests_share_the_engine_and_match_solo_runs(engine):
    prompts = ["Once upon a time", "The weather today is", "My favourite food is"]

    async def one(prompt, rid):
        return [out async for out in engine.generate(prompt, GREEDY, rid)][-1]

    async def together():
        return await asyncio.gather(*(one(p, f"conc-{i}") for i, p in enumerate(prompts)))

    finals = asyncio.run(together())
    assert [f.request_id for f in finals] == ["conc-0", "conc-1", "conc-2"]
    solo = asyncio.run(one(prompts[1], "solo"))
    assert finals[1].outputs[0].token_ids == solo.outputs[0].token_ids  # greedy: batching does not change it


def test_cancelling_the_iterator_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)

    async def run():
        agen = engine.generate("Tell me a long story about a dragon.", params, "cancel-1")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await agen.aclose()
        return out

    out = asyncio.run(run())
    assert not out.finished
    assert wait_for(lambda: idle(engine), 10), engine.get_stats()


def test_task_cancellation_aborts(engine):
    params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)

    async def consume():
        async for _ in engine.generate("Count to one hundred:", params, "cancel-2"):
            pass

    async def run():
        task = asyncio.ensure_future(consume())
        while engine.get_stats().num_running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert wait_for(lambda: idle(engine), 10), engine.get_stats()


def test_add_request_errors_reach_the_caller(engine):
    async def first(prompt, params):
        async for out in engine.generate(prompt, params):
            return out

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(first("", GREEDY))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(first("Hello", SamplingParams(max_new_tokens=10_000)))
    assert engine.is_healthy
    assert asyncio.run(first("Hello", GREEDY)) is not None


def test_queue_full_raises_queue_full_error(engine):
    # The module engine bounds the waiting queue at 4; 40 requests at once must overflow it.
    params = SamplingParams(max_new_tokens=4, do_sample=False)

    async def run():
        async def one(i):
            try:
                async for _ in engine.generate(f"Question {i}: what is {i} plus {i}?", params):
                    pass
                return "ok"
            except QueueFullError:
                return "full"

        return await asyncio.gather(*(one(i) for i in range(40)))

    results = asyncio.run(run())
    assert "full" in results and "ok" in results
    assert wait_for(lambda: idle(engine), 20)


def test_request_timeout_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)

    async def run():
        async for _ in engine.generate("Write an essay.", params, timeout_s=0.3):
            pass

    with pytest.raises(RequestTimeoutError):
        asyncio.run(run())
    assert wait_for(lambda: idle(engine), 10), engine.get_stats()
    assert engine.is_healthy


def test_a_request_cannot_extend_the_engine_time_limit(loaded_model):
    engine = make_engine(loaded_model, request_timeout_s=0.3)
    params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)

    async def run():
        async for _ in engine.generate("Write an essay.", params, timeout_s=1000):
            pass

    try:
        with pytest.raises(RequestTimeoutError):
            asyncio.run(asyncio.wait_for(run(), 30))
        assert wait_for(lambda: idle(engine), 10), engine.get_stats()
    finally:
        engine.shutdown()


def test_loop_death_fails_in_flight_requests_and_marks_unhealthy(loaded_model):
    engine = make_engine(loaded_model)
    params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)
    real_step = engine.engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated engine fault")
        return real_step()

    engine.engine.step = failing_step

    async def run():
        async for _ in engine.generate("Hello there", params):
            pass

    try:
        with pytest.raises(EngineDeadError, match="simulated engine fault"):
            asyncio.run(asyncio.wait_for(run(), 30))
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(run(), 5))
    finally:
        engine.shutdown()
