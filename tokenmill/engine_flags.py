"""Engine flags that the CLI (serve/cli_args.py) and the benchmarks (tokenmill/bench) share."""

from __future__ import annotations

from typing import Any


def add_async_scheduling_flags(group: Any) -> None:
    """--async-scheduling / --no-async-scheduling -> args.async_scheduling True / False (None: unset,
    the engine's device default)."""
    overlap = group.add_mutually_exclusive_group()
    overlap.add_argument("--async-scheduling", action="store_true", default=None,
                         help="Overlapped steps: step N+1 is scheduled and run before step N's tokens are applied "
                              "(default: on for one CUDA device, off on the CPU and with tensor parallelism).")
    overlap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                         help="Synchronous steps on every device.")
