"""Serving load generator: streamed /v1/completions requests against an OpenAI-compatible server.

Requests arrive as a Poisson process (`--request-rate`, inf: all at once) and/or under a cap on
requests in flight (`--max-concurrency`). Metrics follow vLLM's benchmark_serving:

- TTFT: request sent -> first streamed chunk;
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token;
- ITL: time between successive streamed chunks, over all requests;
- E2E: request sent -> last chunk;
- throughput: completed requests / wall time, output tokens / wall time.

Output tokens are the server's `usage.completion_tokens` (asked with stream_options.include_usage);
a server that sends no usage gets one token per content chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tokenmill.bench.workload import (
    BenchRequest,
    LengthRange,
    load_jsonl_workload,
    random_text_workload,
)

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # seconds between chunks


def _summary(values: list[float]) -> dict[str, float]:
    """mean/median/p90/p99 in milliseconds (zeros when there are no values)."""
    import numpy as np

    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0}
    arr = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(arr, PERCENTILES)
    return {"mean_ms": float(arr.mean()), "median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    num_output = sum(r.output_tokens for r in done)
    prompt_counts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": sum(prompt_counts) if prompt_counts else None,
        "total_output_tokens": num_output,
        "total_chunks": sum(len(r.itl) + 1 for r in done),  # streamed chunks with content
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": num_output / duration_s if duration_s > 0 else 0.0,
        "ttft": _summary([r.ttft for r in done]),
        "tpot": _summary(tpots),
        "itl": _summary([x for r in done for x in r.itl]),
        "e2el": _summary([r.e2e for r in done]),
    }



def wait_healthy(base_url: str, timeout_s: float, exited: Callable[[], str | None] = lambda: None) -> None:
    """Until `base_url`/health answers 200; `exited()` returns why the server is gone (then this raises)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = exited()
        if reason is not None:
            raise RuntimeError(f"the server at {base_url} stopped before it was ready: {reason}")
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {base_url} was not ready within {timeout_s:.0f} s")

async def send_completion(session: Any, url: str, payload: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    """One streamed completion; never raises (failures are results with ok=False)."""
    result = RequestResult()
    start = last = time.perf_counter()
    num_chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:") :].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"stream error: {chunk['error']}"
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
        result.e2e = time.perf_counter() - start
        result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
        result.ok = num_chunks > 0
        if not result.ok:
            result.error = "stream ended without a chunk"
    except Exception as error:  # connection refused, timeout, bad JSON: a failed request
        result.error = f"{type(error).__name__}: {error}"
    return result


def _payload(request: BenchRequest, args: Any, model: str) -> dict[str, Any]:
    prompt: Any = list(request.prompt_ids) if request.prompt_ids is not None else request.prompt_text
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": request.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def run_load(
    requests: list[BenchRequest], args: Any, model: str, url: str, headers: dict[str, str],
    request_rate: float, max_concurrency: int | None,
) -> dict[str, Any]:
    """Send all `requests` at `request_rate` (Poisson) under `max_concurrency`; returns the metrics."""
    import aiohttp

    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)  # the semaphore, not the pool, bounds concurrency

    async def one(session: Any, request: BenchRequest) -> RequestResult:
        if limit is None:
            return await send_completion(session, url, _payload(request, args, model), headers)
        async with limit:
            return await send_completion(session, url, _payload(request, args, model), headers)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        tasks = []
        for i, request in enumerate(requests):
            if i > 0 and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(session, request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    metrics = compute_metrics(list(results), duration)
    metrics.update(request_rate=request_rate, max_concurrency=max_concurrency, num_prompts=len(requests))
    return metrics


async def first_model(base_url: str, headers: dict[str, str], timeout: float) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET /v1/models answered HTTP {resp.status}; pass --model")
            data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models listed no model; pass --model")
    return data[0]["id"]


def build_requests(args: Any) -> list[BenchRequest]:
    if args.num_prompts < 1:
        raise ValueError(f"num_prompts={args.num_prompts} is invalid: allowed an integer >= 1")
    if args.output_len is not None:
        output_lens = LengthRange(args.output_len, args.output_len)
    else:
        output_lens = LengthRange(args.min_output_len, args.max_output_len)
    if args.dataset:
        requests = load_jsonl_workload(args.dataset, args.num_prompts, output_lens, args.seed)
        if args.output_len is not None:
            requests = [BenchRequest(r.prompt_ids, r.prompt_text, args.output_len) for r in requests]
        return requests
    prompt_lens = LengthRange(args.min_prompt_len, args.max_prompt_len)
    return random_text_workload(args.num_prompts, prompt_lens, output_lens, args.seed)


def format_metrics(m: dict[str, Any]) -> str:
    rate = "inf" if math.isinf(m["request_rate"]) else f"{m['request_rate']:g}"
    lines = [
        f"== request rate {rate}/s, max concurrency {m['max_concurrency'] or 'unbounded'}: "
        f"{m['completed']}/{m['num_prompts']} completed in {m['duration_s']:.2f} s",
        f"request throughput {m['request_throughput']:.3f} req/s, output throughput {m['output_throughput']:.1f} tok/s "
        f"({m['total_output_tokens']} output tokens)",
        f"{'':<6}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}   (ms)",
    ]
    for key in ("ttft", "tpot", "itl", "e2el"):
        s = m[key]
        lines.append(f"{key.upper():<6}{s['mean_ms']:>10.1f}{s['median_ms']:>10.1f}{s['p90_ms']:>10.1f}{s['p99_ms']:>10.1f}")
    if m["failed"]:
        lines.append(f"failed: {m['failed']} ({'; '.join(m['errors'])})")
    return "\n".join(lines)


async def _bench(args: Any) -> dict[str, Any]:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = args.model or await first_model(args.base_url, headers, args.timeout)
    url = args.base_url.rstrip("/") + args.endpoint
    requests = build_requests(args)
    if not args.no_warmup:
        probe = await run_load(requests[:1], args, model, url, headers, math.inf, None)
        if probe["failed"]:
            raise RuntimeError(f"test request to {url} failed: {'; '.join(probe['errors'])}")
    runs = []
    for rate in args.request_rate:
        for concurrency in args.max_concurrency or [None]:
            metrics = await run_load(requests, args, model, url, headers, rate, concurrency)
            print(format_metrics(metrics), flush=True)
            runs.append(metrics)
    return {"base_url": args.base_url, "model": model, "runs": runs}


def _json_safe(value: Any) -> Any:
    """inf -> "inf" (strict JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_serve_bench(args: Any) -> int:
    report = asyncio.run(_bench(args))
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_json_safe(report), f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        from tokenmill.bench.plot import plot_serve_sweep

        plot_serve_sweep(report["runs"], args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["completed"] > 0 for r in report["runs"]) else 1
