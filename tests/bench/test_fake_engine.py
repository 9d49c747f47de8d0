"""FakeEngine behind a real engine core and front: every token of many concurrent streams arrives."""

from __future__ import annotations

import asyncio

from tests.engine.helpers import tiny_tokenizer
from tokenmill.bench.fake_engine import FakeEngine
from tokenmill.engine.async_engine import AsyncEngineConfig, AsyncLLMEngine
from tokenmill.engine.sampling_params import SamplingParams


def test_fake_engine_streams_every_token_through_the_split():
    tokenizer = tiny_tokenizer()
    fake = FakeEngine(tokenizer, max_num_seqs=8)
    engine = AsyncLLMEngine.from_engine(fake, AsyncEngineConfig(stream_interval=3))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)

    async def one(i: int):
        outputs = [out async for out in engine.generate([5, 6, 7 + i], params, f"r{i}")]
        return outputs

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(24)))  # more than max_num_seqs: some wait

    try:
        results = asyncio.run(run_all())
    finally:
        engine.shutdown()
    expected = [fake.filler[j % len(fake.filler)] for j in range(20)]
    for outputs in results:
        final = outputs[-1]
        assert final.finished and final.outputs[0].token_ids == expected
        assert final.outputs[0].finish_reason == "length"
        assert final.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert len(outputs) <= 8  # stream_interval 3: about one output per three tokens
    assert fake.generation_tokens_total == 24 * 20 and not fake.requests
