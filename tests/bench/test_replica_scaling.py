"""`tokenmill bench serve --replicas ...` end to end, with the Ray Serve servers replaced by an in-process stub.

Each "server" the runner starts is a fresh uvicorn stub on `--serve-port` whose per-token delay shrinks with
the replica count, so the report's throughput and TTFT differ per replica count the way a scaling server's do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket

import pytest

from tests.bench.stub_openai import StubServer, stub_app
from tokenmill.bench import commands as bench
from tokenmill.bench import replica_scaling

ONE_REPLICA_CHUNK_DELAY_S = 0.04  # per streamed token with one replica; R replicas wait 1/R of it


class _StubServer(StubServer):
    """Stands in for the `tokenmill serve` Popen: `pid` is this process, so `tree_cpu_s` still measures
    something; R replicas stream R times faster."""

    def __init__(self, num_replicas: int, port: int):
        self.num_replicas = num_replicas
        self.pid = os.getpid()
        super().__init__(stub_app(f"stub-{num_replicas}", ONE_REPLICA_CHUNK_DELAY_S / num_replicas), port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_serve_parser(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def stub_servers(monkeypatch):
    """Replace the runner's server start/stop; record every call in order."""
    events: list[tuple[str, int]] = []
    live: list[_StubServer] = []

    def fake_start_ready_server(num_replicas, args, attempts=2):
        assert args.base_url == f"http://127.0.0.1:{args.serve_port}"  # the load goes to the server it starts
        assert not live, "a server was started while the previous one was still running"
        events.append(("start", num_replicas))
        server = _StubServer(num_replicas, args.serve_port)
        live.append(server)
        return server

    def fake_stop_server(server):
        events.append(("stop", server.num_replicas))
        live.remove(server)
        server.stop()

    monkeypatch.setattr(replica_scaling, "start_ready_server", fake_start_ready_server)
    monkeypatch.setattr(replica_scaling, "stop_server", fake_stop_server)
    yield events
    for server in list(live):
        server.stop()


def test_replica_scaling_runs_each_count_and_reports_json_table_and_plot(stub_servers, tmp_path, capsys):
    out_json, out_png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    args = _args(
        "--replicas", "1,2,4", "--serve-port", str(_free_port()), "--serve-args", "--max-num-seqs 8",
        "--num-prompts", "8", "--min-prompt-len", "3", "--max-prompt-len", "6", "--output-len", "4",
        "--max-concurrency", "4", "--ignore-eos", "--json", str(out_json), "--plot", str(out_png),
    )
    assert args.func(args) == 0  # dispatched to run_replica_scaling by --replicas

    # One server per requested replica count, in order, each stopped before the next starts.
    assert stub_servers == [("start", 1), ("stop", 1), ("start", 2), ("stop", 2), ("start", 4), ("stop", 4)]

    report = json.loads(out_json.read_text())
    assert report["serve_args"] == "--max-num-seqs 8"
    runs = report["runs"]
    assert [r["num_replicas"] for r in runs] == [1, 2, 4]
    for run in runs:
        assert run["completed"] == 8 and run["failed"] == 0
        assert run["total_output_tokens"] == 8 * 4
        assert run["max_concurrency"] == 4 and run["request_rate"] == "inf"  # strict JSON, no Infinity
        assert run["output_throughput"] > 0
        assert 0 < run["ttft"]["median_ms"] <= run["ttft"]["p99_ms"]
        assert run["server_cpu_s"] >= 0
    # Each run loaded its own server: with 1/4 of the per-token delay, 4 replicas stream faster than 1.
    assert runs[2]["output_throughput"] > runs[0]["output_throughput"]
    assert runs[2]["ttft"]["median_ms"] < runs[0]["ttft"]["median_ms"]

    printed = capsys.readouterr().out
    table = printed[printed.index("replicas"):].splitlines()
    assert "out tok/s" in table[0] and "vs first" in table[0] and "TTFT p50 ms" in table[0] and "TTFT p99 ms" in table[0]
    for line, run in zip(table[1:4], runs):
        cols = line.split()
        assert int(cols[0]) == run["num_replicas"]
        assert float(cols[1]) == pytest.approx(run["output_throughput"], abs=0.051)
        ratio = run["output_throughput"] / runs[0]["output_throughput"]
        assert cols[2] == f"{ratio:.2f}x"
        assert float(cols[3]) == pytest.approx(run["ttft"]["median_ms"], abs=0.51)
        assert float(cols[4]) == pytest.approx(run["ttft"]["p99_ms"], abs=0.51)
        assert float(cols[6]) == pytest.approx(run["server_cpu_s"], abs=0.051)
    assert table[1].split()[2] == "1.00x"
    for r in (1, 2, 4):
        assert re.search(rf"^-- {r} replica\(s\): [\d.]+ output tok/s", printed, re.M)
    assert f"wrote {out_json}" in printed and f"wrote {out_png}" in printed

    data = out_png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_replica_scaling_stops_the_server_when_the_load_fails(stub_servers, monkeypatch, tmp_path):
    from tokenmill.bench import serve

    async def failing_bench(args):
        raise RuntimeError("load failed")

    monkeypatch.setattr(serve, "_bench", failing_bench)
    args = _args("--replicas", "2,4", "--serve-port", str(_free_port()), "--json", str(tmp_path / "x.json"))
    with pytest.raises(RuntimeError, match="load failed"):
        replica_scaling.run_replica_scaling(args)
    assert stub_servers == [("start", 2), ("stop", 2)]
    assert not (tmp_path / "x.json").exists()


def test_format_scaling_ratios_against_the_first_count():
    ttft = {"median_ms": 12.0, "p99_ms": 40.0}
    rows = [{"num_replicas": r, "output_throughput": thr, "ttft": ttft, "duration_s": 1.0, "server_cpu_s": 2.0}
            for r, thr in ((1, 100.0), (2, 190.0), (4, 350.0))]
    lines = replica_scaling.format_scaling(rows).splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["1.00x", "1.90x", "3.50x"]
    assert lines[3].split()[:5] == ["4", "350.0", "3.50x", "12", "40"]
