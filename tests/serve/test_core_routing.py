"""Choosing the engine core on the API side: least-loaded, or by prompt prefix (serve/core_routing.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tests.serve.conftest import ENGINE_KWARGS
from tokenmill.engine.async_engine import AsyncEngineConfig, AsyncLLMEngine
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.serve.core_routing import CoreRouter
from tokenmill.serve.engine_core import EngineCore
from tokenmill.serve.engine_core_client import CoreConnection


@dataclass
class FakeCore:
    core_id: str
    num_in_flight: int = 0
    is_alive: bool = True
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.info = {"core_id": self.core_id, "max_num_seqs": 4}


PREFIX_A = list(range(100, 132))  # eight blocks of 4 tokens
PREFIX_B = list(range(500, 532))


def test_least_loaded_without_prefix_affinity():
    cores = [FakeCore("a", 3), FakeCore("b", 1), FakeCore("c", 2)]
    router = CoreRouter()
    assert router.pick(cores, PREFIX_A).core_id == "b"
    cores[1].is_alive = False
    assert router.pick(cores, PREFIX_A).core_id == "c"
    for core in cores:
        core.is_alive = False
    with pytest.raises(EngineDeadError):
        router.pick(cores, PREFIX_A)


def test_a_known_prefix_follows_its_core_until_that_core_is_a_batch_busier():
    cores = [FakeCore("a"), FakeCore("b")]
    router = CoreRouter(prefix_affinity=True, block_tokens=4)
    first = router.pick(cores, PREFIX_A + [1, 2])
    second = router.pick(cores, PREFIX_B + [3])
    assert first is not second  # a new prefix goes where fewer prefixes live
    first.num_in_flight = 4  # busier, but within a batch (max_num_seqs 4) of the other: affinity holds
    assert router.pick(cores, PREFIX_A + [7, 8, 9]) is first
    first.num_in_flight = 5  # more than a batch above the least-loaded core: load wins
    assert router.pick(cores, PREFIX_A + [7]) is second


def test_in_a_burst_affinity_holds_until_twice_the_least_load():
    cores = [FakeCore("a"), FakeCore("b")]
    router = CoreRouter(prefix_affinity=True, block_tokens=4)
    first = router.pick(cores, PREFIX_A)
    second = cores[1] if first is cores[0] else cores[0]
    second.num_in_flight, first.num_in_flight = 20, 30  # 10 more (over a batch), under twice the other's load
    assert router.pick(cores, PREFIX_A + [7]) is first
    first.num_in_flight = 41  # past twice the least-loaded core's load
    assert router.pick(cores, PREFIX_A + [7]) is second


def test_a_replaced_core_starts_without_prefixes():
    cores = [FakeCore("a"), FakeCore("b")]
    router = CoreRouter(prefix_affinity=True, block_tokens=4)
    chosen = router.pick(cores, PREFIX_A)
    index = cores.index(chosen)
    cores[1 - index].num_in_flight = 1
    assert router.pick(cores, PREFIX_A) is chosen  # affinity beats a lighter load
    cores[index] = FakeCore(chosen.core_id + "-new")  # the dead core's replacement (a new id)
    cores[index].num_in_flight = 1
    cores[1 - index].num_in_flight = 0
    assert router.pick(cores, PREFIX_A) is cores[1 - index]  # the old affinity is gone: load decides
    assert chosen.core_id not in router.index.blocks


def test_requests_sharing_a_prefix_reach_the_core_that_caches_it(loaded_model):
    cores = [EngineCore(LLMEngine.from_args(None, loaded=loaded_model, **ENGINE_KWARGS),
                        bind=f"inproc://tokenmill-routing-{i}", core_id=f"core-{i}").start() for i in range(2)]
    connections = [CoreConnection(core.address, context=core.context) for core in cores]
    engine = AsyncLLMEngine(connections, AsyncEngineConfig(prefix_routing=True), local_cores=cores)
    system_a = "You are a helpful assistant who answers questions about geography in one short sentence. "
    system_b = "You are a poet. Every answer you give is a rhyming couplet about the sea and the sky. "
    questions = ["Where is Paris?", "Where is Rome?", "Where is Oslo?"]
    params = SamplingParams(max_new_tokens=2, do_sample=False)

    async def run_all():
        for system in (system_a, system_b):
            for question in questions:  # one at a time: the load never decides
                async for _ in engine.generate(system + question, params):
                    pass

    try:
        asyncio.run(run_all())
        stats = [core.engine.get_stats() for core in cores]
        # Each system prompt went to one core (3 requests each), and the later requests hit its cache.
        assert sorted(c._num_added for c in connections) == [3, 3]
        assert all(s.prefix_cache_hit_blocks_total > 0 for s in stats), stats
    finally:
        engine.shutdown()
