"""The gpu-check driver: parts under their own time limits, one report, one JSON (no GPU needed)."""

from __future__ import annotations

import json
import sys
import time

from tokenmill.bench.gpu_check import (
    GPU_TEST_PARTS,
    GPU_TESTS,
    TOTAL_BUDGET_S,
    Part,
    default_parts,
    format_report,
    pytest_outcomes,
    run_parts,
    summarize,
)

PY = sys.executable


def _throughput_json(backend: str, tok_s: float, step_ms: float | None = None, pipelined_ms: float | None = None) -> str:
    workload = {
        "num_requests": 4, "num_prompt_tokens": 40, "num_output_tokens_asked": 20,
        "results": [{"backend": backend, "skipped": None, "output_tokens_per_s": tok_s}],
    }
    if step_ms is not None:
        workload["step_profile"] = {"step_ms": step_ms, "forward_ms": step_ms / 2, "host_ms": step_ms / 2,
                                    "pipelined_step_ms": pipelined_ms, "gpu_kernel_ms": step_ms / 4}
        workload["step_profile_single_stream"] = {"step_ms": step_ms / 4}
    return json.dumps({"workloads": {"greedy": workload}})


def _writer(path, text: str, then: str = "") -> tuple[str, ...]:
    return (PY, "-c", f"import sys; open(sys.argv[1], 'w').write(sys.argv[2]); print('wrote it'); {then}", str(path),
            text)


def test_parts_run_under_their_limits_and_one_report_comes_out(tmp_path):
    parts = [
        Part("gpu-tests-x", (PY, "-c", "print('tests/a.py::test_one PASSED'); print('tests/a.py::test_two FAILED');"
                             "print('FAILED tests/a.py::test_two - AssertionError: 3 != 4'); raise SystemExit(1)"),
             30, group=0),
        Part("hang", (PY, "-c", "import time; print('started', flush=True); time.sleep(300)"), 3, group=0),
        Part("throughput-tokenmill", _writer(tmp_path / "tm.json", _throughput_json("tokenmill", 3000.0, 8.0, 7.0)),
             30, group=1, json_name="tm.json"),
        Part("throughput-tokenmill-sync",
             _writer(tmp_path / "sy.json", _throughput_json("tokenmill", 2000.0, 8.0, 9.0)), 30, group=1.5,
             json_name="sy.json"),
        Part("throughput-hf-generate", _writer(tmp_path / "hf.json", _throughput_json("hf-generate (batch 64)", 1000.0)),
             30, group=2, json_name="hf.json"),
    ]
    start = time.monotonic()
    results = run_parts(parts, tmp_path, budget_s=60)
    assert time.monotonic() - start < 30  # the hang was cut at its 3 s, not waited for
    status = {r.name: r.status for r in results}
    assert status["gpu-tests-x"] == "failed (exit 1)"
    assert status["hang"].startswith("timed out after") and "started" in results[1].output
    assert status["throughput-tokenmill"] == status["throughput-hf-generate"] == "ok"
    assert (tmp_path / "hang.log").read_text().startswith("started")

    report = summarize(results)
    tests = report["gpu_tests"]["gpu-tests-x"]
    assert tests["counts"] == {"PASSED": 1, "FAILED": 1}
    assert tests["failed"] == {"tests/a.py::test_two": "AssertionError: 3 != 4"}
    assert report["ratios"] == {"tokenmill/hf-generate (batch 64)": 3.0}  # of the default engine, not the sync one
    assert report["synchronous"]["throughput"]["output_tokens_per_s"] == 2000.0
    targets = report["targets"]
    assert targets["tokenmill_output_tok_s"] == {"target": 20_000, "measured": 3000.0, "met": False}
    assert targets["ratio_vs_hf_generate"]["met"] is False and targets["decode_step_ms"]["met"] is False
    # Step targets on back-to-back steps (7 ms here, not the synced 8 ms); no back-to-back figure in
    # the single-stream profile: its synced step.
    assert targets["decode_step_ms"]["measured"] == 7.0
    assert targets["single_stream_step_ms"] == {"target": 1.5, "measured": 2.0, "met": False}
    assert targets["decode_gpu_busy"] == {"target": 0.70, "measured": 2.0 / 7.0, "met": False}
    text = format_report(report, results)
    assert "FAILED tests/a.py::test_two - AssertionError: 3 != 4" in text
    assert "ratio tokenmill/hf-generate (batch 64) (useful output tok/s): 3.00x" in text
    assert "decode_step_ms" in text and "NOT met" in text
    assert "synchronous steps: 2000 output tok/s; the default engine 1.50x that" in text
    assert "synchronous steps: 9.00 ms per back-to-back decode step (default 7.00 ms)" in text
    json.dumps(report)  # the whole report is JSON


