"""The benchmark tools run end to end on tiny workloads and report their numbers (no timed asserts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket

import pytest

from tests.bench.stub_openai import StubServer, stub_app
from tokenmill.bench import backends
from tokenmill.bench import commands as bench
from tokenmill.bench.backends import continuous_batching_config
from tokenmill.bench.serve import RequestResult, compute_metrics
from tokenmill.bench.workload import LengthRange, load_jsonl_workload, random_token_workload

STUB_CHUNK_DELAY_S = 0.002


# ------------------------------------------------------------------ a stub OpenAI-compatible server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stub_server():
    app = stub_app(chunk_delay_s=STUB_CHUNK_DELAY_S)
    port = _free_port()
    server = StubServer(app, port)
    yield f"http://127.0.0.1:{port}", app.state.seen
    server.stop()


def _parser(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


# ------------------------------------------------------------------ bench serve
def test_bench_serve_sweep_reports_metrics_json_and_plot(stub_server, tmp_path, capsys):
    base_url, seen = stub_server
    out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
    args = _parser(bench.add_serve_parser).parse_args([
        "--base-url", base_url, "--num-prompts", "6", "--min-prompt-len", "3", "--max-prompt-len", "9",
        "--output-len", "5", "--max-concurrency", "1,3", "--ignore-eos", "--json", str(out_json), "--plot", str(out_png),
    ])
    assert args.func(args) == 0
    report = json.loads(out_json.read_text())
    assert report["model"] == "stub-model"  # found through GET /v1/models
    assert [r["max_concurrency"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        assert run["total_output_tokens"] == 30
        assert run["request_rate"] == "inf"
        assert run["output_throughput"] > 0 and run["request_throughput"] > 0
        for key in ("ttft", "tpot", "itl", "e2el"):
            s = run[key]
            assert 0 < s["median_ms"] <= s["p90_ms"] <= s["p99_ms"]
        # Each chunk waits for the stub's delay: the E2E latency covers all five of them.
        assert run["e2el"]["mean_ms"] >= 5 * STUB_CHUNK_DELAY_S * 1000 * 0.9
        assert run["ttft"]["mean_ms"] < run["e2el"]["mean_ms"]
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b"\x89PNG"
    body = seen[-1]
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True}
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "TPOT" in printed and "output throughput" in printed


def test_bench_serve_poisson_rate_with_dataset(stub_server, tmp_path):
    base_url, seen = stub_server
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "hello there", "output_len": 2}\n{"prompt_ids": [5, 6, 7]}\n')
    args = _parser(bench.add_serve_parser).parse_args([
        "--base-url", base_url, "--model", "stub-model", "--dataset", str(dataset), "--num-prompts", "2",
        "--min-output-len", "3", "--max-output-len", "3", "--request-rate", "50", "--no-warmup",
        "--json", str(tmp_path / "r.json"),
    ])
    assert args.func(args) == 0
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert run["request_rate"] == 50 and run["completed"] == 2
    assert run["total_output_tokens"] == 2 + 3
    assert run["total_input_tokens"] == 2 + 3
    assert [5, 6, 7] in [b["prompt"] for b in seen[-2:]]


def test_bench_serve_counts_failures(stub_server, tmp_path):
    base_url, _ = stub_server
    args = _parser(bench.add_serve_parser).parse_args([
        "--base-url", base_url, "--model", "no-such-model", "--num-prompts", "2", "--output-len", "2",
        "--no-warmup", "--json", str(tmp_path / "f.json"),
    ])
    assert args.func(args) == 1  # nothing completed
    run = json.loads((tmp_path / "f.json").read_text())["runs"][0]
    assert run["failed"] == 2 and "HTTP 404" in run["errors"][0]


def test_metrics_follow_vllm_definitions():
    results = [
        RequestResult(ok=True, output_tokens=3, ttft=0.1, e2e=0.5, itl=[0.2, 0.2]),
        RequestResult(ok=True, output_tokens=1, ttft=0.3, e2e=0.3, itl=[]),
        RequestResult(ok=False, error="boom"),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["boom"]
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.0)
    assert m["tpot"]["mean_ms"] == pytest.approx(200.0)  # (0.5 - 0.1) / (3 - 1); one-token requests excluded
    assert m["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert m["itl"]["median_ms"] == pytest.approx(200.0)
    assert m["e2el"]["p99_ms"] == pytest.approx(300 + 0.99 * 200)  # linear interpolation, as numpy


def test_workloads_are_seeded_and_in_range(tmp_path):
    a = random_token_workload(20, LengthRange(3, 9), LengthRange(2, 5), vocab_size=300, seed=7)
    b = random_token_workload(20, LengthRange(3, 9), LengthRange(2, 5), vocab_size=300, seed=7)
    assert a == b
    assert all(3 <= r.prompt_len <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert all(150 <= t < 300 for r in a for t in r.prompt_ids)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "output_len": 0}\n')
    with pytest.raises(ValueError, match="output_len=0"):
        load_jsonl_workload(bad, None, LengthRange(1, 2), seed=0)


# ------------------------------------------------------------------ bench throughput
def test_bench_throughput_tiny_random_model(tmp_path, capsys):
    out_json = tmp_path / "throughput.json"
    args = _parser(bench.add_throughput_parser).parse_args([
        "--random-model", "tiny", "--device", "cpu", "--workload", "all", "--num-requests", "4",
        "--min-prompt-len", "4", "--max-prompt-len", "12", "--min-output-len", "3", "--max-output-len", "6",
        "--hf-batch-size", "2", "--num-beams", "2", "--no-warmup", "--num-threads", "1", "--json", str(out_json),
    ])
    assert args.func(args) == 0
    report = json.loads(out_json.read_text())
    for name in ("greedy", "beam"):
        workload = report["workloads"][name]
        asked = workload["num_output_tokens_asked"]
        by_backend = {r["backend"]: r for r in workload["results"]}
        ours = by_backend["tokenmill"]
        hf = by_backend["hf-generate (batch 2)"]
        assert ours["num_output_tokens"] == asked and hf["num_output_tokens"] == asked
        assert hf["num_computed_tokens"] >= asked  # static batches run to their longest request
        assert ours["seconds"] > 0 and ours["peak_memory_bytes"] > 0 and ours["memory_kind"] == "rss"
        assert ours["cpu_seconds"] > 0 and hf["cpu_seconds"] > 0
        assert "tokenmill/hf-generate (batch 2)" in workload["ratios_per_cpu_second"]
        assert math.isclose(workload["ratios"]["tokenmill/hf-generate (batch 2)"],
                            ours["output_tokens_per_s"] / hf["output_tokens_per_s"])
    greedy_batch = {r["backend"]: r for r in report["workloads"]["greedy"]["results"]}["hf-generate-batch"]
    assert greedy_batch["skipped"] is None and greedy_batch["num_output_tokens"] == asked_greedy(report)
    beam_batch = {r["backend"]: r for r in report["workloads"]["beam"]["results"]}["hf-generate-batch"]
    assert "beam" in beam_batch["skipped"]
    printed = capsys.readouterr().out
    assert "ratio tokenmill/hf-generate (batch 2)" in printed and "tok/s" in printed


def asked_greedy(report: dict) -> int:
    return report["workloads"]["greedy"]["num_output_tokens_asked"]


def test_bench_is_a_tokenmill_subcommand_group():
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench.register(subparsers)
    args = parser.parse_args(["bench", "serve", "--max-concurrency", "1,4", "--request-rate", "2,inf"])
    assert args.max_concurrency == [1, 4] and args.request_rate == [2.0, math.inf]
    args = parser.parse_args(["bench", "throughput", "--workload", "beam", "--hf-batch-size", "4"])
    assert args.workload == "beam" and args.hf_batch_size == 4 and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "serve", "--max-concurrency", "0"])


def test_tokenmill_console_script_has_bench():
    from tokenmill.serve.cli import build_parser

    args = build_parser().parse_args(["bench", "throughput", "--random-model", "tiny", "--num-requests", "2"])
    assert args.command == "bench" and args.bench_command == "throughput" and args.num_requests == 2


# ------------------------------------------------------------------ transformers versions, failing backends
@dataclasses.dataclass
class ConfigOf5_17:  # transformers 5.17's ContinuousBatchingConfig fields that the benchmark sets
    block_size: int = 256
    num_blocks: int | None = None
    max_batch_tokens: int | None = None
    max_requests_per_batch: int | None = None


@dataclasses.dataclass
class ConfigOf5_24:  # 5.24: page_size, block_size kept as a deprecated alias
    page_size: int = 256
    num_blocks: int | None = None
    max_batch_tokens: int | None = None
    max_requests_per_batch: int | None = None
    block_size: int | None = None


@pytest.mark.parametrize("config_class,size_field", [(ConfigOf5_17, "block_size"), (ConfigOf5_24, "page_size")])
def test_continuous_batching_config_follows_the_installed_signature(config_class, size_field):
    config = continuous_batching_config(
        config_class, page_tokens=64, num_blocks=9, max_batch_tokens=128, max_requests_per_batch=4
    )
    assert getattr(config, size_field) == 64
    assert (config.num_blocks, config.max_batch_tokens, config.max_requests_per_batch) == (9, 128, 4)
    if config_class is ConfigOf5_24:
        assert config.block_size is None  # the deprecated alias is left alone


def test_continuous_batching_config_names_what_the_version_lacks():
    @dataclasses.dataclass
    class Unknown:
        page_size: int = 256

    with pytest.raises(TypeError, match="lacks \\['num_blocks'\\]"):
        continuous_batching_config(Unknown, page_tokens=16, num_blocks=3)

    @dataclasses.dataclass
    class NoPage:
        num_blocks: int = 1

    with pytest.raises(TypeError, match="neither page_size nor block_size"):
        continuous_batching_config(NoPage, page_tokens=16, num_blocks=3)


def test_continuous_batching_config_of_the_installed_transformers():
    from transformers import ContinuousBatchingConfig

    config = continuous_batching_config(ContinuousBatchingConfig, page_tokens=32, num_blocks=5, max_batch_tokens=64,
                                        max_requests_per_batch=2)
    assert config.num_blocks == 5 and 32 in (getattr(config, "page_size", None), getattr(config, "block_size", None))


TINY_ARGS = [
    "--random-model", "tiny", "--device", "cpu", "--num-requests", "3", "--min-prompt-len", "4",
    "--max-prompt-len", "10", "--min-output-len", "2", "--max-output-len", "4", "--hf-batch-size", "2",
    "--no-warmup", "--num-threads", "1",
]


def test_a_backend_that_cannot_run_is_skipped_and_the_others_report(tmp_path, capsys, monkeypatch):
    import transformers

    @dataclasses.dataclass
    class FutureConfig:  # a transformers version whose config the benchmark does not know
        kv_page_tokens: int = 256

    def broken_generate(*args, **kwargs):
        raise RuntimeError("generate exploded")

    monkeypatch.setattr(transformers, "ContinuousBatchingConfig", FutureConfig)
    monkeypatch.setattr(backends, "run_hf_generate", broken_generate)
    out_json = tmp_path / "t.json"
    args = _parser(bench.add_throughput_parser).parse_args(
        TINY_ARGS + ["--no-step-profile", "--json", str(out_json)]
    )
    assert args.func(args) == 0  # tokenmill ran: the run succeeds
    results = {r["backend"]: r for r in json.loads(out_json.read_text())["workloads"]["greedy"]["results"]}
    assert results["tokenmill"]["skipped"] is None and results["tokenmill"]["num_output_tokens"] > 0
    assert "neither page_size nor block_size" in results["hf-generate-batch"]["skipped"]
    assert results["hf-generate (batch 2)"]["skipped"] == "FAILED: RuntimeError: generate exploded"
    printed = capsys.readouterr().out
    assert "hf-generate-batch         skipped: TypeError: FutureConfig takes neither" in printed


def test_tokenmill_failure_is_the_exit_code_and_hf_numbers_stay(tmp_path, monkeypatch):
    def broken_tokenmill(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(backends, "run_tokenmill", broken_tokenmill)
    out_json = tmp_path / "t.json"
    args = _parser(bench.add_throughput_parser).parse_args(
        TINY_ARGS + ["--backends", "tokenmill,hf-generate", "--no-step-profile", "--json", str(out_json)]
    )
    assert args.func(args) == 1
    workload = json.loads(out_json.read_text())["workloads"]["greedy"]
    results = {r["backend"]: r for r in workload["results"]}
    assert set(results) == {"tokenmill", "hf-generate (batch 2)"}  # hf-generate-batch not selected
    assert results["tokenmill"]["skipped"] == "FAILED: RuntimeError: engine exploded"
    assert results["hf-generate (batch 2)"]["num_output_tokens"] == workload["num_output_tokens_asked"]
    assert workload["ratios"] == {}


def test_backends_option_rejects_unknown_names():
    with pytest.raises(SystemExit):
        _parser(bench.add_throughput_parser).parse_args(["--backends", "tokenmill,vllm"])


def test_step_profile_reports_host_overhead(tmp_path, capsys):
    out_json = tmp_path / "t.json"
    args = _parser(bench.add_throughput_parser).parse_args(
        TINY_ARGS + ["--backends", "tokenmill", "--profile-steps", "5", "--json", str(out_json)]
    )
    assert args.func(args) == 0
    workload = json.loads(out_json.read_text())["workloads"]["greedy"]
    assert [r["backend"] for r in workload["results"]] == ["tokenmill"]
    profile = workload["step_profile"]
    assert profile["batch_size"] == 3 and profile["num_steps"] == 5 and profile["device"] == "cpu"
    assert 0 < profile["forward_ms"] <= profile["run_ms"] and profile["forward_ms"] <= profile["step_ms"]
    assert profile["host_ms"] >= 0 and profile["cpu_ms_per_step"] > 0
    assert profile["forward_cpu_ms"] > 0 and profile["host_cpu_ms"] >= 0
    assert profile["gpu_kernel_ms"] is None and profile["gpu_note"] == "not a CUDA device"
    assert profile["pipelined_step_ms"] > 0 and profile["async_scheduling"] is False
    single = workload["step_profile_single_stream"]
    assert single["batch_size"] == 1 and single["num_steps"] == 5 and single["step_ms"] > 0
    printed = capsys.readouterr().out
    assert "decode step      median" in printed and "host outside the forward" in printed
    assert "(synchronous steps, no sync between steps)" in printed


def test_step_profile_with_overlapped_steps(tmp_path, capsys):
    out_json = tmp_path / "t.json"
    args = _parser(bench.add_throughput_parser).parse_args(
        TINY_ARGS + ["--backends", "tokenmill", "--profile-steps", "4", "--async-scheduling", "--json", str(out_json)]
    )
    assert args.func(args) == 0
    workload = json.loads(out_json.read_text())["workloads"]["greedy"]
    result = workload["results"][0]
    assert result["skipped"] is None and result["num_output_tokens"] == workload["num_output_tokens_asked"]
    profile = workload["step_profile"]
    assert profile["async_scheduling"] is True and profile["pipelined_step_ms"] > 0
    assert "(overlapped steps, no sync between steps)" in capsys.readouterr().out


def test_step_profile_leaves_the_engine_as_it_found_it():
    from tokenmill.bench.models import load_bench_model
    from tokenmill.bench.step_profile import profile_kv_blocks, profile_steps
    from tokenmill.engine.llm_engine import LLMEngine

    loaded = load_bench_model(None, "tiny", "cpu", "float32", 0)
    prompts = [[5 + i] * (3 + 4 * i) for i in range(4)]
    engine = LLMEngine.from_args(loaded=loaded, max_num_seqs=4, max_num_batched_tokens=8, device="cpu",
                                 num_kv_blocks=profile_kv_blocks(prompts, 4, 16, 8))
    profile = profile_steps(engine, prompts, num_steps=4)
    assert profile.batch_size == 4 and profile.prefill_steps >= 3  # 42 prompt tokens, 8 a step
    assert "run" not in vars(engine.runner)  # the timing wrapper is gone
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    class StepWithoutRunner:  # an engine whose step never reaches runner.run: reported, not looped on
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self):
            return []

    with pytest.raises(RuntimeError, match="did not call engine.runner.run"):
        profile_steps(StepWithoutRunner(engine), prompts, num_steps=2)
    assert not engine.has_unfinished_requests()  # its requests were aborted


@pytest.mark.parametrize("outputs, kind, detokenize", [("core", "delta", False), ("stream", "cumulative", True),
                                                      ("final", "final", True)])
def test_step_profile_requests_ask_for_the_front_ends_outputs(outputs, kind, detokenize):
    from tokenmill.bench.models import load_bench_model
    from tokenmill.bench.step_profile import profile_kv_blocks, profile_steps
    from tokenmill.engine.llm_engine import LLMEngine

    loaded = load_bench_model(None, "tiny", "cpu", "float32", 0)
    prompts = [[7] * 5, [9] * 6]
    engine = LLMEngine.from_args(loaded=loaded, max_num_seqs=2, device="cpu", num_kv_blocks=profile_kv_blocks(prompts, 2, 16, 2048))
    seen = []
    add = engine.add_request
    engine.add_request = lambda rid, prompt, params: (seen.append(params), add(rid, prompt, params))[1]
    profile = profile_steps(engine, prompts, num_steps=2, outputs=outputs)
    assert profile.outputs == outputs and f"outputs as '{outputs}'" in profile.format()
    assert [(p.output_kind, p.detokenize) for p in seen] == [(kind, detokenize)] * 2


def test_top_kernels_rank_the_profilers_cuda_events():
    from types import SimpleNamespace

    from tokenmill.bench.step_profile import StepProfile, top_kernels

    def event(key, device, us, count):
        return SimpleNamespace(key=key, device_type=SimpleNamespace(name=device), self_device_time_total=us,
                               count=count)

    events = [event("gemv", "CUDA", 3000.0, 160), event("aten::mm", "CPU", 0.0, 160), event("attn", "CUDA", 1000.0, 80),
              event("argmax", "CUDA", 500.0, 5)]
    total, top = top_kernels(events, num_steps=5, keep=2)
    assert total == pytest.approx(0.9)  # 4.5 ms of CUDA kernels over 5 steps; the CPU event is not one
    assert top == [("gemv", 0.6, 32.0), ("attn", 0.2, 16.0)]
    profile = StepProfile(device="cuda:0", batch_size=1, num_steps=5, prefill_steps=1, step_ms=2.0, step_ms_min=1.9,
                          run_ms=1.5, prepare_ms=0.2, forward_ms=1.3, host_ms=0.7, cpu_ms_per_step=2.0,
                          forward_cpu_ms=1.3, host_cpu_ms=0.7, gpu_kernel_ms=total, gpu_top_kernels=top,
                          pipelined_step_ms=1.0)
    text = profile.format()
    assert "0.90 ms per step (45% busy; 90% of back-to-back steps)" in text
    assert "0.600 ms    32.0 launches  gemv" in text


@pytest.mark.parametrize("replicas, serve_args", [(1, ""), (2, "--max-num-seqs 8"), (2, "--tensor-parallel-size 2")])
def test_replica_scaling_gives_ray_cpus_for_every_core_and_the_api_replica(replicas, serve_args):
    import argparse

    from tokenmill.bench.replica_scaling import server_command
    from tokenmill.serve.deployment import ServeConfig

    command = server_command(replicas, argparse.Namespace(serve_args=serve_args, serve_port=8765))
    ray_cpus = int(command[command.index("--ray-num-cpus") + 1])
    config = ServeConfig()
    ranks = 2 if "--tensor-parallel-size 2" in serve_args else 0
    needed = replicas * config.num_cpus_per_replica * (1 + ranks) + config.api_replicas * config.num_cpus_per_api_replica
    assert ray_cpus >= needed
