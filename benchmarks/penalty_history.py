"""Host time per step of the token-history matrix that penalty and n-gram rows hand to the kernels:
each list converted whole every step (the previous way, kept here as the peer) against the
incremental per-row copies (engine/token_history.py), on the same rows, in one process.

    PYTHONPATH=$PWD python benchmarks/penalty_history.py --num-rows 256 --steps 20
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tokenmill.engine.token_history import TokenHistory, padded_rows


def converted_whole(rows: list[list[int]]) -> torch.Tensor:
    """The previous build: a torch.as_tensor per row, every step."""
    out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-rows", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=500)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(0)
    rows = [[rng.randrange(50_000) for _ in range(rng.randrange(args.min_len, args.max_len + 1))]
            for _ in range(args.num_rows)]
    histories = [TokenHistory() for _ in rows]
    for history, ids in zip(histories, rows):
        history.array(ids)  # the row's first step converts it whole, as before
    whole = incremental = 0.0
    for _ in range(args.steps):
        for ids in rows:
            ids.append(rng.randrange(50_000))  # one new token per row per step
        start = time.process_time()
        before = converted_whole(rows)
        whole += time.process_time() - start
        start = time.process_time()
        after = padded_rows([h.array(ids) for h, ids in zip(histories, rows)])
        incremental += time.process_time() - start
        assert torch.equal(before, after)
    print(f"{args.num_rows} rows of {args.min_len}..{args.max_len} tokens, one new token each per step, "
          f"{args.steps} steps; CPU ms per step: converted whole {whole / args.steps * 1e3:.2f}, "
          f"incremental {incremental / args.steps * 1e3:.2f} ({whole / incremental:.1f}x less)")


if __name__ == "__main__":
    main()
