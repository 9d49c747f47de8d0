"""Scheduler: admission, token budget, chunked prefill, decode-first, preemption, abort, forked groups.

No model: a fake one writes each scheduled token into a fake paged KV cache (one token id per slot)
and, for each sequence that reaches its last token, reads the whole history back through the block
table and picks the next token as a deterministic function of it. Wrong block tables, missed
copy-on-write copies or bad prefix-cache hits change the history read back, hence the outputs.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tests.engine.test_block_manager import FakeKV, check_invariants
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.config import SchedulerConfig
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import ScheduledBatch, Scheduler, group_max_seqs
from tokenmill.engine.sequence import SequenceGroup

VOCAB = 50


def fake_next_token(history: list[int], index: int) -> int:
    """The fake model: the next token depends on the whole history and the sample's index."""
    h = 1 + 7 * index
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


class Harness:
    """Scheduler + BlockManager + fake model, stepping like LLMEngine.step (schedule -> run -> update)."""

    def __init__(
        self,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 256,
        max_model_len: int = 256,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        self.scheduler = Scheduler(self.config, self.bm)
        self.kv = FakeKV(self.bm)
        self.seq_ids = itertools.count()
        self.outputs: dict[str, list[list[int]]] = {}  # request id -> output token ids per sample index
        self.batches: list[ScheduledBatch] = []
        self.num_copies = 0
        self.num_chunks = 0  # prefills cut short by the budget

    def add(self, request_id: str, prompt: list[int], max_new_tokens: int, n: int = 1) -> SequenceGroup:
        params = SamplingParams(max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=n > 1)
        group = SequenceGroup(
            request_id, None, list(prompt), params, eos_token_ids=(), max_new_tokens=max_new_tokens,
            min_new_tokens=0, seed=0, seq_ids=self.seq_ids,
        )
        self.scheduler.add(group)
        return group

    # ------------------------------------------------------------------ one step
    def step(self) -> ScheduledBatch:
        running_before = list(self.scheduler.running)
        batch = self.scheduler.schedule()
        self.batches.append(batch)
        self._check_batch(batch, running_before)
        # The model: copy-on-write first, then write every scheduled token's KV.
        self.kv.apply_copies(batch.block_copies)
        self.num_copies += len(batch.block_copies)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            self.kv.write(seq, num_new)
            self.num_chunks += num_new < seq.num_uncomputed_tokens
        self.last_samples = [batch.samples(i) for i in range(len(batch.seqs))]
        sampled = {seq.seq_id for seq, s in zip(batch.seqs, self.last_samples) if s}
        # The update: advance, commit full blocks, sample, fork, finish.
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.bm.commit_full_blocks(seq)
        for group in batch.groups:
            for seq in [s for s in group.seqs if s.seq_id in sampled]:
                history = self.kv.read(seq, seq.num_tokens)
                assert history == seq.token_ids, f"seq {seq.seq_id} reads back a wrong KV history"
                draws = [seq]
                if not group.has_forked:
                    for k in range(1, group.params.num_return_sequences):
                        child = group.new_seq(list(seq.token_ids), index=k)
                        self.bm.fork(seq, child)
                        group.seqs.append(child)
                        draws.append(child)
                    group.has_forked = True
                for target in draws:
                    target.token_ids.append(fake_next_token(history, target.index))
                    if target.num_output_tokens >= group.max_new_tokens:
                        target.finish_reason = "length"
            for seq in [s for s in group.seqs if s.is_finished]:
                self.bm.free(seq)
                group.seqs.remove(seq)
                group.finished_seqs.append(seq)
            if group.is_finished:
                self.scheduler.remove(group)
                self.outputs[group.request_id] = [s.output_token_ids for s in group.all_seqs()]
        self.check_state()
        return batch

    def run(self, max_steps: int = 2000, arrivals: dict[int, list[tuple]] | None = None) -> None:
        for step in range(max_steps):
            for args in (arrivals or {}).pop(step, []):
                self.add(*args)
            if not self.scheduler.num_unfinished and not arrivals:
                break
            self.step()
        else:
            raise AssertionError(f"requests still unfinished after {max_steps} steps")
        self.check_all_free()

    # ------------------------------------------------------------------ checks
    def _check_batch(self, batch: ScheduledBatch, running_before: list[SequenceGroup]) -> None:
        cfg = self.config
        assert len(batch.seqs) == len(batch.num_new_tokens) == len({s.seq_id for s in batch.seqs})
        # The token budget holds; only a lone request that cannot be split may go over it.
        assert batch.num_tokens <= cfg.max_num_batched_tokens or len(batch.groups) == 1
        if not cfg.enable_chunked_prefill:
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
                assert num_new == seq.num_uncomputed_tokens, "prefill chunked with chunked prefill off"
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            assert 1 <= num_new <= seq.num_uncomputed_tokens
            assert len(seq.block_table) == self.bm.num_blocks_for(seq.num_computed_tokens + num_new)
        # A request's live sequences step together, whole.
        scheduled = {s.seq_id for s in batch.seqs}
        assert len(batch.groups) == len({id(g) for g in batch.groups})
        for group in batch.groups:
            assert all(s.seq_id in scheduled for s in group.seqs)
        assert sum(len(g.seqs) for g in batch.groups) == len(batch.seqs)
        # Running requests were served before any new one was admitted.
        order = [g for g in batch.groups]
        new = [i for i, g in enumerate(order) if g not in running_before]
        old = [i for i, g in enumerate(order) if g in running_before]
        assert not new or not old or max(old) < min(new)
        if batch.num_preempted:
            assert not new, "a request was admitted in a step that preempted"
        assert sum(group_max_seqs(g) for g in self.scheduler.running) <= cfg.max_num_seqs

    def check_state(self) -> None:
        live = [s for g in self.scheduler.running for s in g.seqs]
        for group in self.scheduler.waiting:
            for seq in group.seqs:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        check_invariants(self.bm, live, self.kv)

    def check_all_free(self) -> None:
        assert not self.scheduler.running and not self.scheduler.waiting
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.ref_counts == [0] * self.bm.num_blocks


def reference_outputs(requests: list[tuple]) -> dict[str, list[list[int]]]:
    """Outputs with room for everything: no chunking, no preemption, no prefix caching."""
    h = Harness(
        num_blocks=4096, block_size=16, max_num_batched_tokens=1 << 16, max_model_len=1 << 16,
        enable_chunked_prefill=False, enable_prefix_caching=False,
    )
    for args in requests:
        h.add(*args)
    h.run()
    assert not any(b.num_preempted for b in h.batches)
    return h.outputs


# ---------------------------------------------------------------------- admission
def test_admission_respects_max_num_seqs():
    requests = [(f"r{i}", [i, i + 1, i + 2, i + 3], 3) for i in range(5)]
    h = Harness(max_num_seqs=2)
    for args in requests:
        h.add(*args)
    first = h.step()
    assert [g.request_id for g in first.groups] == ["r0", "r1"]
    assert [g.request_id for g in h.scheduler.waiting] == ["r2", "r3", "r4"]
    h.run()
    assert max(len(b.groups) for b in h.batches) == 2
    assert h.outputs == reference_outputs(requests)


def test_admission_counts_the_samples_of_a_request():
    h = Harness(max_num_seqs=4)
    h.add("n3", [1, 2, 3], 4, n=3)
    h.add("b", [4, 5], 4, n=2)
    batch = h.step()
    assert [g.request_id for g in batch.groups] == ["n3"]  # 3 + 2 samples > 4
    h.run()


@pytest.mark.parametrize("chunked", [False, True])
def test_admission_respects_token_budget(chunked):
    h = Harness(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=chunked)
    for i in range(4):
        h.add(f"r{i}", [10 * i + j for j in range(6)], 4)
    first = h.step()
    if chunked:  # the third prompt takes what is left of the budget
        assert first.num_new_tokens == [6, 6, 4]
    else:  # the third prompt does not fit whole: it waits
        assert first.num_new_tokens == [6, 6]
        assert [g.request_id for g in h.scheduler.waiting] == ["r2", "r3"]
        second = h.step()
        assert [g.request_id for g in second.groups] == ["r0", "r1", "r2", "r3"]
        assert second.num_new_tokens == [1, 1, 6, 6]
    h.run()


def test_token_budget_respected_each_step():
    rng = random.Random(0)
    requests = [(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))], rng.randint(1, 8)) for i in range(12)]
    h = Harness(max_num_batched_tokens=10)
    for args in requests:
        h.add(*args)
    h.run()
    assert all(b.num_tokens <= 10 for b in h.batches)
    assert sum(b.num_tokens == 10 for b in h.batches) >= len(h.batches) // 2  # the budget is used, not wasted
    assert h.outputs == reference_outputs(requests)


