"""Served vs offline throughput in one run, and a 5 MB prompt's effect on other streams' ITL.

    PYTHONPATH=$PWD python benchmarks/serve_split.py --json benchmarks/results/serve_split.json

1. offline: `LLM.generate` on the workload (64 prompts of 32..128 random words, 64 output tokens each,
   greedy, ignore_eos), after a one-prompt warm-up;
2. served: `tokenmill serve` (engine core + API replica on Ray Serve) and `tokenmill bench serve
   --max-concurrency 64` on the same workload, twice: once plain, once with a 5 MB prompt posted
   a few seconds into the run (the server accepts bodies up to 8 MB, so the prompt is read, measured
   from a prefix and rejected for its length: the costly path; past --max-request-bytes it is a 413
   that costs nothing).
Wall and CPU seconds are printed beside each throughput (the machine may be shared): CPU seconds of
this process for offline, of every server process for served.
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

from tokenmill.bench.serve import wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def workload(args: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--min-prompt-len", "32", "--max-prompt-len", "128",
            "--output-len", str(args.output_len), "--ignore-eos", "--temperature", "0"]


def offline(threads: int, num_prompts: int, output_len: int) -> dict:
    import torch

    from tokenmill.bench.workload import LengthRange, random_text_workload
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    requests = random_text_workload(num_prompts, LengthRange(32, 128), LengthRange(output_len, output_len), seed=0)
    prompts = [r.prompt_text for r in requests]
    llm = LLM(max_num_seqs=64, device="cpu")
    params = SamplingParams(max_new_tokens=output_len, do_sample=False, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)
    cpu, wall = time.process_time(), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"output_tokens": tokens, "wall_s": wall, "cpu_s": cpu, "output_tok_s": tokens / wall,
            "output_tok_per_cpu_s": tokens / cpu}


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
    # Each leg its own prompts (`seed`): the same prompts again would hit the prefix cache.
    command = [sys.executable, "-m", "tokenmill.serve.cli", "bench", "serve", "--base-url", url,
               "--max-concurrency", "64", *load, "--seed", str(seed), "--json", str(out)]
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


def served(threads: int, port: int, tmp: Path, load: list[str], big_after_s: float) -> dict:
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
        for seed, (name, big_after) in enumerate((("plain", None), ("with_5mb_prompt", big_after_s),
                                                  ("plain_again", None)), start=1):
            cpu = session_cpu_s(server.pid)
            results[name] = bench_serve(url, tmp / f"{name}.json", big_after, load, seed)
            after = session_cpu_s(server.pid)
            used = {k: v - cpu.get(k, 0.0) for k, v in after.items()}
            results[name]["server_cpu_by_process"] = {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])
                                                      if v >= 0.05}
            results[name]["server_cpu_s"] = sum(used.values())
            results[name]["output_tok_per_cpu_s"] = results[name]["output_tokens"] / results[name]["server_cpu_s"]
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
    report = {"args": vars(args), "offline": offline(args.threads, args.num_prompts, args.output_len)}
    print("offline:", report["offline"], flush=True)
    report["served"] = served(args.threads, args.port, tmp, workload(args), args.big_prompt_after_s)
    for name, run in report["served"].items():
        print(f"served {name}:", run, flush=True)
    plain, again = report["served"]["plain"], report["served"]["plain_again"]
    offline_run = report["offline"]
    # "cold": the first load after start; "warm": a later one (each leg has its own prompts).
    for name, run in (("cold", plain), ("warm", again)):
        report[f"served_over_offline_{name}"] = run["output_tok_s"] / offline_run["output_tok_s"]
        report[f"served_over_offline_per_cpu_s_{name}"] = run["output_tok_per_cpu_s"] / offline_run["output_tok_per_cpu_s"]
    report["itl_p99_added_ms"] = report["served"]["with_5mb_prompt"]["itl_p99_ms"] - min(
        plain["itl_p99_ms"], again["itl_p99_ms"])
    print(f"served / offline output tok/s: warm {report['served_over_offline_warm']:.3f}, "
          f"cold {report['served_over_offline_cold']:.3f} (per CPU second: warm "
          f"{report['served_over_offline_per_cpu_s_warm']:.3f}); "
          f"5 MB prompt adds {report['itl_p99_added_ms']:.1f} ms to p99 ITL", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
