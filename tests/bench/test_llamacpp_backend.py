"""The llama.cpp throughput backend (optional extra), --backends and --quantization of bench throughput."""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import pytest

from tokenmill.bench import commands as bench
from tokenmill.bench.backends import (
    WARMUP_OUTPUT_LEN,
    WARMUP_PROMPT_LEN,
    DecodeSpec,
    llamacpp_unavailable_reason,
    run_llamacpp,
)
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


# ------------------------------------------------------------------ the run path, on a stub llama_cpp
class _FakeLlama:
    """What run_llamacpp uses of llama_cpp.Llama: the constructor, n_vocab, generate (an endless
    token stream; the caller stops it) and close. Records every call; holds n_ctx like llama.cpp."""

    VOCAB = 300
    instances: list["_FakeLlama"] = []
    fail_on_call: int | None = None  # generate raises on this call (0-based)

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[dict] = []  # per generate call: prompt, kwargs, tokens yielded
        self.closed = 0
        _FakeLlama.instances.append(self)

    def n_vocab(self) -> int:
        return self.VOCAB

    def generate(self, tokens, **kwargs):
        call = {"prompt": list(tokens), "kwargs": kwargs, "yielded": 0}
        self.calls.append(call)
        if self.fail_on_call == len(self.calls) - 1:
            raise RuntimeError("llama_decode returned -1")
        context = list(tokens)
        while True:
            if len(context) >= self.kwargs["n_ctx"]:
                raise RuntimeError(f"context of {self.kwargs['n_ctx']} tokens is full")
            time.sleep(0.001)  # a timed run takes measurable time
            token = (sum(context) * 31 + 7) % self.VOCAB
            context.append(token)
            call["yielded"] += 1
            yield token

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    module = types.ModuleType("llama_cpp")
    module.Llama = _FakeLlama
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setattr(_FakeLlama, "instances", [])
    monkeypatch.setattr(_FakeLlama, "fail_on_call", None)
    return _FakeLlama


def test_llamacpp_runs_requests_on_the_gguf_file(fake_llama_cpp, tmp_path) -> None:
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    requests = [
        BenchRequest(prompt_ids=(5, 6, 7, 8, 9), prompt_text=None, output_len=4),
        BenchRequest(prompt_ids=(11, 12, 13), prompt_text=None, output_len=9),
        BenchRequest(prompt_ids=(20,), prompt_text=None, output_len=1),
    ]
    result = run_llamacpp(str(gguf), requests, DecodeSpec("greedy"), num_threads=2, warmup=True)

    assert result.skipped is None
    assert (result.backend, result.workload, result.num_requests) == ("llama.cpp (2 threads)", "greedy", 3)
    assert result.num_output_tokens == result.num_computed_tokens == 4 + 9 + 1
    assert result.seconds > 0 and result.cpu_seconds >= 0 and result.peak_memory_bytes > 0
    assert result.memory_kind == "rss"
    row = result.as_dict()
    assert row["output_tokens_per_s"] == pytest.approx(14 / result.seconds) and row["requests_per_s"] > 0

    [llm] = fake_llama_cpp.instances
    assert llm.kwargs == {"model_path": str(gguf), "n_ctx": 12 + 8, "n_threads": 2, "n_threads_batch": 2,
                          "n_batch": 512, "verbose": False}
    assert llm.closed == 1
    warm, timed = llm.calls[:2], llm.calls[2:]
    half = _FakeLlama.VOCAB // 2
    for call in warm:  # two warm-up requests drawn from the middle of the vocabulary
        assert call["prompt"] == list(range(half, half + WARMUP_PROMPT_LEN)) and call["yielded"] == WARMUP_OUTPUT_LEN
    # each request's own prompt, in order, greedy, stopped after exactly its output length
    assert [c["prompt"] for c in timed] == [list(r.prompt_ids) for r in requests]
    assert [c["yielded"] for c in timed] == [r.output_len for r in requests]
    for call in llm.calls:
        assert call["kwargs"] == {"temp": 0.0, "top_k": 1, "repeat_penalty": 1.0, "reset": True}


def test_llamacpp_without_warmup_and_failure_closes(fake_llama_cpp, tmp_path) -> None:
    gguf = str(tmp_path / "m.gguf")
    requests = [BenchRequest(prompt_ids=(1, 2), prompt_text=None, output_len=3)] * 2
    result = run_llamacpp(gguf, requests, DecodeSpec("greedy"), num_threads=1, warmup=False)
    [llm] = fake_llama_cpp.instances
    assert [c["yielded"] for c in llm.calls] == [3, 3] and result.num_output_tokens == 6
    assert llm.kwargs["n_ctx"] == 5 + 8 and llm.kwargs["n_threads"] == 1

    fake_llama_cpp.fail_on_call = 1  # the second request fails inside llama.cpp
    with pytest.raises(RuntimeError, match="llama_decode"):
        run_llamacpp(gguf, requests, DecodeSpec("greedy"), num_threads=1, warmup=False)
    assert fake_llama_cpp.instances[-1].closed == 1  # the model is closed all the same
