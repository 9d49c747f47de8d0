"""`tokenmill bench serve --replicas 1,2,...`: the same load against `tokenmill serve --num-replicas R`, per R.

For each replica count the benchmark starts its own server (a subprocess running
`python -m tokenmill.serve.cli serve --num-replicas R ...` with `--serve-args` appended), waits until
it answers, runs the serving load of `tokenmill bench serve` against it, reads the CPU seconds the
server's process tree used, and stops it. The report gives output tok/s, its ratio to the first
replica count, and TTFT p50/p99 per replica count; `--plot` draws them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any


def add_scaling_args(parser: argparse.ArgumentParser) -> None:
    from tokenmill.bench.serve_args import parse_int_list

    group = parser.add_argument_group("replica scaling (starts its own servers)")
    group.add_argument("--replicas", type=parse_int_list, default=None,
                       help="Replica counts, e.g. 1,2,4: start `tokenmill serve --num-replicas R` for each and "
                            "load it (default: load the server at --base-url).")
    group.add_argument("--serve-args", default="",
                       help="More `tokenmill serve` flags, e.g. \"--tensor-parallel-size 2 --max-num-seqs 16\".")
    group.add_argument("--serve-port", type=int, default=8765, help="Port of the servers it starts (default 8765).")
    group.add_argument("--serve-threads", type=int, default=1,
                       help="Torch threads per replica on the CPU (OMP_NUM_THREADS; default 1).")
    group.add_argument("--serve-startup-timeout", type=float, default=900.0)


def run_replica_scaling(args: argparse.Namespace) -> int:
    from tokenmill.bench.serve import _bench, _json_safe

    rows = []
    for num_replicas in args.replicas:
        args.base_url = f"http://127.0.0.1:{args.serve_port}"
        server = start_ready_server(num_replicas, args)
        try:
            cpu_before = tree_cpu_s(server.pid)
            report = asyncio.run(_bench(args))
            cpu_s = tree_cpu_s(server.pid) - cpu_before
        finally:
            stop_server(server)
        run = report["runs"][-1]
        rows.append({"num_replicas": num_replicas, "server_cpu_s": cpu_s, **run})
        print(f"-- {num_replicas} replica(s): {run['output_throughput']:.1f} output tok/s, server CPU {cpu_s:.1f} s "
              f"over {run['duration_s']:.1f} s wall", flush=True)
    print(format_scaling(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_json_safe({"serve_args": args.serve_args, "runs": rows}), f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot_scaling(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["completed"] > 0 for r in rows) else 1


def format_scaling(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["output_throughput"] or 1.0
    lines = [f"{'replicas':>8} {'out tok/s':>10} {'vs first':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
             f"{'wall s':>7} {'server CPU s':>12}"]
    for r in rows:
        lines.append(f"{r['num_replicas']:>8} {r['output_throughput']:>10.1f} {r['output_throughput'] / base:>7.2f}x "
                     f"{r['ttft']['median_ms']:>12.0f} {r['ttft']['p99_ms']:>12.0f} {r['duration_s']:>7.1f} "
                     f"{r['server_cpu_s']:>12.1f}")
    return "\n".join(lines)


def server_command(num_replicas: int, args: argparse.Namespace) -> list[str]:
    extra = shlex.split(args.serve_args)
    command = [sys.executable, "-m", "tokenmill.serve.cli", "serve", "--num-replicas", str(num_replicas),
               "--port", str(args.serve_port)]
    if "--ray-num-cpus" not in extra and "--address" not in extra:
        tp = int(extra[extra.index("--tensor-parallel-size") + 1]) if "--tensor-parallel-size" in extra else 1
        ranks = tp if tp > 1 else 0  # one Ray CPU per engine core, plus one per rank when sharded,
        command += ["--ray-num-cpus", str(num_replicas * (1 + ranks) + 1)]  # plus one for the API replica
    return command + extra


def start_server(num_replicas: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.serve_threads), MKL_NUM_THREADS=str(args.serve_threads))
    log = tempfile.NamedTemporaryFile("w+", prefix=f"tokenmill-serve-{num_replicas}-", suffix=".log", delete=False)
    server = subprocess.Popen(server_command(num_replicas, args), env=env, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server.log_path = log.name  # type: ignore[attr-defined]
    return server


def start_ready_server(num_replicas: int, args: argparse.Namespace, attempts: int = 2) -> subprocess.Popen:
    """A started server that answers; a start that fails (e.g. Ray timing out on a busy machine) is retried."""
    for attempt in range(attempts):
        server = start_server(num_replicas, args)
        try:
            wait_ready(args.base_url, server, args.serve_startup_timeout)
            return server
        except (RuntimeError, TimeoutError) as error:
            stop_server(server)
            if attempt == attempts - 1:
                raise
            print(f"-- server start failed, retrying: {str(error).splitlines()[0]}", flush=True)
    raise AssertionError("unreachable")


def wait_ready(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            with open(server.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready; "
                               f"its log ({server.log_path}) ends:\n{tail}")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the server at {base_url} was not ready within {timeout_s:.0f} s")


def tree_cpu_s(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def stop_server(server: subprocess.Popen) -> None:
    """SIGINT (the server shuts Serve and Ray down), then SIGKILL of its process group if it lingers."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def plot_scaling(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["num_replicas"] for r in rows]
    fig, (thr_ax, lat_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    thr = [r["output_throughput"] for r in rows]
    thr_ax.plot(xs, thr, marker="o", label="measured")
    thr_ax.plot(xs, [thr[0] * x / xs[0] for x in xs], linestyle=":", color="gray", label="linear")
    thr_ax.set_xlabel("replicas")
    thr_ax.set_ylabel("output tokens/s")
    thr_ax.set_title("throughput")
    thr_ax.legend(fontsize=8)
    lat_ax.plot(xs, [r["ttft"]["median_ms"] for r in rows], marker="o", label="TTFT p50")
    lat_ax.plot(xs, [r["ttft"]["p99_ms"] for r in rows], marker="x", linestyle="--", label="TTFT p99")
    lat_ax.set_xlabel("replicas")
    lat_ax.set_ylabel("ms")
    lat_ax.set_title("time to first token")
    lat_ax.legend(fontsize=8)
    for ax in (thr_ax, lat_ax):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
