"""Which replica or engine core was sent which prompt prefixes: chained block hashes per target.

Shared by the Ray Serve request router (serve/router.py: replicas) and the API side's choice of
engine core (serve/core_routing.py: cores). No Ray here: the API side imports it without Serve.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

DEFAULT_BLOCK_CHARS = 64
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_MAX_BLOCKS_PER_REPLICA = 200_000


class SessionKey(str):
    """A client-given routing key (Serve's session id): one block, matched whole."""


class PrefixIndex:
    """Which replica was sent which chained prefix blocks (an LRU set of block hashes per replica)."""

    def __init__(self, block_chars: int = DEFAULT_BLOCK_CHARS, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 max_blocks_per_replica: int = DEFAULT_MAX_BLOCKS_PER_REPLICA) -> None:
        for name, value in (("block_chars", block_chars), ("block_tokens", block_tokens),
                            ("max_blocks_per_replica", max_blocks_per_replica)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")
        self.block_chars = block_chars
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks_per_replica
        self.blocks: dict[Any, OrderedDict[int, None]] = {}

    def block_hashes(self, key: str | tuple[int, ...]) -> list[int]:
        """Hashes of the key's full blocks, each chained to the ones before it."""
        if isinstance(key, SessionKey):
            return [hash(("session", str(key)))]
        size = self.block_chars if isinstance(key, str) else self.block_tokens
        hashes, prev = [], None
        for start in range(0, len(key) - size + 1, size):
            prev = hash((prev, key[start : start + size]))
            hashes.append(prev)
        return hashes

    def match(self, key: str | tuple[int, ...], replica_ids: Iterable[Any]) -> dict[Any, int]:
        """For each replica, how many leading blocks of `key` it was sent."""
        hashes = self.block_hashes(key)
        matched = {}
        for rid in replica_ids:
            seen = self.blocks.get(rid, {})
            n = 0
            while n < len(hashes) and hashes[n] in seen:
                n += 1
            matched[rid] = n
        return matched

    def insert(self, key: str | tuple[int, ...], replica_id: Any) -> None:
        seen = self.blocks.setdefault(replica_id, OrderedDict())
        for h in self.block_hashes(key):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def num_blocks(self, replica_id: Any) -> int:
        return len(self.blocks.get(replica_id, ()))

    def remove(self, replica_id: Any) -> None:
        self.blocks.pop(replica_id, None)

    def keep_only(self, replica_ids: Iterable[Any]) -> None:
        alive = set(replica_ids)
        for rid in [r for r in self.blocks if r not in alive]:
            del self.blocks[rid]


def rank_by_prefix(matched: dict[Any, int], queue_lens: dict[Any, int], *, min_match_blocks: int,
                   imbalance_threshold: int | None) -> list[list[Any]]:
    """Replica ids in ranks: the replicas holding the longest prefix match, or all of them.

    With a match, only the matching replicas are offered: when they are full the request waits for
    them (Serve retries with backoff) rather than recomputing its prefix elsewhere, unless they run
    more than `imbalance_threshold` requests above the least-loaded replica (None: never), where load wins.
    Within a rank the caller picks the least-loaded replica, so load breaks ties.
    """
    ids = list(matched)
    best = max(matched.values(), default=0)
    if best < min_match_blocks:
        return [ids]
    least = min((queue_lens.get(r, 0) for r in ids), default=0)
    limit = float("inf") if imbalance_threshold is None else imbalance_threshold
    preferred = [r for r in ids if matched[r] == best and queue_lens.get(r, 0) - least <= limit]
    if not preferred:
        return [ids]
    return [preferred]
