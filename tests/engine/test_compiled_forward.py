"""The compiled decode forward: token-identical to eager, one graph per bucket, padding inert.

Most cases compile with the `aot_eager` backend (dynamo's full-graph capture, the attention custom
op and the bucket logic, in seconds); one case runs inductor, the backend the engine uses.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.engine.helpers import random_prompts, tiny_pair
from tokenmill.engine import compiled_forward
from tokenmill.engine.compiled_forward import decode_buckets, model_forward
from tokenmill.engine.llm import LLM
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence

MAX_NEW = 12


@pytest.fixture
def backend(request, monkeypatch):
    """Compile with the parametrized backend, from a clean dynamo state."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model_forward, backend=request.param, fullgraph=True)
    monkeypatch.setattr(compiled_forward, "_compiled_forward", compiled)
    yield request.param
    torch._dynamo.reset()


def greedy(loaded, prompts, **kwargs) -> list[list[int]]:
    llm = LLM(loaded=loaded, max_num_seqs=4, num_kv_blocks=64, block_size=8, max_model_len=128, **kwargs)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outs]


def test_decode_buckets() -> None:
    assert decode_buckets(1) == [1]
    assert decode_buckets(2) == [2]
    assert decode_buckets(6) == [2, 4, 6]
    assert decode_buckets(64) == [2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(300)[-4:] == [256, 272, 288, 300]
    assert decode_buckets(6, single=True) == [1, 2, 4, 6]  # the CPU's: one row apart


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_compiled_greedy_matches_eager(arch: str, backend: str) -> None:
    loaded, _ = tiny_pair(arch)
    # 7 prompts at max_num_seqs=4, all of one output length: decode steps of 4, then 3 sequences
    # (bucket 4 for both).
    prompts = random_prompts([5, 17, 9, 30, 3, 12, 21], seed=3)
    want = greedy(loaded, prompts, enforce_eager=True)
    assert counters["stats"]["unique_graphs"] == 0
    got = greedy(loaded, prompts, enforce_eager=False)
    assert got == want
    # One dynamic-batch graph for every bucket, never one per step.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("backend", ["inductor"], indirect=True)
def test_inductor_greedy_matches_eager_and_writes_the_caches_in_place(backend: str) -> None:
    """Token-identical to eager, and the attention op's caches are not copied: the op mutates
    them, and were inductor to functionalize that into a copy of each cache (which its reinplacing
    pass avoids), every compiled step would copy the whole KV cache, per layer, on the GPU too."""
    loaded, _ = tiny_pair("llama")
    prompts = random_prompts([6, 11, 4, 9], seed=4)  # 4 prompts finish together: bucket 4 only
    want = greedy(loaded, prompts, enforce_eager=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = greedy(loaded, prompts, enforce_eager=False)
    assert got == want
    assert counters["stats"]["unique_graphs"] == 1
    events = prof.events()
    # The op's calls with real tensors (tracing calls it with fake ones, recorded without shapes).
    cache_shapes = {tuple(e.input_shapes[3]) for e in events
                    if e.name == "tokenmill::paged_attention_step" and e.input_shapes and e.input_shapes[3]}
    assert len(cache_shapes) == 1  # the compiled steps ran through the op
    cache_shape = list(cache_shapes.pop())  # k_cache [num_blocks, block_size, Hkv, D]
    assert len(cache_shape) == 4 and cache_shape[0] == 64  # num_kv_blocks
    copies = [e.name for e in events
              if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy") and cache_shape in e.input_shapes]
    assert not copies


def _decode_batch(num_seqs: int) -> ScheduledBatch:
    seqs = []
    for i in range(num_seqs):
        seq = Sequence(seq_id=i, token_ids=list(range(3 + i, 13 + i)), num_prompt_tokens=10)
        seq.num_computed_tokens = 9
        seq.block_table = [2 * i + 1, 2 * i + 2]  # block 0 is read by padding rows, written by none
        seqs.append(seq)
    return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * num_seqs)


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_padding_rows_never_write_the_cache_nor_change_real_rows(backend: str) -> None:
    loaded, _ = tiny_pair("llama")
    runners = [
        ModelRunner(loaded.model, num_blocks=16, block_size=8, max_num_seqs=8, max_model_len=64, enforce_eager=eager)
        for eager in (True, False)
    ]
    torch.manual_seed(0)
    for cache in runners[0].k_caches + runners[0].v_caches:
        cache.normal_()
    for src, dst in zip(runners[0].k_caches + runners[0].v_caches, runners[1].k_caches + runners[1].v_caches):
        dst.copy_(src)
    before = [c.clone() for c in runners[1].k_caches]
    batch = _decode_batch(3)
    assert runners[1].prepare_inputs(batch)[1] == 4  # 3 sequences run padded to the bucket of 4
    eager = runners[0].run(_decode_batch(3))
    compiled = runners[1].run(_decode_batch(3))
    assert compiled.shape == eager.shape == (3, loaded.model.config.vocab_size)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for old, new, ref in zip(before, runners[1].k_caches, runners[0].k_caches):
        changed = (old != new).flatten(1).any(1).nonzero().flatten().tolist()  # blocks written
        assert changed == [2, 4, 6]  # each real sequence's second block (slot 9 of 16), nothing else
        torch.testing.assert_close(new, ref)


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_runners_with_other_cache_sizes_share_the_compiled_graph(backend: str) -> None:
    """The KV-sizing probe, the engine and a second engine of one model hold caches and block
    tables of other sizes: one compiled graph serves them all (a compile of a large model takes minutes)."""
    loaded, _ = tiny_pair("llama")
    # Block-table widths 8, 8 and 16: the probe's is capped by its token budget, the engine's by
    # max_model_len.
    for num_blocks, max_model_len in ((16, 64), (24, 64), (40, 128)):
        runner = ModelRunner(loaded.model, num_blocks=num_blocks, block_size=8, max_num_seqs=8,
                             max_model_len=max_model_len, enforce_eager=False)
        for num_seqs in (3, 1):  # buckets 4 and (on the CPU) 1
            assert runner.run(_decode_batch(num_seqs)).shape == (num_seqs, loaded.model.config.vocab_size)
    assert runner.prepare_inputs(_decode_batch(1))[1] == 1
    assert runner.prepare_inputs(_decode_batch(2))[1] == 2
    assert counters["stats"]["unique_graphs"] == 2  # the dynamic batch's and one row's, for all three


def test_enforce_eager_flag_and_device_default() -> None:
    import argparse

    from tokenmill.engine.model_runner import resolve_enforce_eager
    from tokenmill.serve.cli_args import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--enforce-eager"]))["enforce_eager"] is True
    assert engine_kwargs(parser.parse_args([]))["enforce_eager"] is None
    assert resolve_enforce_eager(None, torch.device("cpu")) is True
    assert resolve_enforce_eager(None, torch.device("cuda")) is False
    assert resolve_enforce_eager(False, torch.device("cpu")) is False


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_weights_run_through_the_compiled_forward(backend: str, mode: str) -> None:
    """int4 traces; int8's packed fbgemm weights cannot, so each int8 layer is one opaque op
    (`tokenmill::int8_linear`) in the graph, running the eager layer's code."""
    from tokenmill.engine import quantization

    loaded, _ = tiny_pair("llama")
    quantization.quantize_model(loaded.model, mode)
    prompts = random_prompts([5, 17, 9], seed=4)
    want = greedy(loaded, prompts, enforce_eager=True, quantization=mode)
    op_calls = []

    class CountingLayers(dict):  # the op finds its layer here
        def __getitem__(self, layer_id):
            op_calls.append(layer_id)
            return super().__getitem__(layer_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantization, "_INT8_LAYERS", CountingLayers(quantization._INT8_LAYERS))
        assert greedy(loaded, prompts, enforce_eager=False, quantization=mode) == want
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    num_int8 = sum(isinstance(m, quantization.Int8DynamicLinear) for m in loaded.model.modules())
    assert len(set(op_calls)) == num_int8 and (num_int8 > 0) == (mode == "int8")  # every int8 layer, through the op


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_compiled_cpu_step_plans_attention_once_and_splits_small_rows(backend: str, monkeypatch) -> None:
    """On the CPU a compiled step's layers share one attention plan (as an eager step's do), and its
    linear layers make the small-rows choice when the graph runs (engine/cpu_linear.py)."""
    from tokenmill.engine import cpu_linear
    from tokenmill.kernels import attention_reference

    # The switch is made only where MKL is torch's BLAS (a speed choice); the mechanism runs on any.
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    loaded, _ = tiny_pair("llama")
    assert cpu_linear.use_small_rows_linear(loaded.model, num_threads=2) > 0
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=8, max_num_seqs=8, max_model_len=64,
                         enforce_eager=False)
    eager = ModelRunner(loaded.model, num_blocks=16, block_size=8, max_num_seqs=8, max_model_len=64)
    runner.run(_decode_batch(3))  # compile
    plans, rows = [], []
    real_plan, real_linear = attention_reference.plan_reference, cpu_linear.small_rows_linear
    monkeypatch.setattr(attention_reference, "plan_reference", lambda *a, **k: plans.append(1) or real_plan(*a, **k))
    monkeypatch.setattr(cpu_linear, "small_rows_linear", lambda x, *a: rows.append(x.shape) or real_linear(x, *a))
    got = runner.run(_decode_batch(3))
    assert len(plans) == 1  # one plan for every layer of the step
    num_linear = sum(type(m) is cpu_linear.SmallRowsLinear for m in loaded.model.modules())
    assert len(rows) == num_linear and all(shape[-2] == 4 for shape in rows)  # the bucket's 4 rows, split
    torch.testing.assert_close(got, eager.run(_decode_batch(3)), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
