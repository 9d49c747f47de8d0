"""The llama.cpp throughput backend (optional extra), --backends and --quantization of bench throughput."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from tokenmill.bench import commands as bench
from tokenmill.bench.backends import DecodeSpec, llamacpp_unavailable_reason, run_llamacpp
from tokenmill.bench.workload import BenchRequest


def _throughput_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_throughput_parser(parser)
    return parser.parse_args([
        "--random-model", "tiny", "--device", "cpu", "--num-requests", "3", "--min-prompt-len", "4",
        "--max-prompt-len", "8", "--min-output-len", "3", "--max-output-len", "5", "--no-warmup",
        "--num-threads", "1", *extra,
    ])


def test_unavailable_reasons(monkeypatch) -> None:
    greedy = DecodeSpec("greedy")
    assert "no beam search" in llamacpp_unavailable_reason("m.gguf", DecodeSpec("beam", num_beams=2))
    assert ".gguf" in llamacpp_unavailable_reason(None, greedy)
    assert ".gguf" in llamacpp_unavailable_reason("/models/hf-folder", greedy)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when it is not installed
    reason = llamacpp_unavailable_reason("m.gguf", greedy)
    assert "llama-cpp-python is not installed" in reason and "tokenmill[llamacpp]" in reason
    request = BenchRequest(prompt_ids=(1, 2, 3), prompt_text=None, output_len=2)
    result = run_llamacpp("m.gguf", [request], greedy, num_threads=1, warmup=False)
    assert result.skipped == reason and result.num_output_tokens == 0


def test_throughput_backends_list_with_quantized_tokenmill(tmp_path) -> None:
    out_json = tmp_path / "t.json"
    args = _throughput_args("--backends", "tokenmill,hf,llamacpp", "--quantization", "int8", "--hf-batch-size", "2",
                            "--json", str(out_json))
    assert args.func(args) == 0
    results = json.loads(out_json.read_text())["workloads"]["greedy"]["results"]
    by_backend = {r["backend"]: r for r in results}
    assert set(by_backend) == {"tokenmill", "hf-generate (batch 2)", "llama.cpp (1 threads)"}
    assert by_backend["tokenmill"]["skipped"] is None and by_backend["tokenmill"]["num_output_tokens"] > 0
    assert ".gguf" in by_backend["llama.cpp (1 threads)"]["skipped"]  # a random model has no GGUF file
