"""Host time of one decode step's input preparation at N running sequences: the list-built inputs
(rebuilt token by token each step) against the persistent numpy buffers (engine/input_buffers.py).

    PYTHONPATH=$PWD python benchmarks/prepare_inputs.py --num-seqs 256 --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.engine.input_buffers import InputBuffers
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence


def list_built_inputs(batch: ScheduledBatch, block_size: int, device: torch.device):
    """The previous prepare_inputs, kept here as the peer."""
    bs = block_size
    input_ids, positions, slots, seq_lens, query_start_loc, logits_indices = [], [], [], [], [0], []
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed_tokens
        end = start + num_new
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        table = seq.block_table
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        seq_lens.append(end)
        query_start_loc.append(query_start_loc[-1] + num_new)
        if batch.samples(i):
            logits_indices.append(query_start_loc[-1] - 1)
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
    return (
        torch.tensor(slots, dtype=torch.int64, device=device), torch.tensor(tables, dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        torch.tensor(input_ids, dtype=torch.int64, device=device).unsqueeze(0),
        torch.tensor(positions, dtype=torch.int64, device=device).unsqueeze(0),
        torch.tensor(logits_indices, dtype=torch.int64, device=device),
    )


def make_batch(num_seqs: int, context: int, block_size: int) -> ScheduledBatch:
    seqs, next_block = [], 0
    for i in range(num_seqs):
        n = context + i % 64
        blocks = -(-n // block_size)
        seq = Sequence(seq_id=i, token_ids=[(7 * i + j) % 1000 for j in range(n)], num_prompt_tokens=n - 1)
        seq.num_computed_tokens = n - 1
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
    return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * num_seqs, groups=[])


def advance(batch: ScheduledBatch, block_size: int, next_block: list[int]) -> None:
    """One decode step's bookkeeping: a sampled token appended, a block allocated when one fills."""
    for seq in batch.seqs:
        seq.num_computed_tokens += 1
        seq.token_ids.append(1)
        if len(seq.token_ids) > len(seq.block_table) * block_size:
            seq.block_table.append(next_block[0])
            next_block[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, bs = torch.device(args.device), args.block_size
    max_blocks = -(-(args.context + 64 + args.steps) // bs)
    results = {}
    for name in ("list-built", "buffers"):
        batch = make_batch(args.num_seqs, args.context, bs)
        next_block = [10**6]
        buffers = InputBuffers(max_num_tokens=2048, max_num_seqs=args.num_seqs, max_blocks=max_blocks,
                               block_size=bs, device=device)
        wall = cpu = 0.0
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "list-built":
                list_built_inputs(batch, bs, device)
            else:
                buffers.prepare(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            advance(batch, bs, next_block)
        results[name] = (wall / args.steps * 1e3, cpu / args.steps * 1e3)
        print(f"{name:>10}: {results[name][0]:.3f} ms/step wall, {results[name][1]:.3f} ms/step CPU")
    ratio = results["list-built"][0] / results["buffers"][0]
    print(f"speed-up (wall): {ratio:.1f}x at {args.num_seqs} running decodes")


if __name__ == "__main__":
    main()
