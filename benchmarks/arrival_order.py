"""Does the order in which requests arrive change the engine's CPU cost for the same work?

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/arrival_order.py [--threads 1] [--per-step 2]

One engine (the default model) runs 64 requests of 40..160 random tokens, 64 output tokens each,
greedy: all added at once (as `LLM.generate` does), or `--per-step` added before each step (as a
server's burst reaches its engine core over the first steps). Two rounds of each, interleaved, each
round its own prompts (no prefix-cache hits). Prints steps, wall and CPU seconds, tokens per CPU second.
"""

import argparse
import random
import time

import torch

from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams


def run(engine, per_step: int, seed: int, num_requests: int, output_len: int) -> None:
    rng = random.Random(seed)
    prompts = [[rng.randint(10, 40000) for _ in range(rng.randint(40, 160))] for _ in range(num_requests)]
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    pending = list(enumerate(prompts))
    steps = tokens = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while pending or engine.has_unfinished_requests():
        for _ in range(per_step or len(pending)):
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(f"{seed}-{i}", prompt, params)
        tokens += sum(len(out.outputs[0].token_ids) for out in engine.step() if out.finished)
        steps += 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    arrival = "all at once" if not per_step else f"{per_step} per step"
    print(f"| {arrival} | {tokens} | {steps} | {wall:.1f} | {cpu:.1f} | {tokens / cpu:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-step", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(max_num_seqs=args.num_requests)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    print("| arrival | output tokens | steps | wall s | CPU s | tokens per CPU s |")
    print("|---|---|---|---|---|---|")
    for seed, per_step in ((1, 0), (2, args.per_step), (3, 0), (4, args.per_step)):
        run(llm.llm_engine, per_step, seed, args.num_requests, args.output_len)


if __name__ == "__main__":
    main()
