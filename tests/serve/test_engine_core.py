"""The engine core split: outputs identical to the in-process engine, a core in its own process
(killed mid-request: the requests fail at once, a replacement serves), clients that vanish, early
prompt rejection, the request-body limit and stream_interval."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import ENGINE_KWARGS, make_engine, serve_app, wait_for
from tests.serve.test_reliability import engine_is_clean
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.api import build_app
from tokenmill.serve.engine_core_client import CoreConnection

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ("The capital of France is", SamplingParams(max_new_tokens=12, do_sample=False)),
    ("The capital of France is", SamplingParams(max_new_tokens=30, do_sample=False, stop=(" answer", "\n\n"))),
    ("The capital of France is", SamplingParams(max_new_tokens=30, do_sample=False, stop=("answer",),
                                                include_stop_str_in_output=True)),
    ("Hello", SamplingParams(max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=1, logprobs=2)),
    ("Hello", SamplingParams(max_new_tokens=10, do_sample=True, num_return_sequences=2, seed=5, stop=("e",))),
    ("Hello", SamplingParams(max_new_tokens=8, num_beams=3, num_return_sequences=2)),
]


def finals_of(outputs):
    return [[(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in sorted(
        out.outputs, key=lambda o: o.index)] for out in outputs]


def logprobs_of(outputs):
    # Values, not bits: a batch of another shape rounds the logits differently.
    return [pytest.approx(o.logprobs[i][t], abs=1e-3) if o.logprobs else None
            for out in outputs for o in sorted(out.outputs, key=lambda o: o.index) for i, t in enumerate(o.token_ids)]


async def generate_all(engine, cases):
    async def one(i, prompt, params):
        final = None
        async for final in engine.generate(prompt, params, f"case-{i}"):
            pass
        return final

    return await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(cases)))


@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlapped"])
def test_split_outputs_equal_the_in_process_engine(loaded_model, overlap):
    """The core behind its socket gives the in-process engine's outputs, with synchronous steps (the
    CPU default) and with overlapped ones (the CUDA default)."""
    offline = LLMEngine.from_args(None, loaded=loaded_model, **ENGINE_KWARGS)
    for i, (prompt, params) in enumerate(CASES):
        offline.add_request(f"case-{i}", prompt, params)
    done = {}
    while offline.has_unfinished_requests():
        for out in offline.step():
            if out.finished:
                done[out.request_id] = out
    expected = [done[f"case-{i}"] for i in range(len(CASES))]
    engine = make_engine(loaded_model, async_scheduling=overlap)
    try:
        assert all(core.engine.scheduler_config.async_scheduling is overlap for core in engine._local_cores)
        got = asyncio.run(generate_all(engine, CASES))
        assert finals_of(got) == finals_of(expected)
        assert logprobs_of(expected) == logprobs_of(got)
        assert got[1].outputs[0].finish_reason == "stop" and isinstance(got[1].outputs[0].stop_reason, str)
        # The stop string aborted the request at the core: nothing is left running there.
        assert wait_for(lambda: engine_is_clean(engine), 10), engine.get_stats()
    finally:
        engine.shutdown()


def test_a_core_turns_compact_outputs_on_for_its_life_only(loaded_model):
    """The core has the engine gather token-only outputs in columns while it runs it, and gives the
    engine its own setting back when its loop ends."""
    from tokenmill.serve.engine_core import EngineCore

    engine = LLMEngine.from_args(None, loaded=loaded_model, **ENGINE_KWARGS)
    assert not engine.compact_deltas
    core = EngineCore(engine, bind="inproc://tokenmill-compact-flag").start()
    try:
        assert engine.compact_deltas
    finally:
        core.shutdown(timeout_s=10)
    assert not core.is_alive and not engine.compact_deltas


def test_stream_interval_coalesces_outputs_and_keeps_the_text(loaded_model):
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)

    async def outputs(engine):
        return [out async for out in engine.generate("Once upon a time", params)]

    one, four = make_engine(loaded_model), make_engine(loaded_model, stream_interval=4)
    try:
        every, coalesced = asyncio.run(outputs(one)), asyncio.run(outputs(four))
    finally:
        one.shutdown()
        four.shutdown()
    assert len(every) == 16 and len(coalesced) <= 5
    assert [len(o.outputs[0].token_ids) for o in coalesced[:-1]] == [4 * (i + 1) for i in range(len(coalesced) - 1)]
    assert coalesced[-1].outputs[0].text == every[-1].outputs[0].text


def test_a_prompt_past_the_context_is_rejected_from_a_prefix_before_queueing(engine):
    huge = "word " * 200_000  # 1 MB of text, about 200k tokens against max_model_len 256
    started = time.process_time()
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(engine.encode(huge))
    assert time.process_time() - started < 0.5  # a prefix was tokenized, not the whole megabyte
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(engine.add_request("too-long", "word " * 300))
    assert engine.get_stats().num_waiting == 0


def test_request_body_limit_is_a_413_and_a_long_prompt_a_400(engine):
    with serve_app(build_app(engine, max_request_bytes=64 * 1024)) as live:
        big = live.post("/v1/completions", json={"prompt": "word " * 20_000, "max_tokens": 2})
        assert big.status_code == 413
        error = big.json()["error"]
        assert error["type"] == "invalid_request_error" and "--max-request-bytes" in error["message"]
        long = live.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 5000}],
                                                       "max_tokens": 2})
        assert long.status_code == 400 and "max_model_len" in long.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit is applied as the body streams in
            for _ in range(40):
                yield b" " * 4096
            yield b'{"prompt": "Hi", "max_tokens": 2}'

        streamed = live.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "--max-request-bytes" in streamed.json()["error"]["message"]
        ids = live.post("/v1/completions", json={"prompt": [5] * 3000, "max_tokens": 2})  # rejected before decoding
        assert ids.status_code == 400
        assert ids.json()["error"]["param"] == "prompt" and "3000 tokens" in ids.json()["error"]["message"]
        ok = live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and live.get("/health").status_code == 200


def test_a_vanished_client_has_its_requests_aborted_at_the_core(loaded_model):
    engine = make_engine(loaded_model)
    core = engine._local_cores[0]
    try:
        other = CoreConnection(core.address, context=core.context)

        async def start_long_request():
            from tokenmill.engine.async_engine import AsyncLLMEngine

            front = AsyncLLMEngine([other])
            params = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)
            return await front.add_request("orphan", "Tell me a story.", params)

        asyncio.run(start_long_request())
        assert wait_for(lambda: engine.get_stats().num_running == 1, 10)
        other.close()
        # The core's next send to the closed client fails: its request is aborted.
        assert wait_for(lambda: engine_is_clean(engine), 15), engine.get_stats()
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- a core in its own process
def start_core_process() -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TOKENMILL_CORE_TOKEN", None)  # the test's clients say no token
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.serve.engine_core", "--max-model-len", "256", "--max-num-seqs", "8",
         "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    address = process.stdout.readline().strip()
    assert address.startswith("tcp://"), address
    return process, address


def test_killing_the_core_process_fails_its_requests_at_once_and_a_replacement_serves():
    from tokenmill.engine.async_engine import AsyncLLMEngine

    first, address = start_core_process()
    second = None
    engine = AsyncLLMEngine.connect([address])
    try:
        long = SamplingParams(max_new_tokens=200, do_sample=False, ignore_eos=True)
        short = SamplingParams(max_new_tokens=4, do_sample=False)

        async def in_flight():
            seen = 0
            async for out in engine.generate("Write a long story.", long):
                seen = len(out.outputs[0].token_ids)
                if seen == 2:
                    first.send_signal(signal.SIGKILL)
            return seen

        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="disconnected"):
            asyncio.run(asyncio.wait_for(in_flight(), 60))
        assert time.monotonic() - started < 30
        assert not engine.is_healthy and "disconnected" in engine.dead_reason
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.add_request("after-death", "Hi", short))

        second, new_address = start_core_process()
        engine.replace_core(0, new_address)
        assert engine.is_healthy

        async def answer():
            return [out async for out in engine.generate("The capital of France is", short)][-1]

        assert asyncio.run(answer()).outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()
        for process in (first, second):
            if process is not None:
                process.terminate()
                process.wait(20)


def test_a_core_with_a_token_serves_only_clients_that_know_it(loaded_model):
    """A core listening on the node's address takes requests only from clients whose hello carries
    its secret; anyone else is refused at the hello, and an add without a hello is rejected."""
    import zmq

    from tokenmill.engine.async_engine import AsyncEngineConfig, AsyncLLMEngine
    from tokenmill.serve.engine_core import EngineCore
    from tokenmill.serve.engine_core_messages import pack, unpack

    core = EngineCore(LLMEngine.from_args(None, loaded=loaded_model, **ENGINE_KWARGS),
                      bind="tcp://127.0.0.1:*", token="s3cret").start()
    try:
        for wrong in (None, "guess"):
            with pytest.raises(EngineDeadError, match="refused"):
                CoreConnection(core.address, token=wrong, connect_timeout_s=10)
        intruder = zmq.Context.instance().socket(zmq.DEALER)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(core.address)
        # Garbage, a frame too many, a non-ASCII token, a hello-less abort: dropped or refused, and
        # the core lives on.
        intruder.send(b"\xc1 not msgpack")
        intruder.send_multipart([b"a", b"b"])
        intruder.send(pack(["abort", 5]))
        intruder.send(pack(["hello", "\u00e9t\u00e9"]))
        assert intruder.poll(10_000) and unpack(intruder.recv())[0] == "refused"
        intruder.send(pack(["add", "sneaky", [1, 2, 3], {}]))
        assert intruder.poll(10_000)
        kind, reason = unpack(intruder.recv())
        assert kind == "dead" and "not connected" in reason  # the client side ends that connection
        intruder.close()
        assert core.is_alive
        assert core.engine.get_stats().num_running == core.engine.get_stats().num_waiting == 0

        front = AsyncLLMEngine.connect([core.address], AsyncEngineConfig(core_token="s3cret"))
        try:
            async def one():
                final = None
                async for final in front.generate("Hello", SamplingParams(max_new_tokens=3, do_sample=False)):
                    pass
                return final

            assert len(asyncio.run(one()).outputs[0].token_ids) == 3
        finally:
            front.shutdown(timeout_s=5)
    finally:
        core.shutdown()
