"""Command-line options of `tokenmill bench serve` (kept apart so `tokenmill --help` imports nothing heavy)."""

from __future__ import annotations

import argparse
import math


def parse_float_list(text: str) -> list[float]:
    """'1,4,inf' -> [1.0, 4.0, inf]; every value must be > 0."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = math.inf if part.lower() in ("inf", "infinity") else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number (allowed: numbers > 0 or inf, comma-separated)")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{part!r} is invalid: allowed numbers > 0 or inf")
        values.append(value)
    return values


def parse_int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; every value must be >= 1."""
    values = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an integer (allowed: integers >= 1, comma-separated)")
        if value < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is invalid: allowed integers >= 1")
        values.append(value)
    return values


def add_serve_bench_args(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root; requests go to BASE/v1/completions.")
    s.add_argument("--endpoint", default="/v1/completions")
    s.add_argument("--model", default=None, help='"model" field of each request (default: the first of GET /v1/models).')
    s.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY).")
    s.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take (default 600).")
    w = parser.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--dataset", default=None,
                   help='JSONL file, one {"prompt": text | "prompt_ids": [...], "output_len": n} a line.')
    w.add_argument("--min-prompt-len", type=int, default=32, help="Random prompts: words at least (default 32).")
    w.add_argument("--max-prompt-len", type=int, default=256, help="Random prompts: words at most (default 256).")
    w.add_argument("--min-output-len", type=int, default=64)
    w.add_argument("--max-output-len", type=int, default=256)
    w.add_argument("--max-tokens", "--output-len", dest="output_len", type=int, default=None,
                   help="Every request asks for exactly this many tokens (overrides min/max output len).")
    w.add_argument("--ignore-eos", action="store_true",
                   help='Send "ignore_eos": true (tokenmill and vLLM accept it) so outputs have the asked length.')
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of the Poisson arrivals.")
    l = parser.add_argument_group("load")
    l.add_argument("--request-rate", type=parse_float_list, default=[math.inf],
                   help="Requests/s of a Poisson process, or inf: all at once; comma-separated values sweep.")
    l.add_argument("--max-concurrency", type=parse_int_list, default=None,
                   help="Requests in flight at most; comma-separated values sweep (e.g. 1,4,16).")
    l.add_argument("--no-warmup", action="store_true", help="Skip the single test request sent first.")
    o = parser.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="Write the numbers as JSON here.")
    o.add_argument("--plot", default=None, metavar="PATH.png",
                   help="Latency percentiles and throughput against the swept rate or concurrency.")
