"""Freed host memory kept for reuse (engine/host_memory.py): the page faults of a forward-like
allocation pattern, with and without it, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenmill.engine import host_memory

PATTERN = r"""
import json, resource, sys
import torch
from tokenmill.engine.host_memory import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
w = torch.randn(576, 1536)  # an MLP-like pair of products on activations of several sizes, as steps vary

def step(n):
    h = torch.randn(n, 576)
    for _ in range(4):
        a = h @ w
        h = (torch.nn.functional.silu(a) * a) @ w.T + h
    return h.sum()

for n in (512, 2048, 1024):
    step(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(12):
    step((512, 2048, 1024, 1536)[i % 4])
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def run_pattern(mode: str) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc_mallopt() is None, reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = run_pattern("default"), run_pattern("keep")
    assert kept["applied"] is True
    assert kept["faults"] < 2000  # the steps reuse the heap
    assert default["faults"] > 10 * max(kept["faults"], 1000)  # glibc's default hands it back every step


def test_a_users_malloc_setting_wins(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    calls = []
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: calls.append(1) or (lambda *a: 1))
    assert host_memory.keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "1000000"}) is False
    assert calls == []
    monkeypatch.setattr(host_memory, "_applied", None)
    assert host_memory.keep_freed_memory({}) is True and calls == [1]
    assert host_memory.keep_freed_memory({}) is True and calls == [1]  # once per process
