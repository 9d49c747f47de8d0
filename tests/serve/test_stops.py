"""`tokenmill serve` stops within 10 s and leaves no process behind: SIGTERM to the main process, and
SIGTERM to every process of its session at once (what systemd does when it stops the unit)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serve.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
STOP_LIMIT_S = 10.0


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            # A zombie has exited (the test's own child stays one until it is reaped): not left over.
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.fixture
def served(tmp_path_factory):
    """`tokenmill serve` in a session of its own (so its processes can be counted), ready to answer."""
    port = free_port()
    tmp_path = Path(tempfile.mkdtemp(prefix="tmray", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tokenmill.serve.cli", "serve", "--port", str(port), "--api-replicas", "2",
               "--ray-num-cpus", "2", "--max-model-len", "128", "--max-num-seqs", "4", "--device", "cpu"]
    log = open(tmp_path / "serve.log", "w")
    main = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if main.poll() is not None:
                raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 300), (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        yield main
    finally:
        for process in session_processes(main.pid):  # whatever a failed test left
            process.kill()
        main.wait(10)
        log.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


def wait_until_gone(sid: int, limit_s: float) -> tuple[float, list[str]]:
    started = time.monotonic()
    while time.monotonic() - started < limit_s + 20:
        left = session_processes(sid)
        if not left:
            return time.monotonic() - started, []
        time.sleep(0.2)
    return time.monotonic() - started, [p.name() for p in session_processes(sid)]


def test_sigterm_to_the_main_process_stops_everything_within_10_s(served):
    sid = served.pid
    assert len(session_processes(sid)) >= 6  # main, GCS, raylet, controller, proxy, core, API replicas...
    served.send_signal(signal.SIGTERM)
    took, left = wait_until_gone(sid, STOP_LIMIT_S)
    assert not left, f"processes left after {took:.1f} s: {left}"
    assert took < STOP_LIMIT_S, took
    assert served.wait(5) == 0


def test_sigterm_to_the_whole_process_group_stops_everything_within_10_s(served):
    sid = served.pid
    processes = session_processes(sid)
    assert len(processes) >= 6
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    took, left = wait_until_gone(sid, STOP_LIMIT_S)
    assert not left, f"processes left after {took:.1f} s: {left}"
    assert took < STOP_LIMIT_S, took
