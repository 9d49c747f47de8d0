"""Paged KV-cache blocks: allocation, reference counts, fork with copy-on-write, prefix caching."""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.engine.sequence import Sequence


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained over every block before it."""
    return hash((prev_hash, token_ids))


class BlockManager:
    """Owns the block ids of the KV cache (the tensors live in the model runner).

    Free blocks wait in LRU order; a freed block that holds a full, hashed block of tokens
    keeps its hash until it is reused, so a later request with the same prefix can take it back.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # checked on every cache hit
        self.hash_to_block: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) copy-on-write, drained by the scheduler
        self.num_cache_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix caching
    def find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Blocks (and their hashes) already holding a prefix of `seq`'s tokens, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table:
            return [], []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs  # never the whole sequence: its last token must run
        blocks: list[int] = []
        hashes: list[int] = []
        prev: int | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            blocks.append(block)
            hashes.append(h)
            prev = h
        return blocks, hashes

    # ------------------------------------------------------------------ allocation
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> int:
        """Free blocks that allocate(seq, num_new_tokens, cached_blocks) would use up."""
        if not cached_blocks:  # the per-step case (decodes, prefill chunks): a few integer operations
            bs = self.block_size
            computed = seq.num_computed_tokens
            needed = -(-(computed + num_new_tokens) // bs) - len(seq.block_table)
            if needed < 0:
                needed = 0
            if computed % bs and self._needs_copy_on_write(seq):
                needed += 1
            return needed
        total = self.num_blocks_for(seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens)
        needed = max(0, total - len(seq.block_table) - len(cached_blocks))
        if self._needs_copy_on_write(seq):
            needed += 1
        reclaimed = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)  # cached blocks leave the free queue
        return needed + reclaimed

    def _needs_copy_on_write(self, seq: Sequence) -> bool:
        """The next token lands in a partial last block that another sequence shares."""
        idx, offset = divmod(seq.num_computed_tokens, self.block_size)
        return offset != 0 and idx < len(seq.block_table) and self.ref_counts[seq.block_table[idx]] > 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), cached_hashes: list[int] = ()
    ) -> None:
        """Make room for `num_new_tokens` more tokens of `seq` (call can_allocate first)."""
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            raise RuntimeError("BlockManager.allocate called without room: check can_allocate first")
        if cached_blocks:
            for block in cached_blocks:
                self._take(block)
            seq.block_table.extend(cached_blocks)
            seq.block_hashes.extend(cached_hashes)
            seq.num_hashed_blocks = len(seq.block_hashes)
            seq.num_computed_tokens = len(cached_blocks) * self.block_size
            self.num_cache_hits += len(cached_blocks)
        if seq.num_computed_tokens % self.block_size and self._needs_copy_on_write(seq):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._pop_free()
            self.pending_copies.append((src, dst))
            self.ref_counts[src] -= 1
            seq.block_table[idx] = dst
        total = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self._pop_free())

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)  # least recently used
        h = self.block_hashes[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hashes[block] = None
            self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks; a later write to a shared partial block copies it."""
        if child.block_table:
            raise RuntimeError(f"fork into sequence {child.seq_id} that already holds blocks")
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.num_computed_tokens = parent.num_computed_tokens
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody holds go back to the free queue (tail blocks first)."""
        for block in seq.block_table:  # check first, so a double free leaves the counts intact
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice (sequence {seq.seq_id})")
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens (after a model step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        while seq.num_hashed_blocks < num_full:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev = seq.block_hashes[i - 1] if i else None
            h = chain_hash(prev, tokens)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hashes[block] is None:
                self.hash_to_block[h] = block
                self.block_hashes[block] = h
                self.block_tokens[block] = tokens
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (live blocks keep their hashes)."""
        for block in list(self.free_queue):
            h = self.block_hashes[block]
            if h is not None:
                self.hash_to_block.pop(h, None)
                self.block_hashes[block] = None
                self.block_tokens[block] = None
