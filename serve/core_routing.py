"""Which engine core an API-side request goes to.

By default the live core with the fewest requests in flight. With prefix affinity, a prompt whose
leading token blocks this front already sent to a core goes to that core, where its KV blocks are
likely still cached, unless that core runs more requests than the least-loaded one by over a
full batch (`max_num_seqs`) and by over the least-loaded core's own count (twice its load); a new prefix goes to the least-loaded core (ties: the core holding
the fewest prefix blocks). The front has the token ids (it tokenizes), so HTTP requests get
affinity too, whichever API replica they reach; each front keeps its own index.
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenmill.engine.errors import EngineDeadError
from tokenmill.serve.prefix_index import DEFAULT_BLOCK_TOKENS, PrefixIndex, rank_by_prefix


class CoreRouter:
    def __init__(self, prefix_affinity: bool = False, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        self.prefix_affinity = prefix_affinity
        self.index = PrefixIndex(block_tokens=block_tokens) if prefix_affinity else None

    def pick(self, cores: Sequence[Any], token_ids: Sequence[int]) -> Any:
        """The core for a prompt; `cores` are CoreConnections (is_alive, num_in_flight, info)."""
        live = [c for c in cores if c.is_alive]
        if not live:
            raise EngineDeadError("the engine is not running: no engine core is alive")
        if self.index is None or len(live) == 1:
            return min(live, key=lambda c: c.num_in_flight)
        by_id = {c.info["core_id"]: c for c in live}
        self.index.keep_only(by_id)  # a replaced core starts with an empty cache
        load = {core_id: c.num_in_flight for core_id, c in by_id.items()}
        # Load wins only past a batch more than the least-loaded core and past twice its load: in a
        # burst every core queues, and a few requests more is no reason to recompute a prefix.
        batch = min(int(c.info.get("max_num_seqs", 1)) for c in live)
        threshold = max(batch, min(load.values()))
        key = tuple(token_ids)
        (rank,) = rank_by_prefix(self.index.match(key, by_id), load, min_match_blocks=1,
                                 imbalance_threshold=threshold)
        chosen = min(rank, key=lambda core_id: (load[core_id], self.index.num_blocks(core_id)))
        self.index.insert(key, chosen)
        return by_id[chosen]
