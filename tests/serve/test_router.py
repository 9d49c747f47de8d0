"""Prefix-aware request router: the index and ranking, and the router inside a real Ray Serve app."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest

from tokenmill.serve.deployment import ServeConfig
from tokenmill.serve.router import (
    PrefixAwareRouter,
    PrefixIndex,
    PromptRequest,
    SessionKey,
    prompt_key,
    rank_by_prefix,
    replica_placement,
    request_key,
    router_options,
)

SYSTEM = "You are a careful assistant who answers questions about the history of astronomy. " * 2


# ---------------------------------------------------------------------------------------- pure logic
def test_prompt_key_reads_prompts_messages_and_token_ids():
    assert prompt_key([PromptRequest(prompt="hello")], {}) == "hello"
    assert prompt_key([], {"request": {"prompt_token_ids": [1, 2, 3]}}) == (1, 2, 3)
    messages = [{"role": "system", "content": "sys "}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert prompt_key([SimpleNamespace(messages=messages)], {}) == "sys q"
    assert prompt_key([[5, 6]], {}) == (5, 6)
    # An HTTP request at an ASGI ingress carries only its scope: no prompt, least-loaded routing.
    assert prompt_key([SimpleNamespace(asgi_scope={"path": "/v1/completions"})], {}) is None
    assert prompt_key([""], {}) is None


def test_http_requests_fall_back_to_the_session_id():
    scope_only = SimpleNamespace(args=[SimpleNamespace(asgi_scope={})], kwargs={},
                                 metadata=SimpleNamespace(session_id="system-7"))
    key = request_key(scope_only)
    assert isinstance(key, SessionKey) and key == "system-7"
    index = PrefixIndex()
    index.insert(key, "r1")
    assert index.match(SessionKey("system-7"), ["r1", "r2"]) == {"r1": 1, "r2": 0}
    assert index.match("system-7", ["r1"]) == {"r1": 0}  # a prompt is never confused with a session
    scope_only.metadata.session_id = ""
    assert request_key(scope_only) is None
    with_prompt = SimpleNamespace(args=[PromptRequest(prompt="p")], kwargs={}, metadata=SimpleNamespace(session_id="s"))
    assert request_key(with_prompt) == "p"


def test_index_matches_leading_blocks_only():
    index = PrefixIndex(block_chars=4)
    index.insert("aaaabbbbcccc", "r1")
    index.insert("aaaaxxxx", "r2")
    assert index.match("aaaabbbbzzzz", ["r1", "r2", "r3"]) == {"r1": 2, "r2": 1, "r3": 0}
    assert index.match("bbbbcccc", ["r1"]) == {"r1": 0}  # same blocks at another offset: no match
    assert index.match("aaa", ["r1"]) == {"r1": 0}  # shorter than a block
    index.remove("r1")
    assert index.match("aaaabbbb", ["r1", "r2"]) == {"r1": 0, "r2": 1}
    index.keep_only(["r3"])
    assert index.blocks == {}


def test_index_forgets_least_recently_used_blocks():
    index = PrefixIndex(block_tokens=2, max_blocks_per_replica=3)
    index.insert((1, 2, 3, 4), "r")
    index.insert((9, 9, 8, 8), "r")  # 4 blocks sent, 3 kept: the oldest (1, 2) is forgotten
    assert index.match((1, 2, 3, 4), ["r"]) == {"r": 0}
    assert index.match((9, 9, 8, 8), ["r"]) == {"r": 2}


def test_bad_index_sizes_are_value_errors():
    with pytest.raises(ValueError, match="block_chars=0 is invalid"):
        PrefixIndex(block_chars=0)


def test_rank_prefers_longest_match_then_load():
    matched = {"a": 3, "b": 3, "c": 1}
    ranks = rank_by_prefix(matched, {"a": 2, "b": 0, "c": 0}, min_match_blocks=1, imbalance_threshold=4)
    assert ranks == [["a", "b"]]  # Serve picks the least loaded of the two: b; c is not offered
    # The best-matching replica is overloaded: affinity yields to load balance.
    ranks = rank_by_prefix({"a": 3, "b": 0}, {"a": 10, "b": 0}, min_match_blocks=1, imbalance_threshold=4)
    assert ranks == [["a", "b"]]
    # Both busy but within the threshold: the request waits for its replica.
    assert rank_by_prefix({"a": 3, "b": 0}, {"a": 16, "b": 13}, min_match_blocks=1, imbalance_threshold=4) == [["a"]]
    # No replica holds enough of the prefix: one rank, least loaded wins.
    assert rank_by_prefix({"a": 0, "b": 0}, {}, min_match_blocks=1, imbalance_threshold=4) == [["a", "b"]]
    assert rank_by_prefix({"a": 2, "b": 1}, {}, min_match_blocks=3, imbalance_threshold=4) == [["a", "b"]]


def test_tensor_parallel_replicas_get_a_placement_group_each():
    config = ServeConfig(num_replicas=2, num_gpus_per_replica=1, engine_kwargs={"tensor_parallel_size": 4})
    options = replica_placement(config)
    assert options["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert options["ray_actor_options"]["num_gpus"] == 0  # the ranks hold the GPUs, the replica drives them
    assert replica_placement(ServeConfig(engine_kwargs={"tensor_parallel_size": 1})) == {}
    assert router_options(ServeConfig()) == {}
    config = router_options(ServeConfig(prefix_routing=True))["request_router_config"]
    assert config.get_request_router_class() is PrefixAwareRouter


# ---------------------------------------------------------------------------------------- in Ray Serve
@pytest.fixture(scope="module")
def serve_instance():
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start()
    yield serve
    serve.shutdown()
    ray.shutdown()


def test_router_keeps_shared_prefixes_on_one_replica(serve_instance):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                      request_router_config=RequestRouterConfig(
                          request_router_class="tokenmill.serve.router.PrefixAwareRouter",
                          request_router_kwargs={"block_chars": 32}))
    class Echo:
        def __init__(self) -> None:
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def generate_tokens(self, request: PromptRequest) -> str:
            await asyncio.sleep(0.01)
            return self.replica_id

    handle = serve.run(Echo.bind(), name="router_test", route_prefix=None)
    systems = [f"System prompt number {i}. " + SYSTEM for i in range(4)]
    placed: dict[int, list[str]] = defaultdict(list)
    for round_ in range(3):
        responses = [(s, handle.generate_tokens.remote(PromptRequest(prompt=systems[s] + f"Question {round_}-{q}?")))
                     for s in range(4) for q in range(4)]
        for s, response in responses:
            placed[s].append(response.result(timeout_s=60))
    serve.delete("router_test")
    # Every system prompt stays with one replica; load spreads the prompts over both replicas.
    assert all(len(set(replicas)) == 1 for replicas in placed.values()), dict(placed)
    assert len(Counter(r[0] for r in placed.values())) == 2, dict(placed)
