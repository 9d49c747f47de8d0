"""Quantized linear layers (opt-in int8 / int4 on CPU) and the `quantization` engine option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.engine.helpers import hf_greedy, random_prompts, tiny_pair
from tokenmill.engine.config import ModelConfig
from tokenmill.engine.llm import LLM
from tokenmill.engine.quantization import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    check_quantization,
    model_quantization,
    quantize_model,
)
from tokenmill.engine.sampling_params import SamplingParams


def _q4_1_linear(n: int, k: int, bias: bool = False) -> nn.Linear:
    """A linear layer whose weights are exactly representable in GGUF's Q4_1 (d * q + m, 32 per block)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans its full range, as a Q4_1 quantizer leaves it
    d = torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.001
    m = -torch.rand(n, k // 32, 1, generator=g) * 0.1
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_((q * d + m).view(n, k))
    return linear


def test_int4_reproduces_q4_1_weights_exactly() -> None:
    linear = _q4_1_linear(96, 128, bias=True)
    x = torch.randn(5, 3, 128)
    want = linear(x)
    got = Int4WeightOnlyLinear(linear)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_int8_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    x = torch.randn(7, 256)
    want = linear(x)
    got = Int8DynamicLinear(linear)(x)
    assert got.shape == want.shape
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02, rel
    assert not torch.equal(got, want)  # it really ran quantized


def test_int8_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    layer = Int8DynamicLinear(nn.Linear(128, 32))
    x = torch.randn(6, 128)
    x[3] *= 50  # an outlier token: with one scale per call it would coarsen every other row
    batched = layer(x)
    for i in range(6):
        assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1])


@pytest.mark.parametrize("mode,module", [("int8", Int8DynamicLinear), ("int4", Int4WeightOnlyLinear)])
def test_quantize_model_replaces_linears_but_not_embeddings(mode: str, module: type) -> None:
    loaded, _ = tiny_pair("llama")
    model = loaded.model
    num_linear = sum(type(m) is nn.Linear for m in model.modules())
    quantize_model(model, mode)
    assert model_quantization(model) == mode
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    head_quantized = isinstance(model.get_output_embeddings(), module)
    assert head_quantized == (mode == "int8")
    assert sum(isinstance(m, module) for m in model.modules()) == num_linear - (not head_quantized)
    assert model.get_output_embeddings().weight.shape == (model.config.vocab_size, model.config.hidden_size)
    assert quantize_model(model, mode) is model  # idempotent
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8" if mode == "int4" else "int4")


def test_invalid_quantization_values() -> None:
    with pytest.raises(ValueError, match=r"quantization='fp8' is invalid: allowed None, 'int8', 'int4'"):
        ModelConfig(quantization="fp8")
    with pytest.raises(ValueError, match="CPU-only"):
        check_quantization("int4", "cuda")
    with pytest.raises(ValueError, match="num_threads=0 is invalid"):
        ModelConfig(num_threads=0)
    check_quantization(None, "cuda")


def test_engine_rejects_model_quantized_otherwise() -> None:
    loaded, _ = tiny_pair("llama")
    with pytest.raises(ValueError, match="quantization='int8' is invalid for the given model"):
        LLM(loaded=loaded, quantization="int8")


def test_int8_model_passed_in_runs_where_its_weights_are(monkeypatch) -> None:
    """On a machine with CUDA, an int8 model on the CPU passed as `loaded` runs eager there: the
    compiled-forward refusal looks at the weights' device, not at device='auto'."""
    loaded, ref = tiny_pair("llama")
    quantize_model(loaded.model, "int8")
    quantize_model(ref, "int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    llm = LLM(loaded=loaded, quantization="int8")
    prompt = random_prompts([6], seed=1)[0]
    out = llm.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 4)


def test_engine_rejects_quantization_it_cannot_run_before_loading_anything() -> None:
    with pytest.raises(ValueError, match=r"quantization='int4' is invalid with tensor_parallel_size=2: .*allowed None"):
        LLM(model="unused", quantization="int4", tensor_parallel_size=2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_greedy_matches_hf_on_the_same_quantized_model(mode: str) -> None:
    """The engine adds no error of its own: greedy tokens equal HF generate on the quantized weights."""
    loaded, ref = tiny_pair("llama")
    quantize_model(loaded.model, mode)
    quantize_model(ref, mode)
    llm = LLM(loaded=loaded, quantization=mode)
    prompts = random_prompts([5, 23, 40], seed=3)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(ref, p, 16) for p in prompts]


def test_cli_flags_reach_engine_kwargs() -> None:
    from tokenmill.serve import cli
    from tokenmill.serve.cli_args import engine_kwargs

    kwargs = engine_kwargs(cli.build_parser().parse_args(["serve", "--quantization", "int8", "--num-threads", "2"]))
    assert kwargs["quantization"] == "int8" and kwargs["num_threads"] == 2
    defaults = engine_kwargs(cli.build_parser().parse_args(["serve"]))
    assert defaults["quantization"] is None and defaults["num_threads"] is None
    assert defaults["enforce_eager"] is None  # the device decides
    assert engine_kwargs(cli.build_parser().parse_args(["serve", "--compile"]))["enforce_eager"] is False
    assert engine_kwargs(cli.build_parser().parse_args(["serve", "--enforce-eager"]))["enforce_eager"] is True
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--compile", "--enforce-eager"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--quantization", "fp8"])
