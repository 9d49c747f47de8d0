"""Every Triton kernel compiles for an sm_90 GPU, checked here without one (compile_for_gpu.py).

The interpreter that runs the kernels in the rest of the suite is more lenient than Triton's
compiler; this is the one check of the compiled form a CPU machine can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_every_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")  # the CUDA backend and its ptxas ship with triton
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[2])
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    failures = [f"{r['kernel']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n\n".join(failures)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_sample_kernel", "_split_stats_kernel", "_split_radix_level_kernel", "_split_totals_kernel",
        "_split_pick_kernel", "_penalties_kernel", "_ban_ngrams_kernel", "_paged_attention_kernel",
        "_combine_splits_kernel", "_write_kv_cache_kernel",
    }
