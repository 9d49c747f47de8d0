"""Plot of a serving-benchmark sweep: latency percentiles and throughput against rate or concurrency."""

from __future__ import annotations

import math
from typing import Any

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))


def sweep_axis(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The swept quantity (concurrency when it varies, else request rate) and its tick labels."""
    concurrencies = [r["max_concurrency"] for r in runs]
    if len(set(concurrencies)) > 1:
        return "max concurrency", [str(c) if c else "unbounded" for c in concurrencies]
    rates = [r["request_rate"] for r in runs]
    return "request rate (req/s)", ["inf" if math.isinf(float(x)) else f"{float(x):g}" for x in rates]


def plot_serve_sweep(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, ticks = sweep_axis(runs)
    xs = list(range(len(runs)))  # categorical: inf and unbounded have a place too
    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for key, name in LATENCIES:
        median = [r[key]["median_ms"] for r in runs]
        p99 = [r[key]["p99_ms"] for r in runs]
        (line,) = lat_ax.plot(xs, median, marker="o", label=f"{name} median")
        lat_ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{name} p99")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency (ms, log)")
    lat_ax.set_title("latency percentiles")
    lat_ax.legend(fontsize=7, ncol=2)
    thr_ax.plot(xs, [r["output_throughput"] for r in runs], marker="o", color="tab:green", label="output tok/s")
    thr_ax.set_ylabel("output tokens/s")
    req_ax = thr_ax.twinx()
    req_ax.plot(xs, [r["request_throughput"] for r in runs], marker="s", color="tab:purple", label="requests/s")
    req_ax.set_ylabel("requests/s")
    thr_ax.set_title("throughput")
    thr_ax.legend(loc="upper left", fontsize=7)
    req_ax.legend(loc="lower right", fontsize=7)
    for ax in (lat_ax, thr_ax):
        ax.set_xticks(xs, ticks)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
