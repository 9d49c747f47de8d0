"""The per-case process harness (tests/isolated.py): a crash, an exception or a hang fails its own case
only, with its output, and the cases beside it still pass."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.isolated import CasePool, assert_passed, run_case

TARGET = "tests.test_isolated"


def write_marker(path: str, text: str) -> None:
    """A case that passes and leaves evidence that it ran in another process."""
    with open(path, "w") as f:
        f.write(f"{text} pid={os.getpid()} path0={sys.path[0]}")


def abort() -> None:
    print("about to abort", flush=True)
    os.abort()  # like a CUDA device-side assert: the process dies, no exception to catch


def fail(message: str) -> None:
    raise RuntimeError(message)


def hang() -> None:
    print("hanging", flush=True)
    time.sleep(600)


def test_crashing_cases_fail_alone_and_the_others_pass(tmp_path):
    marker = tmp_path / "marker.txt"
    pool = CasePool(max_workers=2)
    try:
        pool.submit("abort", f"{TARGET}:abort", {})
        pool.submit("fail", f"{TARGET}:fail", {"message": "wrong token 7"})
        pool.submit("hang", f"{TARGET}:hang", {}, timeout=20)
        pool.submit("ok", f"{TARGET}:write_marker", {"path": str(marker), "text": "ran"})
        aborted, failed, hung, ok = (pool.result(k) for k in ("abort", "fail", "hang", "ok"))
    finally:
        pool.close()

    assert aborted.returncode is not None and aborted.returncode != 0 and not aborted.ok
    assert "about to abort" in aborted.output and "abort" in aborted.describe()

    assert failed.returncode == 1
    assert "RuntimeError: wrong token 7" in failed.output
    with pytest.raises(AssertionError, match=r"(?s)case fail failed \(exit code 1\).*wrong token 7"):
        assert_passed(failed)

    assert hung.returncode is None and "timed out" in hung.describe()
    assert 20 <= hung.seconds < 120

    assert_passed(ok)
    text = marker.read_text()
    assert text.startswith("ran") and f"pid={os.getpid()}" not in text
    assert text.endswith(f"path0={run_case.__globals__['ROOT']}")  # the repository root comes first


def test_pool_rejects_unknown_and_duplicate_cases():
    pool = CasePool(max_workers=1)
    try:
        pool.submit("a", f"{TARGET}:fail", {"message": "x"})
        with pytest.raises(ValueError, match="'a' was already submitted"):
            pool.submit("a", f"{TARGET}:fail", {})
        with pytest.raises(KeyError, match="'b' was never submitted"):
            pool.result("b")
        assert not pool.result("a").ok
    finally:
        pool.close()
