"""Replica placement and a prefix-aware request router for Ray Serve (the custom request router API).

`PrefixAwareRouter` sends a request whose prompt starts like an earlier one to the replica that
served it, where the engine's prefix cache most likely still holds those KV blocks; load is the
tie-breaker (Serve picks the least-loaded replica among equal matches), a new prefix goes to the
replica holding the fewest prefix blocks, and an optional guard (a replica more than
`imbalance_threshold` requests busier than the least-loaded one loses its affinity) is off by default. Prompts are cut into chained blocks (`block_chars` characters of text, or
`block_tokens` token ids) and the router remembers, per replica, the hashes of the blocks it
routed there (bounded, least recently used first out).

The router sees a request's arguments before it is routed, so it works on deployment-handle calls
whose arguments carry the prompt (`PromptRequest`, any object or dict with `prompt_token_ids`,
`prompt` or `messages`). An HTTP request reaching an ASGI ingress replica carries only the
connection scope at routing time (the body is streamed afterwards); for those the router uses the
request's Serve session id instead (the `x-session-id` header, e.g. a client's id for its system
prompt, like OpenAI's `prompt_cache_key`): one session, one replica. Requests with neither are
routed least-loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ray.serve.request_router import RequestRouter

from tokenmill.serve.prefix_index import (  # noqa: F401 - re-exported: the router's building blocks
    DEFAULT_BLOCK_CHARS,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MAX_BLOCKS_PER_REPLICA,
    PrefixIndex,
    SessionKey,
    rank_by_prefix,
)

DEFAULT_MIN_MATCH_BLOCKS = 1
DEFAULT_IMBALANCE_THRESHOLD: int | None = None  # None: affinity always wins, load only breaks ties


# ---------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptRequest:
    """A completion asked through a deployment handle (the router reads `prompt`)."""

    prompt: str | list[int]
    max_tokens: int = 16
    extra: dict[str, Any] = field(default_factory=dict)  # further SamplingParams fields


def prompt_key(args: Iterable[Any], kwargs: dict[str, Any]) -> str | tuple[int, ...] | None:
    """The prompt (text or token ids) carried by a request's arguments; None when there is none."""
    for value in (*args, *kwargs.values()):
        key = _as_key(value)
        if key is not None:
            return key
    return None


def request_key(pending_request: Any) -> str | tuple[int, ...] | None:
    """A pending Serve request's routing key: its prompt, else its session id, else None."""
    if pending_request is None:
        return None
    key = prompt_key(pending_request.args or (), pending_request.kwargs or {})
    if key is None:
        session = getattr(getattr(pending_request, "metadata", None), "session_id", None)
        key = SessionKey(session) if session else None
    return key


def _as_key(value: Any) -> str | tuple[int, ...] | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, int) for t in value):
        return tuple(value)
    for name in ("prompt_token_ids", "prompt", "messages"):
        field_value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
        if field_value is None:
            continue
        if name == "messages":
            return "".join(_message_text(m) for m in field_value) or None
        return _as_key(field_value)
    return None


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", message)
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


