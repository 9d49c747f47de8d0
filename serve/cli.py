"""The `tokenmill` console script: one subcommand per module, each registering its own parser.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=<callable taking the parsed args and returning an exit code>`. Modules import their
heavy dependencies (torch, ray) inside that callable, so `tokenmill --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Add a subcommand by adding its module here.
SUBCOMMAND_MODULES = (
    "tokenmill.serve.cli_serve",
    "tokenmill.serve.cli_generate",
    "tokenmill.bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="High-throughput batched text generation.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
