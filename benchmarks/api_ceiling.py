"""What one API process can carry: streamed tokens and SSE chunks per second, with no model.

    PYTHONPATH=$PWD python benchmarks/api_ceiling.py --concurrency 256 --output-len 256 --stream-interval 1 4

Three processes, as in `tokenmill serve`'s split: an engine core driving `FakeEngine`
(tokenmill/bench/fake_engine.py: one token per running request per step, no forward), one API
process (the real FastAPI app and `AsyncLLMEngine` front: tokenization, detokenization, SSE), and
the load generator (`tokenmill bench serve`, streaming). Each run reports output tokens/s, chunks/s
and the CPU seconds of each process: the process whose CPU time is close to the wall time is the
one that limits the rate (on a 2-core machine the client competes with the API process).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tokenmill.bench.serve import wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_folder() -> str:
    from tokenmill.engine.model_loader import default_model_gguf_path, ensure_converted_gguf, resolve_cache_dir

    return str(ensure_converted_gguf(default_model_gguf_path(), resolve_cache_dir(None)))


def run_core(folder: str, step_time_s: float, max_num_seqs: int, conn) -> None:
    from transformers import AutoTokenizer

    from tokenmill.bench.fake_engine import FakeEngine
    from tokenmill.serve.engine_core import EngineCore

    engine = FakeEngine(AutoTokenizer.from_pretrained(folder), step_time_s=step_time_s, max_num_seqs=max_num_seqs)
    core = EngineCore(engine, bind="tcp://127.0.0.1:*").start()
    conn.send(core.address)
    try:
        conn.recv()  # until the parent closes its end
    except EOFError:
        pass
    core.shutdown()


def run_api(address: str, port: int, stream_interval: int) -> None:
    import uvicorn

    from tokenmill.engine.async_engine import AsyncEngineConfig, AsyncLLMEngine
    from tokenmill.serve.api import build_app

    engine = AsyncLLMEngine.connect([address], AsyncEngineConfig(stream_interval=stream_interval))
    uvicorn.run(build_app(engine), host="127.0.0.1", port=port, log_level="warning")


def cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def one_run(folder: str, args: argparse.Namespace, stream_interval: int, tmp: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    core = ctx.Process(target=run_core, args=(folder, args.step_ms / 1e3, args.concurrency, child), daemon=True)
    core.start()
    address = parent.recv()
    port = args.port
    api = ctx.Process(target=run_api, args=(address, port, stream_interval), daemon=True)
    api.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, lambda: None if api.is_alive() else f"the API process exited ({api.exitcode})")
        out = tmp / f"load-{stream_interval}.json"
        command = [sys.executable, "-m", "tokenmill.serve.cli", "bench", "serve", "--base-url", url,
                   "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
                   "--min-prompt-len", "16", "--max-prompt-len", "32", "--output-len", str(args.output_len),
                   "--ignore-eos", "--temperature", "0", "--json", str(out)]
        processes = {"core": psutil.Process(core.pid), "api": psutil.Process(api.pid)}
        before = {name: cpu_s(p) for name, p in processes.items()}
        children_before = psutil.Process().cpu_times()
        started = time.perf_counter()
        client = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                check=True)
        wall = time.perf_counter() - started
        used = {name: cpu_s(p) - before[name] for name, p in processes.items()}
        del client
        usage = psutil.Process().cpu_times()  # the client is the one child reaped meanwhile
        used["client"] = (usage.children_user - children_before.children_user
                          + usage.children_system - children_before.children_system)
        run = json.loads(out.read_text())["runs"][0]
    finally:
        for process in (api, core):
            process.terminate()
            process.join(10)
        parent.close()
    tokens = run["total_output_tokens"]
    return {
        "stream_interval": stream_interval, "concurrency": args.concurrency, "step_ms": args.step_ms,
        "output_tokens": tokens, "failed": run["failed"], "duration_s": run["duration_s"],
        "output_tok_s": run["output_throughput"],
        "chunks_per_s": run["total_chunks"] / run["duration_s"],
        "tokens_per_chunk": tokens / max(run["total_chunks"], 1),
        "engine_tok_s": args.concurrency * 1e3 / args.step_ms if args.step_ms else None,
        "itl_median_ms": run["itl"]["median_ms"], "itl_p99_ms": run["itl"]["p99_ms"],
        "ttft_median_ms": run["ttft"]["median_ms"], "wall_s": wall, "cpu_s": used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--stream-interval", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--step-ms", type=float, default=5.0,
                        help="The fake engine's step time (default 5: a GPU-class decode step; 0: none, and the "
                             "front coalesces whatever it cannot keep up with).")
    parser.add_argument("--port", type=int, default=8792)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = tokenizer_folder()
    tmp = Path(tempfile.mkdtemp(prefix="tmapi", dir="/tmp"))
    runs = []
    for k in args.stream_interval:
        run = one_run(folder, args, k, tmp)
        runs.append(run)
        cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in run["cpu_s"].items())
        offered = f" (the engine offers {run['engine_tok_s']:.0f})" if run["engine_tok_s"] else ""
        print(f"stream_interval {k}: {run['output_tok_s']:.0f} output tok/s{offered}, {run['chunks_per_s']:.0f} "
              f"chunks/s ({run['tokens_per_chunk']:.1f} tokens each), ITL p50 {run['itl_median_ms']:.1f} ms, "
              f"p99 {run['itl_p99_ms']:.1f} ms, failed {run['failed']}; wall {run['wall_s']:.1f} s, CPU: {cpu}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
