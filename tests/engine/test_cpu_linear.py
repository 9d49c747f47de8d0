"""Linear layers of small CPU decode steps as `W @ x.T` over the threads (engine/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine import cpu_linear
from tokenmill.engine.cpu_linear import (
    SmallRowsLinear,
    chunks_for,
    restore_linear,
    small_rows_linear,
    use_small_rows,
    use_small_rows_linear,
)
from tokenmill.engine.quantization import Int8DynamicLinear, quantize_model

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the switch applies only with MKL")


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 33, 64])
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_rows_linear_equals_f_linear(rows: int, chunks: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 10 + chunks)
    x = torch.randn(1, rows, 96, generator=g)  # [batch, rows, K]: the model's 3-D activations
    w = torch.randn(48, 96, generator=g)
    b = torch.randn(48, generator=g) if with_bias else None
    out = small_rows_linear(x, w, b, chunks)
    assert out.shape == (1, rows, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_row_policy() -> None:
    assert not use_small_rows(1, 1)  # one thread: MKL's GEMV is as fast
    assert use_small_rows(1, 2)
    assert use_small_rows(2, 1) and use_small_rows(cpu_linear.MAX_SMALL_ROWS, 1)
    assert not use_small_rows(cpu_linear.MAX_SMALL_ROWS + 1, 1)  # one thread: only a few rows
    assert use_small_rows(cpu_linear.MAX_SMALL_ROWS + 1, 2) and use_small_rows(cpu_linear.MAX_SPLIT_ROWS, 4)
    assert not use_small_rows(cpu_linear.MAX_SPLIT_ROWS + 1, 2)  # prefill-sized: F.linear
    assert not use_small_rows(0, 2)
    assert chunks_for(576, 2) == 2 and chunks_for(577, 2) == 1 and chunks_for(576, 1) == 1


@needs_mkl
def test_switch_routes_small_rows_and_restores(monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6, bias=False))
    model.append(nn.Linear(6, 4).to(torch.bfloat16))  # not float32: left as it is
    x = torch.randn(2, 16)
    expected = model[:3](x)
    assert use_small_rows_linear(model, num_threads=2) == 2
    assert [type(m) for m in model] == [SmallRowsLinear, nn.ReLU, SmallRowsLinear, nn.Linear]
    assert model[0].num_threads == 2 and chunks_for(model[0].out_features, 2) == 2
    calls = []
    real = cpu_linear.small_rows_linear
    monkeypatch.setattr(cpu_linear, "small_rows_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.testing.assert_close(model[:3](x), expected, rtol=1e-5, atol=1e-6)
    assert calls == [(2, 16), (2, 8)]
    model[:3](torch.randn(cpu_linear.MAX_SPLIT_ROWS, 16))  # a batched decode step: split too
    assert len(calls) == 4
    model[:3](torch.randn(cpu_linear.MAX_SPLIT_ROWS + 1, 16))  # many rows: F.linear
    assert len(calls) == 4
    assert restore_linear(model) == 2 and type(model[0]) is nn.Linear and "num_threads" not in vars(model[0])


@needs_mkl
def test_quantization_still_finds_switched_layers() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    model.append(nn.modules.linear.NonDynamicallyQuantizableLinear(16, 8))  # a subclass with its own role
    use_small_rows_linear(model, num_threads=2)
    quantize_model(model, "int8")
    assert [type(m) for m in model][:2] == [Int8DynamicLinear, Int8DynamicLinear]
    assert type(model[2]) is nn.modules.linear.NonDynamicallyQuantizableLinear  # neither switched nor quantized
    assert use_small_rows_linear(model, num_threads=2) == 0  # quantized layers are not switched


@needs_mkl
def test_engine_switches_cpu_layers_and_matches_f_linear() -> None:
    """The engine's CPU model runs the switched layers; its greedy tokens equal those of the same
    engine with plain F.linear (a handful of float32 ulps never moves this argmax)."""
    from tests.engine.helpers import tiny_pair
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.sampling_params import SamplingParams

    loaded, _ = tiny_pair("llama")
    llm = LLM(loaded=loaded, num_threads=2)
    assert sum(type(m) is SmallRowsLinear for m in loaded.model.modules()) > 0
    prompts = [[1, 5, 9, 13], [2, 7, 3], [4, 4, 8, 15, 16]]
    params = SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True)
    switched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    restore_linear(loaded.model)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert switched == plain


@needs_mkl
def test_a_layer_resized_after_the_switch_still_runs() -> None:
    """A switched layer whose weight was replaced by an uneven shard (tensor parallelism) falls back
    to one chunk instead of failing."""
    layer = nn.Linear(16, 8)
    use_small_rows_linear(layer, num_threads=2)
    layer.weight = nn.Parameter(torch.randn(3, 16))  # 3 rows: not divisible by the 2 chunks
    layer.bias = nn.Parameter(torch.randn(3))
    x = torch.randn(1, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_hf_baseline_runs_hf_layers_after_a_tokenmill_engine() -> None:
    """The benchmark's HF `generate` baseline gets the model back as HF made it, after a tokenmill
    engine on the same model switched its layers."""
    from tests.engine.helpers import tiny_pair
    from tokenmill.bench import backends
    from tokenmill.bench.workload import BenchRequest
    from tokenmill.engine.llm import LLM

    loaded, _ = tiny_pair("llama")
    LLM(loaded=loaded, num_threads=2)
    assert any(type(m) is SmallRowsLinear for m in loaded.model.modules())
    result = backends.run_hf_generate(loaded.model, [BenchRequest((1, 2, 3), None, 4)], backends.DecodeSpec("greedy"),
                                      batch_size=1, warmup=False)
    assert result.num_output_tokens == 4
    assert not any(type(m) is SmallRowsLinear for m in loaded.model.modules())
