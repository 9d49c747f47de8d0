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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

from tokenmill.bench.offline_leg import run_in_fresh_process  # noqa: E402


def run_leg(mode: str, args: argparse.Namespace, seed: int) -> dict:
    return run_in_fresh_process(args.num_prompts, args.output_len, seed, args.threads,
                                glibc_malloc=mode == "default") | {"mode": mode}


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
            cpu = row["cpu_s"]
            print(f"{round_:>5} {mode:>8} {row['wall_s']:>7.2f} {row['user_s']:>7.2f} {row['sys_s']:>6.2f} "
                  f"{row['minor_faults']:>8} {row['output_tokens'] / cpu:>9.2f}", flush=True)
            rows.append(row)
    cpu = {m: sum(r["cpu_s"] for r in rows if r["mode"] == m) for m in ("default", "keep")}
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