# ---------------------------------------------------------------------- chunked prefill
def test_long_prompt_is_chunked_over_several_steps():
    h = Harness(max_num_batched_tokens=16)
    prompt = list(range(40))
    group = h.add("long", prompt, 3)
    seq = group.seqs[0]
    chunks = []
    for _ in range(3):
        batch = h.step()
        chunks.append(batch.num_new_tokens[0])
        assert h.last_samples == [seq.num_computed_tokens == 40]
        assert seq.num_output_tokens == (1 if seq.num_computed_tokens == 40 else 0)
    assert chunks == [16, 16, 8]
    assert h.step().num_new_tokens == [1]
    h.run()
    assert h.outputs == reference_outputs([("long", prompt, 3)])


@pytest.mark.parametrize("chunked", [False, True])
def test_long_prompt_waits_whole_when_chunking_is_off(chunked):
    h = Harness(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=chunked)
    h.add("short", [1, 2, 3, 4], 5)
    h.step()
    long_group = h.add("long", list(range(64)), 2)
    batch = h.step()  # the short request's decode leaves 63 tokens of budget
    if chunked:
        assert batch.num_new_tokens == [1, 63]
    else:
        assert batch.num_new_tokens == [1] and long_group in h.scheduler.waiting
        while long_group in h.scheduler.waiting:
            h.step()
        assert h.batches[-1].groups == [long_group] and h.batches[-1].num_new_tokens == [64]
    h.run()


