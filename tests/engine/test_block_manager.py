"""BlockManager: ref counts, LRU free queue, fork with copy-on-write, prefix caching.

A fake KV cache (one token id per slot) stands in for the model: every token a sequence computes
is written into the slot its block table names, so a wrong block table, a missed copy-on-write or a
bad prefix-cache hit shows up as a wrong token read back.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.engine import block_manager as block_manager_module
from tokenmill.engine.block_manager import BlockManager, chain_hash
from tokenmill.engine.sequence import Sequence


class FakeKV:
    """What the model would have written into the paged cache: one token id per slot."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager
        self.slots: list[list[int | None]] = [[None] * block_manager.block_size for _ in range(block_manager.num_blocks)]

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            assert self.bm.ref_counts[dst] == 1, f"copy-on-write into block {dst} that is shared"
            self.slots[dst] = list(self.slots[src])

    def write(self, seq: Sequence, num_new_tokens: int) -> None:
        """Write seq's next `num_new_tokens` tokens (positions num_computed_tokens...) into its blocks."""
        bs = self.bm.block_size
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens):
            block = seq.block_table[pos // bs]
            assert self.bm.ref_counts[block] == 1, f"seq {seq.seq_id} writes into shared block {block}"
            self.slots[block][pos % bs] = seq.token_ids[pos]

    def read(self, seq: Sequence, num_tokens: int) -> list[int | None]:
        bs = self.bm.block_size
        return [self.slots[seq.block_table[pos // bs]][pos % bs] for pos in range(num_tokens)]


def block_hashes_of(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (reference for the manager's own)."""
    hashes: list[int] = []
    prev = None
    for i in range(len(token_ids) // block_size):
        prev = chain_hash(prev, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(prev)
    return hashes


def check_invariants(bm: BlockManager, seqs: list[Sequence], kv: FakeKV | None = None) -> None:
    bs = bm.block_size
    holders = [0] * bm.num_blocks
    for seq in seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), f"seq {seq.seq_id} holds a block twice"
        for block in seq.block_table:
            holders[block] += 1
    # Each block's ref count is the number of block tables holding it; free queue == unreferenced blocks.
    assert bm.ref_counts == holders
    assert set(bm.free_queue) == {b for b in range(bm.num_blocks) if holders[b] == 0}
    assert bm.num_free_blocks + sum(1 for h in holders if h) == bm.num_blocks
    # hash_to_block and block_hashes are two views of one map.
    for h, block in bm.hash_to_block.items():
        assert bm.block_hashes[block] == h
    for block, h in enumerate(bm.block_hashes):
        assert (h is None) == (bm.block_tokens[block] is None)
        if h is not None:
            assert bm.hash_to_block[h] == block
            if kv is not None:  # a cached block really holds the tokens it is indexed under
                assert tuple(kv.slots[block]) == bm.block_tokens[block]
    if not bm.enable_prefix_caching:
        assert not bm.hash_to_block
    for seq in seqs:
        assert seq.num_computed_tokens <= seq.num_tokens
        assert len(seq.block_table) >= bm.num_blocks_for(seq.num_computed_tokens)
        # Full computed blocks are hashed (chained), and a hashed block holds exactly these tokens.
        num_full = seq.num_computed_tokens // bs if bm.enable_prefix_caching else 0
        assert seq.num_hashed_blocks == len(seq.block_hashes) == num_full
        assert seq.block_hashes == block_hashes_of(seq.token_ids, bs)[:num_full]
        for i, block in enumerate(seq.block_table[:num_full]):
            if bm.block_hashes[block] is not None:
                assert bm.block_hashes[block] == seq.block_hashes[i]
                assert bm.block_tokens[block] == tuple(seq.token_ids[i * bs : (i + 1) * bs])
        if kv is not None:
            assert kv.read(seq, seq.num_computed_tokens) == seq.token_ids[: seq.num_computed_tokens]
    assert not bm.pending_copies


def run_tokens(bm: BlockManager, kv: FakeKV, seq: Sequence, num_new_tokens: int) -> None:
    """The model's half of a step for one sequence: copy-on-write, write KV, commit full blocks."""
    kv.apply_copies(bm.take_pending_copies())
    kv.write(seq, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens
    bm.commit_full_blocks(seq)


# ---------------------------------------------------------------------- property test
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # tiny vocabulary: many shared prefixes


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.seqs: list[Sequence] = []
        self.seq_ids = itertools.count()

    @initialize(num_blocks=st.integers(3, 14), block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.kv = FakeKV(self.bm)

    def _new_seq(self, token_ids: list[int]) -> Sequence:
        return Sequence(seq_id=next(self.seq_ids), token_ids=list(token_ids), num_prompt_tokens=len(token_ids))

    def _check_lookup(self, seq: Sequence) -> tuple[list[int], list[int]]:
        bm, bs = self.bm, self.bm.block_size
        blocks, hashes = bm.find_cached_prefix(seq)
        assert len(blocks) == len(hashes)
        assert len(blocks) * bs <= seq.num_tokens - 1, "a cache hit must leave >= 1 token to compute"
        if not bm.enable_prefix_caching:
            assert not blocks
        assert hashes == block_hashes_of(seq.token_ids, bs)[: len(blocks)]
        for i, block in enumerate(blocks):
            assert self.kv.slots[block] == seq.token_ids[i * bs : (i + 1) * bs]
        # The hit is as long as it can be: the next block is not cached under these tokens.
        k = len(blocks)
        if bm.enable_prefix_caching and (k + 1) * bs <= seq.num_tokens - 1:
            nxt = block_hashes_of(seq.token_ids, bs)[k]
            block = bm.hash_to_block.get(nxt)
            assert block is None or bm.block_tokens[block] != tuple(seq.token_ids[k * bs : (k + 1) * bs])
        return blocks, hashes

    def _allocate_and_run(self, seq: Sequence, num_new: int, cached=((), ())) -> bool:
        bm = self.bm
        blocks, hashes = cached
        if not bm.can_allocate(seq, num_new, blocks):
            assert bm.num_blocks_needed(seq, num_new, blocks) > bm.num_free_blocks
            before = (list(bm.ref_counts), list(bm.free_queue), list(seq.block_table))
            with pytest.raises(RuntimeError):
                bm.allocate(seq, num_new, blocks, hashes)
            assert before == (list(bm.ref_counts), list(bm.free_queue), list(seq.block_table))
            return False
        num_free = bm.num_free_blocks
        needed = bm.num_blocks_needed(seq, num_new, blocks)
        bm.allocate(seq, num_new, blocks, hashes)
        # needed is an upper bound (a copy-on-write may turn out unnecessary); never an underestimate.
        assert num_free - bm.num_free_blocks <= needed
        if blocks:
            assert seq.num_computed_tokens == len(blocks) * bm.block_size
            assert seq.block_table[: len(blocks)] == list(blocks)
        assert len(seq.block_table) == bm.num_blocks_for(seq.num_computed_tokens + num_new)
        # Every block that receives one of the new tokens is this sequence's alone.
        first = seq.num_computed_tokens // bm.block_size
        for block in seq.block_table[first:]:
            assert bm.ref_counts[block] == 1
        run_tokens(bm, self.kv, seq, num_new)
        return True

    @rule(token_ids=TOKENS, chunk=st.integers(1, 16))
    def add_sequence(self, token_ids: list[int], chunk: int) -> None:
        seq = self._new_seq(token_ids)
        cached = self._check_lookup(seq)
        num_new = min(chunk, seq.num_tokens - len(cached[0]) * self.bm.block_size)
        if self._allocate_and_run(seq, num_new, cached):
            self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 2))
    def step_sequence(self, data, chunk: int, token: int) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        if seq.num_uncomputed_tokens == 0:
            seq.token_ids.append(token)  # the model sampled a token
        self._allocate_and_run(seq, min(chunk, seq.num_uncomputed_tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 2))
    def fork_sequence(self, data, token: int) -> None:
        parent = data.draw(st.sampled_from(self.seqs))
        child = self._new_seq(parent.token_ids)
        refs = list(self.bm.ref_counts)
        self.bm.fork(parent, child)
        for block in parent.block_table:
            assert self.bm.ref_counts[block] == refs[block] + 1
        assert child.num_computed_tokens == parent.num_computed_tokens
        child.token_ids.append(token)  # the child samples its own next token
        self.seqs.append(child)
        with pytest.raises(RuntimeError):
            self.bm.fork(parent, child)  # a sequence that holds blocks cannot be forked into

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_sequence(self, data) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        old_table = list(seq.block_table)
        self.seqs.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.block_hashes == [] and seq.num_hashed_blocks == 0
        self.bm.free(seq)  # freeing an emptied sequence again is a no-op
        if old_table and all(self.bm.ref_counts[b] == 0 for b in old_table):
            stale = Sequence(seq_id=-1, token_ids=[], num_prompt_tokens=0, block_table=old_table)
            refs, free = list(self.bm.ref_counts), list(self.bm.free_queue)
            with pytest.raises(RuntimeError, match="freed twice"):
                self.bm.free(stale)  # the same blocks freed a second time
            assert (refs, free) == (list(self.bm.ref_counts), list(self.bm.free_queue))

    @rule(token_ids=TOKENS)
    def lookup_only(self, token_ids: list[int]) -> None:
        self._check_lookup(self._new_seq(token_ids))

    @rule()
    def reset_prefix_cache(self) -> None:
        live = {b: self.bm.block_hashes[b] for s in self.seqs for b in s.block_table}
        self.bm.reset_prefix_cache()
        for block in self.bm.free_queue:
            assert self.bm.block_hashes[block] is None
        assert {b: self.bm.block_hashes[b] for b in live} == live

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "bm"):
            check_invariants(self.bm, self.seqs, self.kv)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in list(self.seqs):
            self.bm.free(seq)
        self.seqs.clear()
        check_invariants(self.bm, self.seqs, self.kv)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.ref_counts == [0] * self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=list(HealthCheck),
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


# ---------------------------------------------------------------------- unit tests
def _computed_seq(bm: BlockManager, kv: FakeKV, seq_id: int, token_ids: list[int]) -> Sequence:
    seq = Sequence(seq_id=seq_id, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
    blocks, hashes = bm.find_cached_prefix(seq)
    bm.allocate(seq, seq.num_tokens - len(blocks) * bm.block_size, blocks, hashes)
    run_tokens(bm, kv, seq, seq.num_uncomputed_tokens)
    return seq


def test_prefix_cache_hit_reuses_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    kv = FakeKV(bm)
    a = _computed_seq(bm, kv, 0, list(range(10)))  # 2 full blocks + 2 tokens
    assert a.num_hashed_blocks == 2
    b = Sequence(seq_id=1, token_ids=list(range(10)) + [99], num_prompt_tokens=11)
    blocks, hashes = bm.find_cached_prefix(b)
    assert blocks == a.block_table[:2] and hashes == a.block_hashes
    bm.allocate(b, 3, blocks, hashes)
    assert b.num_computed_tokens == 8 and bm.num_cache_hits == 2
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2, 1]
    # A prompt that is exactly the cached blocks: the last block is recomputed (its logits are needed).
    c = Sequence(seq_id=2, token_ids=list(range(8)), num_prompt_tokens=8)
    assert bm.find_cached_prefix(c)[0] == a.block_table[:1]
    one = Sequence(seq_id=3, token_ids=[0, 1, 2, 3], num_prompt_tokens=4)
    assert bm.find_cached_prefix(one) == ([], [])
    # A different first block breaks the chain even where later blocks match.
    d = Sequence(seq_id=4, token_ids=[7, 1, 2, 3, 4, 5, 6, 7, 8], num_prompt_tokens=9)
    assert bm.find_cached_prefix(d) == ([], [])
    # A sequence that already computed tokens or holds blocks gets no lookup.
    assert bm.find_cached_prefix(b) == ([], [])
    for seq in (a, b):
        bm.free(seq)
    check_invariants(bm, [], kv)
    assert bm.num_free_blocks == 8


def test_prefix_cache_checks_tokens_on_every_hit(monkeypatch):
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda prev, tokens: 7)  # every block collides
    bm = BlockManager(num_blocks=6, block_size=2)
    kv = FakeKV(bm)
    a = _computed_seq(bm, kv, 0, [1, 2, 3])
    assert bm.hash_to_block == {7: a.block_table[0]}
    assert bm.find_cached_prefix(Sequence(seq_id=1, token_ids=[5, 6, 3], num_prompt_tokens=3)) == ([], [])
    assert bm.find_cached_prefix(Sequence(seq_id=2, token_ids=[1, 2, 9], num_prompt_tokens=3))[0] == [a.block_table[0]]
    # A colliding block with other tokens is neither a hit nor registered over the cached one.
    b = _computed_seq(bm, kv, 3, [5, 6, 0])
    assert bm.hash_to_block == {7: a.block_table[0]} and bm.block_hashes[b.block_table[0]] is None
    bm.free(a)
    bm.free(b)
    check_invariants(bm, [], kv)


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    kv = FakeKV(bm)
    a = _computed_seq(bm, kv, 0, [1, 2, 3, 4, 5])
    assert a.block_hashes == [] and not bm.hash_to_block
    assert bm.find_cached_prefix(Sequence(seq_id=1, token_ids=[1, 2, 3, 4, 5], num_prompt_tokens=5)) == ([], [])
    bm.free(a)
    assert bm.num_free_blocks == 6


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=2)
    kv = FakeKV(bm)
    prompts = {name: [10 * i, 10 * i + 1, 0] for i, name in enumerate("abc", start=1)}  # 1 full + 1 partial block
    seqs = {name: _computed_seq(bm, kv, i, tokens) for i, (name, tokens) in enumerate(prompts.items())}
    assert [seqs[n].block_table for n in "abc"] == [[0, 1], [2, 3], [4, 5]]
    for name in "abc":
        bm.free(seqs[name])
    assert list(bm.free_queue) == [1, 0, 3, 2, 5, 4]  # freed a, b, c; each sequence's tail block first

    def hit(name: str) -> list[int]:
        return bm.find_cached_prefix(Sequence(seq_id=99, token_ids=prompts[name], num_prompt_tokens=3))[0]

    assert (hit("a"), hit("b"), hit("c")) == ([0], [2], [4])
    # A cache hit takes b's block out of the queue; freed again it becomes the most recently used.
    b2 = Sequence(seq_id=9, token_ids=prompts["b"], num_prompt_tokens=3)
    blocks, hashes = bm.find_cached_prefix(b2)
    bm.allocate(b2, 1, blocks, hashes)
    assert b2.block_table == [2, 1]  # the fresh block is the least recently used one
    run_tokens(bm, kv, b2, 1)
    bm.free(b2)
    assert list(bm.free_queue) == [0, 3, 5, 4, 1, 2]
    hogs = []
    for i in range(6):
        seq = Sequence(seq_id=100 + i, token_ids=[50 + i], num_prompt_tokens=1)
        bm.allocate(seq, 1)
        hogs.append(seq)
        if i == 0:  # a's cached block was the least recently used: evicted first, b and c survive
            assert (hit("a"), hit("b"), hit("c")) == ([], [2], [4])
        if i == 3:
            assert (hit("c"), hit("b")) == ([], [2])
    assert [s.block_table[0] for s in hogs] == [0, 3, 5, 4, 1, 2]
    assert not bm.hash_to_block  # every reused block dropped its hash
    for seq in hogs:
        bm.free(seq)
    check_invariants(bm, [], kv)


def test_free_returns_tail_blocks_first():
    bm = BlockManager(num_blocks=4, block_size=1)
    seq = Sequence(seq_id=0, token_ids=[1, 2, 3], num_prompt_tokens=3)
    bm.allocate(seq, 3)
    table = list(seq.block_table)
    bm.free(seq)
    assert list(bm.free_queue) == [3] + table[::-1]


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    kv = FakeKV(bm)
    live = _computed_seq(bm, kv, 0, [1, 2, 3, 4, 5])
    gone = _computed_seq(bm, kv, 1, [7, 8, 9])
    bm.free(gone)
    assert len(bm.hash_to_block) == 3
    bm.reset_prefix_cache()
    assert set(bm.hash_to_block.values()) == set(live.block_table[:2])
    assert bm.find_cached_prefix(Sequence(seq_id=2, token_ids=[7, 8, 9], num_prompt_tokens=3)) == ([], [])
    assert len(bm.find_cached_prefix(Sequence(seq_id=3, token_ids=[1, 2, 3, 4, 0], num_prompt_tokens=5))[0]) == 2
    bm.free(live)
    check_invariants(bm, [], kv)


def test_fork_copy_on_write_of_shared_partial_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    kv = FakeKV(bm)
    parent = _computed_seq(bm, kv, 0, [1, 2, 3, 4, 5, 6])  # one full block + 2 tokens
    child = Sequence(seq_id=1, token_ids=list(parent.token_ids), num_prompt_tokens=6)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.block_hashes == parent.block_hashes
    shared_partial = parent.block_table[1]
    assert bm.ref_counts[shared_partial] == 2
    parent.token_ids.append(7)
    child.token_ids.append(8)
    free_before = bm.num_free_blocks
    assert bm.num_blocks_needed(child, 1) == 1
    bm.allocate(child, 1)
    assert bm.num_free_blocks == free_before - 1
    assert bm.pending_copies == [(shared_partial, child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert bm.ref_counts[shared_partial] == 1
    run_tokens(bm, kv, child, 1)
    bm.allocate(parent, 1)  # the parent is now alone in its block: no copy
    assert not bm.pending_copies and parent.block_table[1] == shared_partial
    run_tokens(bm, kv, parent, 1)
    assert kv.read(parent, 7) == [1, 2, 3, 4, 5, 6, 7]
    assert kv.read(child, 7) == [1, 2, 3, 4, 5, 6, 8]
    check_invariants(bm, [parent, child], kv)
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 6


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=6, block_size=2)
    kv = FakeKV(bm)
    parent = _computed_seq(bm, kv, 0, [1, 2, 3, 4])
    child = Sequence(seq_id=1, token_ids=[1, 2, 3, 4, 9], num_prompt_tokens=4)
    bm.fork(parent, child)
    bm.allocate(child, 1)
    assert not bm.pending_copies and child.block_table[:2] == parent.block_table
    run_tokens(bm, kv, child, 1)
    check_invariants(bm, [parent, child], kv)
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 6


def test_allocate_without_room_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = Sequence(seq_id=0, token_ids=[1, 2, 3, 4, 5], num_prompt_tokens=5)
    assert not bm.can_allocate(seq, 5) and bm.can_allocate(seq, 4)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(seq, 5)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_double_free_raises():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = Sequence(seq_id=0, token_ids=[1, 2, 3], num_prompt_tokens=3)
    bm.allocate(seq, 3)
    stale = Sequence(seq_id=0, token_ids=[], num_prompt_tokens=0, block_table=list(seq.block_table))
    bm.free(seq)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(stale)
    assert bm.ref_counts == [0, 0, 0] and bm.num_free_blocks == 3
