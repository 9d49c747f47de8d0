"""Freed host memory kept for reuse (engine/host_memory.py) against glibc's defaults, offline on the CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/host_memory.py --rounds 3 --json out.json

Each round runs the same requests (fresh random prompts of 32..128 words per round, greedy,
`ignore_eos`) in two fresh processes, one with glibc's default malloc thresholds and one with the
engine's, alternating which goes first. Each prints the process's user and system CPU seconds and
minor page faults over `LLM.generate` (after a one-request warm-up); the ratio is CPU seconds for
the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

LEG = r"""
import json, resource, sys, time
import torch
import tokenmill.engine.host_memory as host_memory
from tokenmill.bench.workload import LengthRange, random_text_workload
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams

mode, num, out_len, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "default":
    host_memory._applied = False  # as if already decided: glibc's thresholds stay
llm = LLM(max_num_seqs=64, device="cpu", num_threads=threads)
params = SamplingParams(max_new_tokens=out_len, do_sample=False, ignore_eos=True)
llm.generate(["warm up"], params, use_tqdm=False)
prompts = [r.prompt_text for r in random_text_workload(num, LengthRange(32, 128), LengthRange(out_len, out_len), seed)]
r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"mode": mode, "applied": host_memory._applied, "wall_s": w1 - w0,
                  "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                  "minor_faults": r1.ru_minflt - r0.ru_minflt,
                  "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}))
"""


def run_leg(mode: str, args: argparse.Namespace, seed: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    command = [sys.executable, "-c", LEG, mode, str(args.num_prompts), str(args.output_len), str(seed), str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each leg")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    print(f"{'round':>5} {'malloc':>8} {'wall s':>7} {'user s':>7} {'sys s':>6} {'faults':>8} {'tok/CPU s':>9}")
    for round_ in range(args.rounds):
        order = ("default", "keep") if round_ % 2 == 0 else ("keep", "default")
        for mode in order:
            row = run_leg(mode, args, seed=100 + round_) | {"round": round_}
            cpu = row["user_s"] + row["sys_s"]
            print(f"{round_:>5} {mode:>8} {row['wall_s']:>7.2f} {row['user_s']:>7.2f} {row['sys_s']:>6.2f} "
                  f"{row['minor_faults']:>8} {row['output_tokens'] / cpu:>9.2f}", flush=True)
            rows.append(row)
    cpu = {m: sum(r["user_s"] + r["sys_s"] for r in rows if r["mode"] == m) for m in ("default", "keep")}
    wall = {m: sum(r["wall_s"] for r in rows if r["mode"] == m) for m in ("default", "keep")}
    summary = {"cpu_s": cpu, "wall_s": wall, "cpu_ratio_keep_over_default": cpu["keep"] / cpu["default"],
               "wall_ratio_keep_over_default": wall["keep"] / wall["default"]}
    print(f"CPU s for the same tokens: keep {cpu['keep']:.1f} / default {cpu['default']:.1f} = "
          f"{summary['cpu_ratio_keep_over_default']:.3f}x; wall {summary['wall_ratio_keep_over_default']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
