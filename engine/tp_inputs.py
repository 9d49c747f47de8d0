"""The one message a tensor-parallel step sends its workers: the batch as flat arrays, no Sequence objects.

The driver packs a `ScheduledBatch` into `StepInputs` (only this step's new tokens, the block tables,
the copy-on-write pairs); each worker unpacks it into a `StepBatch`, which reads like a ScheduledBatch
to the public `ModelRunner.run`, so every rank runs the same forward path as a single-process engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenmill.engine.scheduler import ScheduledBatch


@dataclass(frozen=True)
class StepInputs:
    new_token_ids: np.ndarray  # [num_tokens] int64: this step's tokens of every sequence, concatenated
    num_computed: np.ndarray  # [num_seqs] int64: tokens already in the cache before this step
    num_new: np.ndarray  # [num_seqs] int64: tokens run this step
    num_tokens: np.ndarray  # [num_seqs] int64: the sequence's length (num_computed + num_new == it: samples)
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with -1
    block_copies: np.ndarray  # [num_copies, 2] int64: (src, dst) copy-on-write before the forward

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.new_token_ids, self.num_computed, self.num_new, self.num_tokens,
                                      self.block_tables, self.block_copies))


def pack_step(batch: ScheduledBatch) -> StepInputs:
    new_ids: list[int] = []
    computed, new, total = [], [], []
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        new_ids.extend(seq.token_ids[start : start + num_new])
        computed.append(start)
        new.append(num_new)
        total.append(seq.num_tokens)
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = np.full((len(batch.seqs), max_blocks), -1, dtype=np.int32)  # [num_seqs, max_blocks]
    for i, seq in enumerate(batch.seqs):
        tables[i, : len(seq.block_table)] = seq.block_table
    return StepInputs(
        new_token_ids=np.asarray(new_ids, dtype=np.int64),
        num_computed=np.asarray(computed, dtype=np.int64),
        num_new=np.asarray(new, dtype=np.int64),
        num_tokens=np.asarray(total, dtype=np.int64),
        block_tables=tables,
        block_copies=np.asarray(batch.block_copies, dtype=np.int64).reshape(-1, 2),
    )


class _TokenWindow:
    """A sequence's token ids, of which only [offset, offset + len(new)) are known (this step's tokens)."""

    def __init__(self, new_ids: list[int], offset: int, length: int) -> None:
        self.new_ids = new_ids
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice | int) -> list[int] | int:
        if isinstance(key, int):
            return self.new_ids[key - self.offset if key >= 0 else self.length + key - self.offset]
        start, stop, step = key.indices(self.length)
        if step != 1 or start < self.offset or stop > self.offset + len(self.new_ids):
            raise IndexError(f"tokens [{start}, {stop}) are not part of this step's message")
        return self.new_ids[start - self.offset : stop - self.offset]


@dataclass
class StepSequence:
    """What a ModelRunner reads of a Sequence: computed/total lengths, this step's tokens, the block table."""

    seq_id: int
    num_computed_tokens: int
    num_tokens: int
    token_ids: _TokenWindow
    block_table: list[int]


@dataclass
class StepBatch:
    """A ScheduledBatch rebuilt on a worker from StepInputs (the fields ModelRunner.run reads)."""

    seqs: list[StepSequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    groups = ()  # no requests on a worker: no prompt_logprobs rows (the engine rejects them under TP)

    def samples(self, i: int) -> bool:
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens

    def fill_pending_input_ids(self, input_ids) -> None:
        """No overlapped steps under tensor parallelism (the engine rejects async_scheduling there)."""


def unpack_step(inputs: StepInputs) -> StepBatch:
    ids = inputs.new_token_ids.tolist()
    seqs = []
    pos = 0
    for i, (start, num_new, total) in enumerate(zip(inputs.num_computed.tolist(), inputs.num_new.tolist(),
                                                    inputs.num_tokens.tolist())):
        row = inputs.block_tables[i]
        table = row[row >= 0].tolist()
        seqs.append(StepSequence(i, start, total, _TokenWindow(ids[pos : pos + num_new], start, total), table))
        pos += num_new
    copies = [(int(s), int(d)) for s, d in inputs.block_copies.tolist()]
    return StepBatch(seqs, inputs.num_new.tolist(), copies)
