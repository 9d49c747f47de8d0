"""Eager against compiled decode on the default model (or --random-model), in one process:
compile time, single-stream decode tok/s and a batched run, wall and CPU seconds.

    PYTHONPATH=$PWD python benchmarks/compiled_forward.py --tokens 64 --num-requests 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_mode(enforce_eager: bool, args, prompts: list[list[int]]) -> dict:
    llm = LLM(args.model, enforce_eager=enforce_eager, max_num_seqs=args.num_requests, device=args.device,
              dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)

    def generate(batch):
        return llm.generate(batch, params, use_tqdm=False)

    # Warm-up: compiles the buckets this run uses (1 and num_requests); its time is the compile time.
    _, warm_wall, warm_cpu = timed(lambda: (generate(prompts[:1]), generate(prompts)))
    single, s_wall, s_cpu = timed(lambda: generate(prompts[:1]))
    batched, b_wall, b_cpu = timed(lambda: generate(prompts))
    n_single = sum(len(o.outputs[0].token_ids) for o in single)
    n_batched = sum(len(o.outputs[0].token_ids) for o in batched)
    return {
        "mode": "eager" if enforce_eager else "compiled",
        "warmup_wall_s": warm_wall, "warmup_cpu_s": warm_cpu,
        "single_tok_s": n_single / s_wall, "single_wall_s": s_wall, "single_cpu_s": s_cpu,
        "batched_tok_s": n_batched / b_wall, "batched_wall_s": b_wall, "batched_cpu_s": b_cpu,
        "tokens": [o.outputs[0].token_ids for o in batched],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10000, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_requests)]
    results = []
    for enforce_eager in (True, False):
        results.append(run_mode(enforce_eager, args, prompts))
        print({k: round(v, 3) for k, v in results[-1].items() if isinstance(v, float)}, flush=True)
    eager, compiled = results
    same = eager.pop("tokens") == compiled.pop("tokens")
    for r in results:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    print(f"compiled/eager: single stream {compiled['single_tok_s'] / eager['single_tok_s']:.2f}x, "
          f"batched {compiled['batched_tok_s'] / eager['batched_tok_s']:.2f}x; "
          f"compile time (warm-up difference) {compiled['warmup_wall_s'] - eager['warmup_wall_s']:.1f} s wall; "
          f"greedy tokens identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eager": eager, "compiled": compiled, "identical": same}, f, indent=2)


if __name__ == "__main__":
    main()
