"""Small decode batches on the CPU: the engine with its linear layers as `F.linear` against
`W @ x.T` split over the threads (engine/cpu_linear.py), in one process, alternating.

    PYTHONPATH=$PWD python benchmarks/cpu_small_rows.py [--threads 2] [--batch 1 2 4 8] [--rounds 2]
    PYTHONPATH=$PWD python benchmarks/cpu_small_rows.py --quantization int8   # A/A: the noise

For each batch size, `batch` greedy requests (16-token prompts, `--tokens` output tokens each) run
to the end in each mode, `--rounds` times, alternating which mode goes first. Prints output tok/s
(wall) and output tokens per CPU second for each run, the ratio of the modes' medians, and whether
the two modes gave the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenmill.engine.cpu_linear import restore_linear, use_small_rows_linear
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams

PROMPTS = [[1, 504, 3458, 282, 4649, 314, 253, 2569, 30, 1045, 2107, 357, 253, 1345, 28, 339 + i] for i in range(64)]


def run(engine: LLMEngine, batch: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    """(wall s, CPU s, output token ids) of `batch` requests run to the end."""
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, do_sample=False, detokenize=False,
                            output_kind="final")
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(batch):
        engine.add_request(f"r{i}", PROMPTS[i % len(PROMPTS)], params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    return time.perf_counter() - wall, time.process_time() - cpu, [outputs[f"r{i}"] for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quantization", default=None, choices=("int8",),
                        help="an A/A control: int8 quantizes every linear layer, the head too, so no layer "
                             "switches and the two modes run the same code (their ratio is the noise)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine = LLMEngine.from_args(num_threads=args.threads, max_num_seqs=max(args.batch), quantization=args.quantization)
    model = engine.model
    modes = {
        "F.linear": lambda: restore_linear(model),
        "W @ x.T split": lambda: use_small_rows_linear(model, torch.get_num_threads()),
    }
    run(engine, 2, 8)  # warm-up
    results = []
    for batch in args.batch:
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        tokens: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for mode in order:
                modes[mode]()
                wall, cpu, out = run(engine, batch, args.tokens)
                samples[mode].append((wall, cpu))
                tokens[mode] = out
                n = batch * args.tokens
                print(f"batch {batch} {mode:14s} round {r}: {n / wall:7.2f} tok/s  {n / cpu:7.2f} tok/CPU s  "
                      f"({wall:.2f} s wall, {cpu:.2f} s CPU)", flush=True)
        walls = {m: statistics.median(w for w, _ in s) for m, s in samples.items()}
        cpus = {m: statistics.median(c for _, c in s) for m, s in samples.items()}
        same = sum(a == b for a, b in zip(tokens["F.linear"], tokens["W @ x.T split"]))
        row = {
            "batch": batch, "threads": args.threads, "tokens": args.tokens,
            "tok_s": {m: batch * args.tokens / w for m, w in walls.items()},
            "tok_per_cpu_s": {m: batch * args.tokens / c for m, c in cpus.items()},
            "speedup_wall": walls["F.linear"] / walls["W @ x.T split"],
            "speedup_cpu": cpus["F.linear"] / cpus["W @ x.T split"],
            "same_tokens": f"{same}/{batch}",
        }
        results.append(row)
        print(f"batch {batch}: split / F.linear = {row['speedup_wall']:.2f}x wall, "
              f"{row['speedup_cpu']:.2f}x per CPU s; "
              f"identical outputs {row['same_tokens']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