def test_decodes_of_running_requests_go_before_new_prefills():
    h = Harness(max_num_batched_tokens=8)
    a = h.add("a", [1, 2], 6)
    b = h.add("b", [3, 4], 6)
    h.step()
    c = h.add("c", list(range(30)), 2)
    batch = h.step()
    assert batch.groups == [a, b, c]
    assert batch.num_new_tokens == [1, 1, 6]
    h.run()


# ---------------------------------------------------------------------- preemption
@pytest.mark.parametrize("caching", [False, True])
def test_preemption_of_newest_running_request(caching):
    # 7 blocks of 4: three 8-token prompts take 6; the next decode of each needs a new block.
    h = Harness(num_blocks=7, block_size=4, enable_prefix_caching=caching)
    requests = [(name, [10 * i + j for j in range(8)], 4) for i, name in enumerate("abc")]
    a, b, c = (h.add(*args) for args in requests)
    assert h.step().groups == [a, b, c]
    d = h.add("d", [40, 41], 1)  # waits behind the preempted request
    batch = h.step()
    assert batch.num_preempted == 1 and batch.groups == [a, b]
    assert list(h.scheduler.waiting) == [c, d] and h.scheduler.running == [a, b]
    seq = c.seqs[0]
    assert seq.num_computed_tokens == 0 and seq.block_table == [] and seq.num_tokens == 9  # keeps its token
    assert h.scheduler.num_preemptions_total == 1
    hits_before = h.bm.num_cache_hits
    while c in h.scheduler.waiting:
        hits_before = h.bm.num_cache_hits
        h.step()
    resumed = h.batches[-1]
    i = next(k for k, s in enumerate(resumed.seqs) if s is seq)
    # Recomputed: the whole history (less the prefix blocks still cached) runs again.
    if caching:
        assert resumed.num_new_tokens[i] == 9 - 4 * (h.bm.num_cache_hits - hits_before)
    else:
        assert resumed.num_new_tokens[i] == 9
    h.run()
    assert h.outputs == reference_outputs(requests + [("d", [40, 41], 1)])


def test_lone_request_preempts_itself_when_nothing_newer_runs():
    # Two requests fill the cache; the older one grows first, the newer cannot and preempts itself.
    h = Harness(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = h.add("a", [1, 2, 3, 4], 3)
    b = h.add("b", [5, 6, 7, 8], 3)
    h.step()
    batch = h.step()
    assert batch.groups == [a] and batch.num_preempted == 1
    assert list(h.scheduler.waiting) == [b]
    h.run()
    assert h.outputs == reference_outputs([("a", [1, 2, 3, 4], 3), ("b", [5, 6, 7, 8], 3)])


def test_readmitted_group_takes_every_sibling_cached_prefix():
    # 6 blocks of 2. a and g (2 samples) grow until g preempts itself; when a finishes, g comes back
    # and each sample finds its own cached blocks. Those sit at the head of the LRU queue: a fresh
    # block popped for one sample must not be a cached block its sibling is about to take.
    h = Harness(num_blocks=6, block_size=2)
    a = h.add("a", [9, 9, 9], 4)
    g = h.add("g", [1, 2, 3], 4, n=2)
    h.step()
    h.step()  # copy-on-write: each sample now has its own second block
    batch = h.step()  # a takes the last free block; g cannot grow and preempts itself
    assert batch.groups == [a] and batch.num_preempted == 1 and list(h.scheduler.waiting) == [g]
    h.step()  # a finishes
    assert "a" in h.outputs
    hits = h.bm.num_cache_hits
    batch = h.step()
    assert batch.groups == [g] and batch.num_new_tokens == [1, 1]
    assert h.bm.num_cache_hits - hits == 4  # the shared prompt block and each sample's own block
    h.run()
    assert h.outputs == reference_outputs([("a", [9, 9, 9], 4), ("g", [1, 2, 3], 4, 2)])


# ---------------------------------------------------------------------- abort
def test_abort_frees_blocks_at_once():
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=16)
    long_group = h.add("long", list(range(40)), 4)
    forked = h.add("forked", [1, 2, 3, 4, 5], 6, n=3)
    h.step()  # long: first 16-token chunk
    assert long_group.seqs[0].num_computed_tokens == 16
    h.scheduler.remove(long_group)  # abort mid-prefill
    assert long_group not in h.scheduler.running
    h.check_state()
    while len(forked.seqs) < 3:
        h.step()
    h.step()
    assert h.bm.num_free_blocks < h.bm.num_blocks
    h.scheduler.remove(forked)  # abort with shared blocks
    h.check_all_free()
    waiting = h.add("never-run", [7, 8, 9], 2)
    h.scheduler.remove(waiting)  # abort before scheduling
    assert not h.scheduler.waiting
    h.check_all_free()


