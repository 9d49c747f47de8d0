"""Run a test case in a fresh Python process, so that a crash fails that case only.

A CUDA device-side assert (an index out of range inside a kernel) leaves the whole process's CUDA
context unusable: every later test in that process fails too. A case run here is a call of
`module:function(**kwargs)` in a new interpreter (`python -c`, the repository root first on
sys.path); it passes when the call returns, and fails with its own output otherwise (exception,
abort, non-zero exit, or the time limit).

    result = run_case("tests.engine.test_greedy_parity:check_greedy_case", dict(arch="llama", ...))
    assert_passed(result)

`CasePool` runs several such cases at once (one process each) and hands back each result by name,
so a parametrised test can wait for its own case while the others run beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TAIL_CHARS = 6000

# The child: repository root first on sys.path, the parent's torch thread count, then the call.
_CHILD = """
import importlib, json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
module_name, _, function_name = sys.argv[1].partition(":")
function = getattr(importlib.import_module(module_name), function_name)
function(**json.loads(sys.argv[2]))
"""


@dataclass(frozen=True)
class CaseResult:
    name: str
    returncode: int | None  # None: killed at the time limit
    output: str  # stdout and stderr together
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            status = f"timed out after {self.seconds:.0f} s"
        elif self.returncode < 0:
            status = f"killed by signal {-self.returncode}"
        else:
            status = f"exit code {self.returncode}"
        return f"case {self.name} failed ({status}); its output ends with:\n{self.output[-OUTPUT_TAIL_CHARS:]}"


def run_case(
    target: str, kwargs: dict[str, Any] | None = None, *, name: str | None = None, timeout: float = 600,
    env: dict[str, str] | None = None,
) -> CaseResult:
    """Call `target` ("package.module:function") with JSON-serialisable `kwargs` in a new process."""
    import torch

    code = _CHILD.format(root=str(ROOT), threads=torch.get_num_threads())
    argv = [sys.executable, "-c", code, target, json.dumps(kwargs or {})]
    child_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )
        returncode, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:  # subprocess.run has killed the child
        returncode = None
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
    return CaseResult(name or target, returncode, output, time.perf_counter() - start)


def assert_passed(result: CaseResult) -> None:
    if not result.ok:
        raise AssertionError(result.describe())


class CasePool:
    """Cases started at once in separate processes (at most `max_workers` alive), results by key."""

    def __init__(self, max_workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max(1, max_workers))
        self._futures: dict[Hashable, Future[CaseResult]] = {}

    def submit(self, key: Hashable, target: str, kwargs: dict[str, Any], **options: Any) -> None:
        if key in self._futures:
            raise ValueError(f"case {key!r} was already submitted")
        self._futures[key] = self._executor.submit(run_case, target, kwargs, name=str(key), **options)

    def result(self, key: Hashable) -> CaseResult:
        if key not in self._futures:
            raise KeyError(f"case {key!r} was never submitted: submitted {sorted(map(str, self._futures))}")
        return self._futures[key].result()

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._executor.shutdown(wait=True)