# ---------------------------------------------------------------------------------------- router
class PrefixAwareRouter(RequestRouter):
    """Ray Serve request router: prefix affinity first, least-loaded as the tie-breaker.

    Not FIFO: the replica chosen for a request goes to that request (FIFOMixin would hand it to
    the oldest pending one, whose prefix may live elsewhere).
    """

    def initialize_state(self, block_chars: int = DEFAULT_BLOCK_CHARS, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                         min_match_blocks: int = DEFAULT_MIN_MATCH_BLOCKS,
                         imbalance_threshold: int | None = DEFAULT_IMBALANCE_THRESHOLD,
                         max_blocks_per_replica: int = DEFAULT_MAX_BLOCKS_PER_REPLICA) -> None:
        self.index = PrefixIndex(block_chars, block_tokens, max_blocks_per_replica)
        self.min_match_blocks = min_match_blocks
        self.imbalance_threshold = imbalance_threshold

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        key = request_key(pending_request)
        if key is None or not hasattr(self, "index"):
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queue_lens = {rid: cache.get(rid) or 0 for rid in by_id}
        ranks = rank_by_prefix(self.index.match(key, by_id), queue_lens, min_match_blocks=self.min_match_blocks,
                               imbalance_threshold=self.imbalance_threshold)
        if len(ranks[0]) > 1:
            # Claim the prefix for the least-loaded replica now, so that requests routed before this one
            # is answered follow it; no fallback rank: a second replica served from a fallback would
            # match the prefix too, and the prefix would spread over every replica.
            # A new prefix goes to the replica holding the fewest prefix blocks (queue lengths, often all
            # unknown in a burst, break ties): prefixes, and with them the load, spread evenly.
            chosen = min(ranks[0], key=lambda rid: (self.index.num_blocks(rid), queue_lens[rid]))
            self.index.insert(key, chosen)
            ranks = [[chosen]]
        return [[by_id[rid] for rid in rank] for rank in ranks if rank]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        key = request_key(pending_request)
        if key is not None and hasattr(self, "index"):
            self.index.insert(key, replica_id)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        if hasattr(self, "index"):
            self.index.remove(replica_id)

    def update_replicas(self, replicas: list) -> None:
        super().update_replicas(replicas)
        if hasattr(self, "index"):
            self.index.keep_only(r.replica_id for r in replicas)



# ---------------------------------------------------------------------------------------- deployment options
def router_options(config: Any, **router_kwargs: Any) -> dict[str, Any]:
    """Deployment options selecting PrefixAwareRouter when `config.prefix_routing` is on ({} otherwise)."""
    if not getattr(config, "prefix_routing", False):
        return {}
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class=f"{__name__}.PrefixAwareRouter", request_router_kwargs=router_kwargs,
        request_routing_stats_period_s=1.0)}


def replica_placement(config: Any) -> dict[str, Any]:
    """Deployment options for tensor-parallel replicas: a placement group of 1 + N bundles each.

    Bundle 0 holds the replica (the engine's driver: scheduler, blocks, API), bundles 1..N one rank
    each (a GPU each on CUDA), all on one node (STRICT_PACK). With N = 1 the replica holds the
    model itself and keeps its plain actor options.
    """
    size = int(getattr(config, "engine_kwargs", {}).get("tensor_parallel_size", 1))
    if size <= 1:
        return {}
    gpus = config.gpus_per_replica()
    rank_bundle = {"CPU": 1.0, **({"GPU": 1.0} if gpus > 0 else {})}
    return {
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": config.num_cpus_per_replica}] + [rank_bundle] * size,
        "placement_group_strategy": "STRICT_PACK",  # one node: the ranks all-reduce every layer
    }


# ---------------------------------------------------------------------------------------- handle route
async def complete_for_handle(engine: Any, request: PromptRequest, replica_id: str) -> dict[str, Any]:
    """Run `request` on a replica's engine; the result names the replica and the engine core that ran
    it, and every core's prefix-cache counters."""
    import uuid

    from tokenmill.engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=request.max_tokens, **request.extra)
    stream = await engine.add_request(uuid.uuid4().hex, request.prompt, params)
    final = None
    try:
        async for output in stream:
            final = output
    finally:
        stream.abort()  # a no-op once it finished
    stats = engine.get_stats()
    return {
        "replica_id": replica_id,
        "core_id": stream.core_id,
        "token_ids": list(final.outputs[0].token_ids),
        "text": final.outputs[0].text,
        "error": final.error,
        "prefix_cache_hit_blocks_total": stats.prefix_cache_hit_blocks_total,
        "prompt_tokens_total": stats.prompt_tokens_total,
        "cores": {c.info["core_id"]: {"prefix_cache_hit_blocks_total": c.stats["prefix_cache_hit_blocks_total"],
                                      "prompt_tokens_total": c.stats["prompt_tokens_total"]} for c in engine.cores},
    }
