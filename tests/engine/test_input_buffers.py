"""Input preparation into persistent buffers: equal to inputs built directly from the sequences,
across decode, prefill chunks, copy-on-write, freed tables and row eviction; decode padding."""

import random

import numpy as np
import pytest
import torch

from tokenmill.engine.input_buffers import BlockTableRows, InputBuffers
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence

BS = 4


def expected(batch: ScheduledBatch) -> dict[str, list]:
    out = {"input_ids": [], "positions": [], "slot_mapping": [], "seq_lens": [], "query_start_loc": [0],
           "logits_indices": [], "block_tables": []}
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        out["input_ids"] += seq.token_ids[start:end]
        out["positions"] += list(range(start, end))
        out["slot_mapping"] += [seq.block_table[p // BS] * BS + p % BS for p in range(start, end)]
        out["seq_lens"].append(end)
        out["query_start_loc"].append(out["query_start_loc"][-1] + n)
        if end == seq.num_tokens:
            out["logits_indices"].append(out["query_start_loc"][-1] - 1)
        out["block_tables"].append(list(seq.block_table))
    return out


def check(buffers: InputBuffers, batch: ScheduledBatch) -> None:
    shape = buffers.prepare(batch)
    want = expected(batch)
    got = buffers.np
    t, n = shape.num_tokens, shape.num_seqs
    for name, size in [("input_ids", t), ("positions", t), ("slot_mapping", t), ("seq_lens", n),
                       ("query_start_loc", n + 1), ("logits_indices", shape.num_sampled)]:
        assert got[name][:size].tolist() == want[name], name
    for i, table in enumerate(want["block_tables"]):
        assert got["block_tables"][i, : len(table)].tolist() == table
    assert shape.num_sampled == len(want["logits_indices"])
    assert shape.max_seq_len == max(want["seq_lens"])


def test_matches_direct_build_over_random_steps() -> None:
    rng = random.Random(0)
    next_block = iter(range(10**6))
    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=6, max_blocks=16, block_size=BS, device=torch.device("cpu"))
    seqs = {}
    for step in range(200):
        while len(seqs) < 6:  # new sequence with a prompt
            sid = step * 10 + len(seqs)
            seqs[sid] = Sequence(seq_id=sid, token_ids=[rng.randrange(1000) for _ in range(rng.randint(1, 20))],
                                 num_prompt_tokens=1)
        chosen = rng.sample(sorted(seqs), rng.randint(1, len(seqs)))
        batch = ScheduledBatch()
        for sid in chosen:
            seq = seqs[sid]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(rng.randrange(1000))
            n = min(seq.num_tokens - seq.num_computed_tokens, rng.randint(1, 8))
            while len(seq.block_table) * BS < seq.num_computed_tokens + n:
                seq.block_table.append(next(next_block))
            idx = seq.num_computed_tokens // BS
            if seq.num_computed_tokens % BS and rng.random() < 0.2:  # copy-on-write of the landing block
                seq.block_table[idx] = next(next_block)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        check(buffers, batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for sid in list(seqs):
            seq = seqs[sid]
            if rng.random() < 0.05:  # preempted: blocks freed, recomputed later
                seq.block_table, seq.num_computed_tokens = [], 0
            elif seq.num_tokens > 50:
                del seqs[sid]  # finished: its row is reclaimed when rows run out


def test_decode_padding_rows() -> None:
    buffers = InputBuffers(max_num_tokens=16, max_num_seqs=8, max_blocks=4, block_size=BS, device=torch.device("cpu"))
    seqs = [Sequence(seq_id=i, token_ids=[5, 6, 7 + i], num_prompt_tokens=2, num_computed_tokens=2,
                     block_table=[i + 1]) for i in range(3)]
    shape = buffers.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=[1, 1, 1]), pad_to=8)
    b = buffers.np
    assert shape.num_seqs == 3 and shape.num_sampled == 3
    assert b["input_ids"][:8].tolist() == [7, 8, 9, 0, 0, 0, 0, 0]
    assert b["slot_mapping"][:8].tolist() == [6, 10, 14, -1, -1, -1, -1, -1]
    assert b["seq_lens"][:8].tolist() == [3, 3, 3, 1, 1, 1, 1, 1]
    assert b["query_start_loc"][:9].tolist() == list(range(9))
    assert not b["block_tables"][3:8].any()
    assert b["logits_indices"][:3].tolist() == [0, 1, 2]


def test_rows_evicted_only_for_sequences_not_in_the_step() -> None:
    rows = BlockTableRows(num_rows=2, max_blocks=4, block_size=BS)
    a, b, c = (Sequence(seq_id=i, token_ids=[1], num_prompt_tokens=1, block_table=[i]) for i in range(3))
    rows.update([a, b], [0, 0])
    rows.update([c], [0])  # a and b are not running: their rows are reclaimed
    assert rows.table[rows.row_of[2], 0] == 2
    with pytest.raises(ValueError, match="more than 2 sequences"):
        rows.update([a, b, c], [0, 0, 0])
    with pytest.raises(ValueError, match="at most 4"):
        rows.update([Sequence(seq_id=9, token_ids=[1], num_prompt_tokens=1, block_table=[0] * 5)], [0])
    assert np.all(rows.table >= 0)
