"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.config import SchedulerConfig
from tokenmill.engine.device_copy import to_device
from tokenmill.engine.sequence import Sequence, SequenceGroup


@dataclass
class ScheduledBatch:
    """One step's work: for each sequence, the next `num_new_tokens` of its tokens run through the model."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    groups: list[SequenceGroup] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write before the run
    num_preempted: int = 0
    overlapped: bool = False  # scheduled before the previous step's tokens were applied (async scheduling)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def fill_pending_input_ids(self, input_ids: torch.Tensor) -> None:
        """Overlapped steps: a sequence whose last token is still a placeholder takes its input id from
        the previous step's sampled-id tensor, on the device, with no host sync.

        input_ids: [num_tokens] int64, this batch's tokens in order (each sequence's new tokens in a run).
        """
        if not self.overlapped:
            return
        dst: list[int] = []  # flat positions of placeholders
        src: list[int] = []  # their rows of the sampled-id tensor
        sampled_ids = None
        pos = 0
        for seq, num_new in zip(self.seqs, self.num_new_tokens):
            pos += num_new
            if seq.pending_ids is not None:
                sampled_ids = seq.pending_ids  # one tensor per step: every pending row points at it
                dst.append(pos - 1)
                src.append(seq.pending_row)
        if dst:
            index = to_device(src, torch.int64, sampled_ids.device)
            input_ids[to_device(dst, torch.int64, input_ids.device)] = sampled_ids[index].to(input_ids.device)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (so its logits are needed)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


def group_max_seqs(group: SequenceGroup) -> int:
    """How many sequences the request may hold at once (its share of max_num_seqs)."""
    n = len(group.seqs)
    return group.num_seats if group.num_seats >= n else n


class Scheduler:
    """Waiting and running queues; each step admits prefills and runs decodes under the budgets.

    Running requests go first, oldest first. When blocks run out, the newest running request is
    preempted (its blocks freed, to be recomputed later) until the older ones fit. New requests
    join only in steps without preemption, first come first served.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.num_preemptions_total = 0

    # ------------------------------------------------------------------ queues
    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def remove(self, group: SequenceGroup) -> None:
        """Take a request out of the queues and free all its blocks (finish or abort)."""
        group.released = True
        try:
            self.running.remove(group)  # one C-level identity scan; finished requests are mostly running
        except ValueError:
            if group in self.waiting:
                self.waiting.remove(group)
        for seq in group.seqs:
            self.block_manager.free(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(overlapped=self.config.async_scheduling)
        budget = self.config.max_num_batched_tokens
        num_seqs = 0

        # Running requests, oldest first; victims of preemption are taken from the newest end.
        bm = self.block_manager
        running = self.running
        still_running: list[SequenceGroup] = []
        next_index, end = 0, len(running)  # running[next_index:end] are still to be scheduled
        while next_index < end:
            group = running[next_index]
            next_index += 1
            seqs = group.seqs
            if len(seqs) == 1 and budget > 0 and seqs[0].num_uncomputed_tokens == 1:
                # Fast path, the common case: one sequence decoding one token. Same outcome as the
                # general path below (plan [1]); most steps its token fits its last block.
                seq = seqs[0]
                needed = bm.num_blocks_needed(seq, 1)
                if needed <= bm.num_free_blocks:
                    if needed:
                        bm.allocate(seq, 1)
                    batch.seqs.append(seq)
                    batch.num_new_tokens.append(1)
                    batch.groups.append(group)
                    budget -= 1
                    num_seqs += group.num_seats
                    still_running.append(group)
                    continue
            plan = self._plan(group, budget, nothing_scheduled=not batch.seqs)
            if plan is None:  # over the token budget this step: wait for the next one
                still_running.append(group)
                num_seqs += group_max_seqs(group)  # it keeps its seats: new requests may not take them
                continue
            while not self._can_allocate(group, plan):
                if next_index == end:
                    victim = group  # nothing newer to evict: this one waits
                else:
                    end -= 1
                    victim = running[end]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is group:
                    break
            else:
                self._allocate(group, plan, batch)
                budget -= plan[0] if len(plan) == 1 else sum(plan)
                num_seqs += group_max_seqs(group)
                still_running.append(group)
        self.running = still_running

        if not batch.num_preempted:
            while self.waiting:
                group = self.waiting[0]
                if num_seqs + group_max_seqs(group) > self.config.max_num_seqs:
                    break
                cached = self._lookup_prefix(group)
                plan = self._plan(group, budget, nothing_scheduled=not batch.seqs, cached=cached)
                if plan is None or not self._can_allocate(group, plan, cached):
                    break
                self.waiting.popleft()
                self._allocate(group, plan, batch, cached)
                if group.num_cached_tokens == 0:
                    group.num_cached_tokens = sum(len(c[0]) for c in cached) * self.block_manager.block_size
                budget -= sum(plan)
                num_seqs += group_max_seqs(group)
                self.running.append(group)
        batch.block_copies = self.block_manager.take_pending_copies()
        return batch

    def _plan(
        self,
        group: SequenceGroup,
        budget: int,
        *,
        nothing_scheduled: bool,
        cached: list[tuple[list[int], list[int]]] | None = None,
    ) -> list[int] | None:
        """Tokens to run for each of the group's sequences, or None if it must wait for budget."""
        seqs = group.seqs
        if len(seqs) == 1:
            # A lone sequence may be chunked (long prompts prefill over several steps).
            seq = seqs[0]
            need = len(seq.token_ids) - seq.num_computed_tokens
            if cached:
                need -= len(cached[0][0]) * self.block_manager.block_size
            if need <= budget:
                return [need]
            if self.config.enable_chunked_prefill and budget > 0:
                return [budget]
            return [need] if nothing_scheduled else None
        # Several sequences (samples or beams) step together, whole.
        bs = self.block_manager.block_size
        needs = [s.num_uncomputed_tokens - (len(cached[i][0]) * bs if cached else 0) for i, s in enumerate(seqs)]
        total = sum(needs)
        if total <= budget or nothing_scheduled:
            return needs
        return None

    def _lookup_prefix(self, group: SequenceGroup) -> list[tuple[list[int], list[int]]]:
        if group.params.prompt_logprobs is not None:  # every prompt position needs its logits
            return [([], []) for _ in group.seqs]
        return [self.block_manager.find_cached_prefix(s) for s in group.seqs]

    def _can_allocate(
        self, group: SequenceGroup, plan: list[int], cached: list[tuple[list[int], list[int]]] | None = None
    ) -> bool:
        bm = self.block_manager
        seqs = group.seqs
        if len(seqs) == 1 and not cached:
            return bm.num_blocks_needed(seqs[0], plan[0]) <= bm.num_free_blocks
        needed = sum(
            bm.num_blocks_needed(seq, plan[i], cached[i][0] if cached else ()) for i, seq in enumerate(seqs)
        )
        return needed <= bm.num_free_blocks

    def _allocate(
        self,
        group: SequenceGroup,
        plan: list[int],
        batch: ScheduledBatch,
        cached: list[tuple[list[int], list[int]]] | None = None,
    ) -> None:
        if cached:
            # Every sequence takes its cached blocks before any fresh block is popped: a fresh pop
            # could otherwise evict a free cached block that a sibling sequence is about to take.
            for seq, (blocks, hashes) in zip(group.seqs, cached):
                if blocks:
                    self.block_manager.allocate(seq, 0, blocks, hashes)
        allocate = self.block_manager.allocate
        for seq, num_new in zip(group.seqs, plan):
            allocate(seq, num_new)
        batch.seqs.extend(group.seqs)
        batch.num_new_tokens.extend(plan)
        batch.groups.append(group)

    def _preempt(self, group: SequenceGroup) -> None:
        """Free the group's blocks; it goes back to the front of the queue and is recomputed later.
        (Called inside schedule(), which rebuilds the running list without it.)"""
        for seq in group.seqs:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
        self.waiting.appendleft(group)
        self.num_preemptions_total += 1
