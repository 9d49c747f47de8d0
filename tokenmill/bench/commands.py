"""`tokenmill bench ...`: benchmark subcommands.

- `tokenmill bench throughput`: offline throughput, tokenmill against transformers' `generate`
  and continuous batching on the same weights (tokenmill/bench/throughput.py);
- `tokenmill bench serve`: a load generator for any OpenAI-compatible /v1/completions endpoint
  (tokenmill/bench/serve.py).

`register(subparsers)` adds the `bench` group to the `tokenmill` console script; the scripts in
benchmarks/ call `throughput_main` and `serve_main`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _run_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.throughput import run_throughput

    return run_throughput(args)


def _run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "replicas", None):
        from tokenmill.bench.replica_scaling import run_replica_scaling

        return run_replica_scaling(args)
    from tokenmill.bench.serve import run_serve_bench

    return run_serve_bench(args)


def add_throughput_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenmill.bench.throughput import add_throughput_args

    add_throughput_args(parser)
    parser.set_defaults(func=_run_throughput)
    return parser


def add_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tokenmill.bench.serve_args import add_serve_bench_args

    from tokenmill.bench.replica_scaling import add_scaling_args

    add_serve_bench_args(parser)
    add_scaling_args(parser)
    parser.set_defaults(func=_run_serve)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench throughput` and `bench serve` to the `tokenmill` command."""
    bench = subparsers.add_parser("bench", help="Benchmarks: offline throughput, serving load.")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    add_throughput_parser(
        kinds.add_parser(
            "throughput",
            help="Offline throughput: tokenmill vs transformers generate / generate_batch.",
            description="Offline throughput: tokenmill LLM.generate against transformers' generate (static "
            "batches) and continuous batching, same model, same process.",
        )
    )
    add_serve_parser(
        kinds.add_parser(
            "serve",
            help="Load generator for an OpenAI-compatible /v1/completions endpoint.",
            description="Streams /v1/completions requests at a Poisson rate or a fixed concurrency; reports "
            "throughput and TTFT / TPOT / ITL / E2E latency percentiles.",
        )
    )


def _main(add: "callable", prog: str, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def throughput_main(argv: list[str] | None = None) -> int:
    return _main(add_throughput_parser, "throughput", argv)


def serve_main(argv: list[str] | None = None) -> int:
    return _main(add_serve_parser, "serve_load", argv)


if __name__ == "__main__":
    sys.exit(throughput_main())
