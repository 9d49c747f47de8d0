"""Host CPU time of one Sampler call for a greedy batch: rows that are the whole logits in order
(processed in place) against the same rows gathered first (a [rows, vocab] copy, as every step did
before), in one process, alternating.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/sampler_rows.py --rows 256 --vocab 32000
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.engine.logits_processors import RowInput
from tokenmill.engine.sampler import SampleRow, Sampler
from tokenmill.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    params = SamplingParams(max_new_tokens=100)

    def rows(indices):
        return [SampleRow(RowInput(params, list(range(300)), 100, (2,)), i, 0, 300) for i in indices]

    in_order = rows(range(args.rows))
    gathered = rows(range(args.rows))
    logits = torch.randn(args.rows + 1, args.vocab)  # one spare row: the gathered rows are not all of it
    sampler = Sampler()
    totals = {"in order": 0.0, "gathered": 0.0}
    for _ in range(args.iters):
        for name, batch, x in (("in order", in_order, logits[: args.rows]), ("gathered", gathered, logits)):
            start = time.process_time()
            sampler(x, batch).token_ids
            totals[name] += time.process_time() - start
    ms = {name: total / args.iters * 1e3 for name, total in totals.items()}
    print(f"greedy, {args.rows} rows x {args.vocab} vocab, {torch.get_num_threads()} thread(s), CPU ms per call: "
          f"in order {ms['in order']:.2f}, gathered {ms['gathered']:.2f} ({ms['gathered'] / ms['in order']:.2f}x)")


if __name__ == "__main__":
    main()