# ---------------------------------------------------------------------- multi-sequence requests
def test_forked_samples_step_whole_with_copy_on_write():
    h = Harness(num_blocks=16, block_size=4)
    group = h.add("n3", [1, 2, 3, 4, 5, 6], 4, n=3)  # last prompt block is partial: shared, then copied
    first = h.step()
    assert first.num_new_tokens == [6] and len(group.seqs) == 3
    shared = group.seqs[0].block_table[1]
    assert all(s.block_table == group.seqs[0].block_table for s in group.seqs)
    second = h.step()
    assert [s.seq_id for s in second.seqs] == [s.seq_id for s in group.seqs] and second.num_new_tokens == [1, 1, 1]
    assert len(second.block_copies) == 2 and all(src == shared for src, _ in second.block_copies)
    assert len({s.block_table[1] for s in group.seqs}) == 3  # each sample now writes its own block
    assert group.seqs[0].block_table[0] == group.seqs[1].block_table[0]  # the full block stays shared
    h.run()
    outs = h.outputs["n3"]
    assert len({tuple(o) for o in outs}) == 3  # the samples diverged
    assert h.outputs == reference_outputs([("n3", [1, 2, 3, 4, 5, 6], 4, 3)])


def test_group_waits_whole_for_budget():
    h = Harness(max_num_batched_tokens=4)
    a = h.add("a", [1, 2], 3)
    g = h.add("g", [3, 4], 3, n=4)
    h.step()
    h.step()  # g samples and forks
    assert len(g.seqs) == 4
    batch = h.step()  # a's decode leaves 3 tokens: g's 4 samples wait whole
    assert batch.groups == [a]
    h.run()
    assert all(len(b.groups) == 1 or g not in b.groups for b in h.batches[3:])


def test_deferred_group_still_counts_against_max_num_seqs():
    h = Harness(max_num_seqs=4, max_num_batched_tokens=3)
    h.add("a", [1, 2], 8)
    g = h.add("g", [3, 4], 8, n=3)
    h.step()
    h.step()
    assert len(g.seqs) == 3
    late = h.add("late", [5, 6], 2)
    h.step()  # g (3 tokens) does not fit after a's decode; `late` must not take its seats
    assert late in h.scheduler.waiting
    h.run()


# ---------------------------------------------------------------------- parity under pressure
def _workload(seed: int, num_requests: int) -> list[tuple]:
    rng = random.Random(seed)
    bases = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    requests = []
    for i in range(num_requests):
        prompt = list(rng.choice(bases))[: rng.randint(1, 20)] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
        n = rng.choice([1, 1, 1, 2, 3])
        requests.append((f"r{i}", prompt or [0], rng.randint(1, 14), n))
    return requests


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_outputs_match_unconstrained_run(seed, caching):
    requests = _workload(seed, 16)
    block_size = 4
    per_request = max(-(-(len(r[1]) + r[2]) // block_size) * r[3] for r in requests)
    h = Harness(
        num_blocks=per_request + 2, block_size=block_size, max_num_seqs=16, max_num_batched_tokens=16,
        enable_prefix_caching=caching,
    )
    rng = random.Random(seed)
    arrivals: dict[int, list[tuple]] = {}
    for args in requests:
        arrivals.setdefault(rng.randint(0, 6), []).append(args)
    h.run(arrivals=arrivals)
    assert h.outputs == reference_outputs(requests)
    assert sum(b.num_preempted for b in h.batches) > 0
    assert h.num_copies > 0
    assert h.num_chunks > 0
    if caching:
        assert h.bm.num_cache_hits > 0
