"""Engine-level cost of sampling: greedy vs pure sampling (do_sample, top_k=0, temperature 1) in one run.

    PYTHONPATH=$PWD python benchmarks/sampling_engine.py                 # default model, 64 requests
    PYTHONPATH=$PWD python benchmarks/sampling_engine.py --requests 16 --new-tokens 16 --rounds 1

The modes alternate (greedy, sampled, greedy, sampled, ...) so both see the same machine load.
Prints tokens per wall second and per CPU second, the sampler's share of the step, and the
sampled / greedy ratio (the target is >= 0.9).
"""

import argparse
import json
import random
import time

from tokenmill.engine.llm import LLM
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.sampling_params import SamplingParams

MODES = {
    "greedy": dict(),
    "sampled": dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, seed=0),
}


class TimedSampler(Sampler):
    """Sampler that adds up its own wall time."""

    seconds = 0.0

    def __call__(self, logits, rows):
        begin = time.perf_counter()
        try:
            return super().__call__(logits, rows)
        finally:
            TimedSampler.seconds += time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the packaged default model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="greedy/sampled pairs")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    llm = LLM(args.model)
    updater = getattr(llm.llm_engine, "updater", None)  # the engine's StepUpdater owns the Sampler
    if updater is not None and hasattr(updater, "sampler"):
        updater.sampler = TimedSampler()
    vocab = llm.tokenizer.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab - 1) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    llm.generate(prompts[:4], SamplingParams(max_new_tokens=2), use_tqdm=False)  # warm-up

    totals = {name: {"tokens": 0, "wall_s": 0.0, "cpu_s": 0.0, "sampler_s": 0.0} for name in MODES}
    for _ in range(args.rounds):
        for name, kwargs in MODES.items():
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, **kwargs)
            TimedSampler.seconds = 0.0
            wall, cpu = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, params, use_tqdm=False)
            totals[name]["wall_s"] += time.perf_counter() - wall
            totals[name]["cpu_s"] += time.process_time() - cpu
            totals[name]["sampler_s"] += TimedSampler.seconds
            totals[name]["tokens"] += sum(len(c.token_ids) for o in outs for c in o.outputs)

    print(f"{args.requests} requests x {args.new_tokens} new tokens, prompt {args.prompt_tokens}, "
          f"vocab {vocab}, {args.rounds} rounds")
    print(f"{'mode':<8} {'tokens':>7} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'tok/cpu s':>10} {'sampler s':>10}")
    for name, t in totals.items():
        t["tok_per_s"] = t["tokens"] / t["wall_s"]
        t["tok_per_cpu_s"] = t["tokens"] / t["cpu_s"]
        print(f"{name:<8} {t['tokens']:>7} {t['wall_s']:>8.2f} {t['cpu_s']:>8.2f} {t['tok_per_s']:>8.1f} "
              f"{t['tok_per_cpu_s']:>10.1f} {t['sampler_s']:>10.3f}")
    ratio = totals["sampled"]["tok_per_s"] / totals["greedy"]["tok_per_s"]
    cpu_ratio = totals["sampled"]["tok_per_cpu_s"] / totals["greedy"]["tok_per_cpu_s"]
    print(f"sampled / greedy: {ratio:.3f}x per wall second, {cpu_ratio:.3f}x per CPU second (target >= 0.9)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "modes": totals, "ratio": ratio, "cpu_ratio": cpu_ratio}, handle, indent=2)


if __name__ == "__main__":
    main()
