"""Costs of two API features on the engine, each against its own peer in the same run.

1. prompt_logprobs: prefill of one prompt (default 256 tokens, max_new_tokens=1) with and without
   `prompt_logprobs=k`, alternated over several repetitions.
2. A JSON-schema constraint per decode step at batch 1 and 64: decode steps of constrained requests
   against the same number of unconstrained ones (same prompts, greedy, ignore_eos), plus the time spent
   inside the constraint's own work (bitmask fill + mask + matcher advance).

Prints wall and CPU seconds and the ratios. Usage:
    PYTHONPATH=$PWD python benchmarks/api_features.py [--prompt-len 256] [--reps 5] [--batches 1,64] [--steps 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.structured_output_params import StructuredOutputsParams
import tokenmill.engine.step_update as step_update

SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "integer", "minimum": 0, "maximum": 999} for k in "abcdefghijkl"},
    "required": list("abcdefghijkl"),
    "additionalProperties": False,
}


class Clock:
    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def run_to_end(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def bench_prompt_logprobs(engine: LLMEngine, prompt_len: int, reps: int, k: int) -> None:
    g = torch.Generator().manual_seed(0)
    with_lp, without = Clock(), Clock()
    for rep in range(reps + 1):  # the first round warms up
        prompt = torch.randint(10, engine.vocab_size - 10, (prompt_len,), generator=g).tolist()
        for clock, asked in ((without, None), (with_lp, k)):
            engine.add_request(f"p{rep}-{asked}", prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=asked))
            if rep == 0:
                run_to_end(engine)
                continue
            with clock:
                run_to_end(engine)
    print(f"prefill of a {prompt_len}-token prompt, mean of {reps}:")
    print(f"  without prompt_logprobs: {without.wall / reps * 1e3:8.1f} ms wall {without.cpu / reps * 1e3:8.1f} ms CPU")
    print(f"  with prompt_logprobs={k}: {with_lp.wall / reps * 1e3:8.1f} ms wall {with_lp.cpu / reps * 1e3:8.1f} ms CPU")
    print(f"  ratio with/without: {with_lp.wall / without.wall:.3f} wall, {with_lp.cpu / without.cpu:.3f} CPU")


def decode_steps(engine: LLMEngine, batch: int, steps: int, constrained: bool, inside: Clock) -> Clock:
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    engine.structured.compile(spec) if spec else None  # compile outside the timing (it is cached)
    for i in range(batch):
        params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=not constrained, structured_outputs=spec)
        engine.add_request(f"d{constrained}-{batch}-{i}", "Write the record as JSON:", params)
    engine.step()  # admit + prefill (every prompt fits one step)
    while engine.structured.pending or engine.scheduler.waiting:
        engine.step()
    clock = Clock()
    for _ in range(steps):
        with clock:
            engine.step()
    run_to_end(engine)
    return clock


def bench_constraint(engine: LLMEngine, batches: list[int], steps: int) -> None:
    inside = Clock()
    mask, advance = step_update.mask_constrained_rows, step_update.advance_grammars

    def timed(fn):
        def wrapper(*args):
            with inside:
                return fn(*args)
        return wrapper

    step_update.mask_constrained_rows, step_update.advance_grammars = timed(mask), timed(advance)
    try:
        for batch in batches:
            decode_steps(engine, batch, 2, True, inside)  # warm-up
            free = decode_steps(engine, batch, steps, False, inside)
            inside.wall = inside.cpu = 0.0
            json_ = decode_steps(engine, batch, steps, True, inside)
            print(f"decode step at batch {batch} (mean of {steps} steps):")
            print(f"  unconstrained: {free.wall / steps * 1e3:8.1f} ms wall {free.cpu / steps * 1e3:8.1f} ms CPU")
            print(f"  JSON schema:   {json_.wall / steps * 1e3:8.1f} ms wall {json_.cpu / steps * 1e3:8.1f} ms CPU"
                  f"  (constraint work {inside.wall / steps * 1e3:.2f} ms wall {inside.cpu / steps * 1e3:.2f} ms CPU)")
            print(f"  ratio JSON/unconstrained: {json_.wall / free.wall:.3f} wall, {json_.cpu / free.cpu:.3f} CPU;"
                  f" constraint work share of the JSON step: {inside.cpu / json_.cpu:.3f} CPU")
    finally:
        step_update.mask_constrained_rows, step_update.advance_grammars = mask, advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", choices=["prompt", "constraint"], default=None)
    args = parser.parse_args()
    engine = LLMEngine.from_args(None, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=4096,
                                 num_kv_blocks=1024)
    print(f"device {engine.runner.device}, torch threads {torch.get_num_threads()}")
    if args.skip != "prompt":
        bench_prompt_logprobs(engine, args.prompt_len, args.reps, args.top_k)
    if args.skip != "constraint":
        bench_constraint(engine, [int(b) for b in args.batches.split(",")], args.steps)


if __name__ == "__main__":
    main()
