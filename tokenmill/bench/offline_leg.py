"""One offline run in this process, timed: `LLM.generate` on random-text prompts on the CPU; prints one
JSON line (wall, user and system CPU seconds, minor page faults, output tokens).

    python -m tokenmill.bench.offline_leg --num-prompts 64 --output-len 64 --seed 1 --threads 1 [--glibc-malloc]

Benchmarks that compare runs across processes start it once per leg (benchmarks/serve_split.py,
benchmarks/host_memory.py), so every leg is the same code in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # a plain checkout's root: where `tokenmill` imports from


def run(num_prompts: int, output_len: int, seed: int, threads: int, glibc_malloc: bool = False) -> dict[str, Any]:
    """Prompts of 32..128 random words (`seed`), `output_len` greedy tokens each, EOS ignored,
    after a one-prompt warm-up. `glibc_malloc`: leave glibc's malloc thresholds as they are."""
    import tokenmill.engine.host_memory as host_memory
    from tokenmill.bench.workload import LengthRange, random_text_workload
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.sampling_params import SamplingParams

    if glibc_malloc:
        host_memory._applied = False  # as if already decided: the engine leaves the thresholds alone
    llm = LLM(max_num_seqs=64, device="cpu", num_threads=threads)
    params = SamplingParams(max_new_tokens=output_len, do_sample=False, ignore_eos=True)
    llm.generate(["warm up"], params, use_tqdm=False)
    lengths = LengthRange(32, 128), LengthRange(output_len, output_len)
    prompts = [r.prompt_text for r in random_text_workload(num_prompts, *lengths, seed)]
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"malloc_kept": host_memory._applied, "output_tokens": tokens, "wall_s": wall, "user_s": user,
            "sys_s": system, "cpu_s": user + system, "minor_faults": after.ru_minflt - before.ru_minflt,
            "output_tok_s": tokens / wall, "output_tok_per_cpu_s": tokens / (user + system)}


def run_in_fresh_process(num_prompts: int, output_len: int, seed: int, threads: int,
                         glibc_malloc: bool = False) -> dict[str, Any]:
    """`run` in a new interpreter (no MALLOC_* settings inherited, OMP_NUM_THREADS=threads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "tokenmill.bench.offline_leg", "--num-prompts", str(num_prompts),
               "--output-len", str(output_len), "--seed", str(seed), "--threads", str(threads)]
    out = subprocess.run(command + (["--glibc-malloc"] if glibc_malloc else []), capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--glibc-malloc", action="store_true", help="keep glibc's malloc thresholds")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.num_prompts, args.output_len, args.seed, args.threads, args.glibc_malloc)))


if __name__ == "__main__":
    main()
