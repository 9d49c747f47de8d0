"""Served vs offline throughput, leg by leg, and a 5 MB prompt's effect on other streams' ITL.

    PYTHONPATH=$PWD python benchmarks/serve_split.py --json benchmarks/results/serve_split.json

Three legs on the workload (64 prompts of 32..128 random words, 64 output tokens each, greedy,
ignore_eos), each with its own prompts (`--seed 1, 2, 3`, so no leg hits the prefix cache another
filled):
1. offline: `LLM.generate` on the leg's prompts in a fresh process (one-prompt warm-up first);
2. served, right after it: `tokenmill bench serve --max-concurrency 64` on the same prompts against
   `tokenmill serve` (engine core + API replica on Ray Serve), started once for all legs. The second
   leg also posts a 5 MB prompt a few seconds in (the server accepts bodies up to 8 MB, so the prompt
   is read, measured from a prefix and rejected for its length: the costly path; past
   --max-request-bytes it is a 413 that costs nothing).
Each served leg is compared with the offline leg just before it: this machine's speed drifts by
10-15% over minutes, more than the difference being measured. Wall and CPU seconds are printed
beside each throughput: CPU seconds of the offline process, of every server process when served.
The offline legs run while the server idles beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from tokenmill.bench.offline_leg import run_in_fresh_process
from tokenmill.bench.serve import wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def workload(args: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--min-prompt-len", "32", "--max-prompt-len", "128",
            "--output-len", str(args.output_len), "--ignore-eos", "--temperature", "0"]


def session_cpu_s(sid: int) -> dict[str, float]:
    """CPU seconds of every process in the server's session, by process name (Ray names its workers
    after their actors: ray::ServeReplica:..., ray::ProxyActor, ...)."""
    by_name: dict[str, float] = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                t = p.cpu_times()
                name = p.name()
                by_name[name] = by_name.get(name, 0.0) + t.user + t.system
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return by_name


def bench_serve(url: str, out: Path, big_prompt_after_s: float | None, load: list[str], seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Each leg its own prompts (`seed`): the same prompts again would hit the prefix cache. No test
    # request from the load generator (it would decode one prompt alone, 64 steps, inside the CPU
    # measured for the leg): the caller sends a short one before it starts measuring.
    command = [sys.executable, "-m", "tokenmill.serve.cli", "bench", "serve", "--base-url", url,
               "--max-concurrency", "64", *load, "--seed", str(seed), "--no-warmup", "--json", str(out)]
    big: dict = {}

    def post_big() -> None:
        time.sleep(big_prompt_after_s)
        body = {"prompt": "word " * (1024 * 1024), "max_tokens": 8}  # 5 MiB of text
        started = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        big.update(status=r.status_code, seconds=time.perf_counter() - started, error=r.json().get("error"))

    thread = None
    if big_prompt_after_s is not None:
        thread = threading.Thread(target=post_big, daemon=True)
        thread.start()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    if thread is not None:
        thread.join(120)
    run = json.loads(out.read_text())["runs"][0]
    return {"output_tok_s": run["output_throughput"], "duration_s": run["duration_s"],
            "output_tokens": run["total_output_tokens"],
            "itl_p99_ms": run["itl"]["p99_ms"], "itl_median_ms": run["itl"]["median_ms"],
            "ttft_median_ms": run["ttft"]["median_ms"], "failed": run["failed"], "big_prompt": big or None}


def served(args: argparse.Namespace, tmp: Path, load: list[str]) -> dict:
    threads, port = args.threads, args.port
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp / "r")}
    command = [sys.executable, "-m", "tokenmill.serve.cli", "serve", "--port", str(port), "--max-num-seqs", "64",
               "--num-cpus-per-replica", str(threads), "--ray-num-cpus", str(threads + 2), "--device", "cpu",
               "--max-request-bytes", str(8 * 1024 * 1024)]
    server = subprocess.Popen(command, env=env, stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 900, lambda: None if server.poll() is None else (tmp / "serve.log").read_text()[-2000:])
        results = {}
        for seed, (name, big_after) in enumerate((("plain", None), ("with_5mb_prompt", args.big_prompt_after_s),
                                                  ("plain_again", None)), start=1):
            offline_run = run_in_fresh_process(args.num_prompts, args.output_len, seed, threads)
            print(f"offline (seed {seed}):", offline_run, flush=True)
            httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=120).raise_for_status()
            cpu = session_cpu_s(server.pid)
            results[name] = bench_serve(url, tmp / f"{name}.json", big_after, load, seed)
            after = session_cpu_s(server.pid)
            used = {k: v - cpu.get(k, 0.0) for k, v in after.items()}
            results[name]["server_cpu_by_process"] = {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])
                                                      if v >= 0.05}
            results[name]["server_cpu_s"] = sum(used.values())
            results[name]["output_tok_per_cpu_s"] = results[name]["output_tokens"] / results[name]["server_cpu_s"]
            results[name]["offline"] = offline_run
            results[name]["served_over_offline"] = results[name]["output_tok_s"] / offline_run["output_tok_s"]
            print(f"served {name} (seed {seed}):", results[name], flush=True)
        return results
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads offline and in the engine core")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--big-prompt-after-s", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tmsplit", dir="/tmp"))
    report = {"args": vars(args), "served": served(args, tmp, workload(args))}
    legs = report["served"]
    ratios = [legs[name]["served_over_offline"] for name in ("plain", "with_5mb_prompt", "plain_again")]
    report["served_over_offline_by_leg"] = ratios
    report["served_over_offline_mean"] = sum(ratios) / len(ratios)
    report["itl_p99_added_ms"] = legs["with_5mb_prompt"]["itl_p99_ms"] - min(
        legs["plain"]["itl_p99_ms"], legs["plain_again"]["itl_p99_ms"])
    print(f"served / offline output tok/s by leg: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(mean {report['served_over_offline_mean']:.3f}); "
          f"5 MB prompt adds {report['itl_p99_added_ms']:.1f} ms to p99 ITL", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