def test_parts_past_the_budget_are_not_started(tmp_path):
    parts = [
        Part("slow", (PY, "-c", "import time; time.sleep(300)"), 100, group=0),
        Part("later", (PY, "-c", "print('ran')"), 100, group=1),
    ]
    results = run_parts(parts, tmp_path, budget_s=6)
    assert results[0].status.startswith("timed out") and results[0].seconds < 30
    assert results[1].status == "not started (out of time)" and results[1].returncode is None


def test_pytest_outcomes_count_collection_errors():
    output = "\n".join([
        "tests/k.py::test_a[1] PASSED                  [ 50%]",
        "tests/k.py::test_b SKIPPED (needs a CUDA device) [100%]",
        "ERROR tests/kernels/test_x.py - ModuleNotFoundError: No module named 'scipy'",
    ])
    outcomes = pytest_outcomes(output)
    assert outcomes["counts"] == {"PASSED": 1, "SKIPPED": 1, "ERROR": 1}
    assert outcomes["failed"] == {"tests/kernels/test_x.py": "ModuleNotFoundError: No module named 'scipy'"}


def test_default_parts_fit_the_time_and_cover_the_gpu_tests(tmp_path):
    parts = default_parts("python3", tmp_path)
    by_group: dict[float, float] = {}
    for p in parts:
        by_group[p.group] = max(by_group.get(p.group, 0), p.timeout_s)
    assert sum(by_group.values()) <= TOTAL_BUDGET_S <= 8 * 60 - 20
    names = [p.name for p in parts]
    assert set(GPU_TEST_PARTS) <= set(names)
    assert {"kernel-bench", "throughput-tokenmill", "throughput-tokenmill-sync", "throughput-hf-generate"} <= set(names)
    tokenmill = next(p for p in parts if p.name == "throughput-tokenmill")
    assert tokenmill.timeout_s >= 120  # compile + CUDA graphs of the 1B model, twice, before its numbers
    synchronous = next(p for p in parts if p.name == "throughput-tokenmill-sync")
    assert "--no-async-scheduling" in synchronous.argv and "--async-scheduling" not in tokenmill.argv
    tokenmill = next(p for p in parts if p.name == "throughput-tokenmill")
    assert "--random-model 1b --dtype bfloat16 --num-requests 256 --max-num-seqs 256 --hf-batch-size 64" in " ".join(tokenmill.argv)
    assert "tests/engine/test_greedy_parity.py" in GPU_TESTS and "tests/kernels" in GPU_TESTS
    assert "decode" not in GPU_TESTS and "not decode" not in GPU_TESTS  # -k expressions are not paths


def test_every_gpu_marked_test_file_is_run_by_gpu_check():
    """A test file with `gpu` cases that no part runs would never run at all (nothing else has CUDA)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    marked = {
        str(path.relative_to(root)) for path in (root / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in path.read_text() and path.name != "test_gpu_check.py"
    }
    assert marked, "no gpu-marked test files found: the check itself is broken"
    covered = {m for m in marked if any(m == t or m.startswith(t.rstrip("/") + "/") for t in GPU_TESTS)}
    ignored = {a.split("=", 1)[1] for args in GPU_TEST_PARTS.values() for a in args if a.startswith("--ignore=")}
    assert marked - covered == set()
    assert ignored <= set(GPU_TESTS)  # a file one part ignores is another part's own
