"""Eager against compiled decode on the default model (or --model), in one process, alternating:
compile time, single-stream decode tok/s and a batched run, wall and CPU seconds.

    PYTHONPATH=$PWD python benchmarks/compiled_forward.py --tokens 48 --num-requests 4 --rounds 3
    PYTHONPATH=$PWD python benchmarks/compiled_forward.py ... --quantization int8

Both engines are built and warmed up first (the compiled one's warm-up is its compile time); then
each round runs the single stream and the batch on both, alternating which goes first, so the
machine's load drifts over both alike. Prints every run, the medians' ratio (wall and per CPU
second) and whether the greedy tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--quantization", default=None, choices=("int8", "int4"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10000, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_requests)]
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    engines, warmup = {}, {}
    for mode, eager in (("eager", True), ("compiled", False)):
        llm = LLM(args.model, enforce_eager=eager, max_num_seqs=args.num_requests, device=args.device,
                  dtype=args.dtype, num_threads=args.num_threads, quantization=args.quantization)
        # Warm-up: compiles the buckets this run uses (1 and num_requests).
        _, wall, cpu = timed(lambda: (llm.generate(prompts[:1], params, use_tqdm=False),
                                      llm.generate(prompts, params, use_tqdm=False)))
        engines[mode], warmup[mode] = llm, {"wall_s": wall, "cpu_s": cpu}
        print(f"{mode} warm-up (compile): {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    runs = {(mode, kind): [] for mode in engines for kind in ("single", "batched")}
    tokens = {}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for kind, batch in (("single", prompts[:1]), ("batched", prompts)):
            for mode in order:
                outs, wall, cpu = timed(lambda: engines[mode].generate(batch, params, use_tqdm=False))
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                runs[(mode, kind)].append({"tok_s": n / wall, "tok_per_cpu_s": n / cpu, "wall_s": wall, "cpu_s": cpu})
                tokens[(mode, kind)] = [o.outputs[0].token_ids for o in outs]
                print(f"round {r} {kind:7s} {mode:8s}: {n / wall:7.2f} tok/s, {n / cpu:7.2f} tok per CPU s "
                      f"({wall:.2f} s wall, {cpu:.2f} s CPU)", flush=True)
    summary = {}
    for kind in ("single", "batched"):
        med = {m: {k: statistics.median(x[k] for x in runs[(m, kind)]) for k in ("tok_s", "tok_per_cpu_s")}
               for m in engines}
        same = tokens[("eager", kind)] == tokens[("compiled", kind)]
        summary[kind] = {"median": med, "identical": same,
                         "ratio_wall": med["compiled"]["tok_s"] / med["eager"]["tok_s"],
                         "ratio_cpu": med["compiled"]["tok_per_cpu_s"] / med["eager"]["tok_per_cpu_s"]}
        print(f"{kind}: eager {med['eager']['tok_s']:.2f} tok/s, compiled {med['compiled']['tok_s']:.2f} tok/s; "
              f"compiled/eager {summary[kind]['ratio_wall']:.2f}x wall, {summary[kind]['ratio_cpu']:.2f}x per CPU s; "
              f"greedy tokens identical: {same}")
    print(f"compile time (warm-up difference): {warmup['compiled']['wall_s'] - warmup['eager']['wall_s']:.1f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "warmup": warmup, "summary": summary,
                       "runs": {f"{m}/{k}": v for (m, k), v in runs.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
