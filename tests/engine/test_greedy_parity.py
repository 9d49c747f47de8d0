"""Greedy decoding through the engine is token-identical to transformers' generate()."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.helpers import VOCAB, default_loaded, hf_greedy, random_prompts, tiny_pair
from tests.isolated import CasePool, assert_passed, run_case
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams

LENGTHS = [5, 17, 40, 64, 3, 31]
MAX_NEW = 24


def make_llm(loaded, **kwargs) -> LLM:
    return LLM(loaded=loaded, **kwargs)


def run_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


ENGINE_VARIANTS = {
    "default": dict(),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=16, max_model_len=256),
    "preemption": dict(num_kv_blocks=10, block_size=16),
    "small_blocks": dict(block_size=1, num_kv_blocks=600),
}


# Every engine variant on Llama and GPT-2; Qwen2 and Mistral (sliding window) on two of them.
CASES = [(a, v) for a in ("llama", "gpt2") for v in ENGINE_VARIANTS] + [
    (a, v) for a in ("qwen2", "mistral") for v in ("default", "preemption")
]


@pytest.mark.parametrize("arch,variant", CASES)
def test_tiny_model_greedy_matches_hf(arch: str, variant: str) -> None:
    loaded, ref = tiny_pair(arch)
    prompts = random_prompts(LENGTHS, seed=1)
    # A shared prefix across prompts exercises prefix caching.
    prompts += [prompts[3][:32] + p for p in random_prompts([7, 9], seed=2)]
    llm = make_llm(loaded, **ENGINE_VARIANTS[variant])
    got = run_greedy(llm, prompts)
    want = [hf_greedy(ref, p, MAX_NEW) for p in prompts]
    assert got == want
    engine = llm.llm_engine
    if variant == "preemption":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_cpu_attention_plans_built_once_per_step(monkeypatch) -> None:
    """Every layer of an eager CPU step shares one attention plan (per sliding window): counted
    while the engine still matches HF."""
    from tokenmill.kernels import attention_reference

    built, steps = [], []
    real_plan = attention_reference.plan_reference
    monkeypatch.setattr(attention_reference, "plan_reference", lambda *a, **k: built.append(1) or real_plan(*a, **k))
    loaded, ref = tiny_pair("llama")
    llm = make_llm(loaded)
    real_run = llm.llm_engine.runner.run
    monkeypatch.setattr(llm.llm_engine.runner, "run", lambda batch: steps.append(1) or real_run(batch))
    prompts = random_prompts([5, 17, 40], seed=4)
    assert run_greedy(llm, prompts) == [hf_greedy(ref, p, MAX_NEW) for p in prompts]
    assert loaded.model.config.num_hidden_layers == 2 and steps
    assert len(built) == len(steps)  # not once per layer


def test_prefix_cache_is_hit_on_repeat() -> None:
    loaded, ref = tiny_pair("llama")
    llm = make_llm(loaded)
    prompt = random_prompts([70], seed=3)
    first = run_greedy(llm, prompt)
    hits_before = llm.llm_engine.block_manager.num_cache_hits
    second = run_greedy(llm, prompt)
    assert first == second == [hf_greedy(ref, prompt[0], MAX_NEW)]
    assert llm.llm_engine.block_manager.num_cache_hits - hits_before == 4  # 70 tokens = 4 full blocks of 16


@pytest.fixture(scope="module")
def default_pair():
    loaded = default_loaded()
    ref = AutoModelForCausalLM.from_pretrained(loaded.model_path, attn_implementation="sdpa", local_files_only=True)
    return loaded, ref.eval()


def test_default_model_greedy_matches_hf(default_pair) -> None:
    loaded, ref = default_pair
    tok = loaded.tokenizer
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts[:2]]
    prompts = [tok.encode(t) for t in texts + chats]
    llm = make_llm(loaded, max_num_batched_tokens=64)  # chunked prefill in the mix
    params = SamplingParams(max_new_tokens=20)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        want = hf_greedy(ref, prompt, 20)
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == ("stop" if len(want) < 20 else "length")


# ------------------------------------------------------------------ CUDA, one process per case
# A device-side assert (say, a position past the model's table) kills the CUDA context of its
# process: each CUDA case runs in its own process (tests/isolated.py), all of them at once.
CASE_TARGET = "tests.engine.test_greedy_parity:check_greedy_case"
GPU_ARCHS = ("llama", "qwen2", "mistral", "gpt2")
# GPT-2 with 1024 positions, fewer than max_num_batched_tokens (2048): KV sizing on CUDA must not
# run a forward past the position table.
GPU_MAX_POSITIONS = {"gpt2": 1024}
# Several engines share the GPU at once: each sizes its KV cache from a small share of the memory,
# and captures the decode graphs of 8 sequences at most (3 buckets; the cases hold 8 prompts).
GPU_SHARE = dict(gpu_memory_utilization=0.02, max_num_seqs=8)
GPU_VARIANTS = {
    "prefix_caching": dict(**GPU_SHARE),  # KV cache sized by a profiling forward; shared prefixes
    "chunked_prefill": dict(max_num_batched_tokens=16, max_model_len=256, **GPU_SHARE),
    "preemption": dict(num_kv_blocks=10, block_size=16, max_num_seqs=8),
}
GPU_CASES = [(a, v, "float32") for a in GPU_ARCHS for v in GPU_VARIANTS] + [
    (a, "prefix_caching", "bfloat16") for a in GPU_ARCHS  # bf16 smoke runs
]
GPU_CASE_TIMEOUT_S = 120  # under the gpu-check part's limit, so a hung case is reported as such


def check_greedy_case(arch: str, variant: str, device: str, dtype: str) -> None:
    """One parity case, meant for its own process: float32 must equal HF greedy token for token;
    bfloat16 (a smoke run) must finish every request at its length, in the vocabulary, with no leak."""
    torch_dtype = getattr(torch, dtype)
    loaded, ref = tiny_pair(arch, device=device, dtype=torch_dtype, max_positions=GPU_MAX_POSITIONS.get(arch, 512))
    prompts = random_prompts(LENGTHS, seed=1)
    prompts += [prompts[3][:32] + p for p in random_prompts([7, 9], seed=2)]
    variants = GPU_VARIANTS if device == "cuda" else ENGINE_VARIANTS
    llm = make_llm(loaded, device=device, dtype=dtype, **variants[variant])
    engine = llm.llm_engine
    assert engine.runner.device.type == device, engine.runner.device
    got = run_greedy(llm, prompts)
    if dtype == "float32":
        want = [hf_greedy(ref, p, MAX_NEW) for p in prompts]
        mismatched = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert not mismatched, f"prompts {mismatched} differ from HF greedy: first {got[mismatched[0]]} vs {want[mismatched[0]]}"
    else:
        assert [len(g) for g in got] == [MAX_NEW] * len(prompts)
        assert all(0 <= t < VOCAB for g in got for t in g)
    if variant == "preemption":
        assert engine.scheduler.num_preemptions_total > 0
    if variant == "prefix_caching":
        hits = engine.block_manager.num_cache_hits
        assert run_greedy(llm, prompts[-1:]) == got[-1:]  # the repeat reads its prompt from the cache
        assert engine.block_manager.num_cache_hits > hits
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    print(f"{arch}/{variant}/{dtype} on {device}: {len(prompts)} prompts, {sum(map(len, got))} tokens", flush=True)


def test_isolated_case_runs_on_cpu() -> None:
    """The per-process harness the CUDA cases use, on the CPU: the case passes in its own process."""
    result = run_case(CASE_TARGET, dict(arch="qwen2", variant="preemption", device="cpu", dtype="float32"))
    assert_passed(result)
    assert "qwen2/preemption/float32 on cpu: 8 prompts, 192 tokens" in result.output


@pytest.fixture(scope="module")
def cuda_cases(request):
    """Starts every selected CUDA case at once, each in its own process; tests wait for their own."""
    selected = [
        tuple(item.callspec.params[k] for k in ("arch", "variant", "dtype"))
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_greedy_matches_hf_on_cuda"
    ]
    pool = CasePool(max_workers=min(12, os.cpu_count() or 1))
    for arch, variant, dtype in selected:
        kwargs = dict(arch=arch, variant=variant, device="cuda", dtype=dtype)
        pool.submit((arch, variant, dtype), CASE_TARGET, kwargs, timeout=GPU_CASE_TIMEOUT_S)
    yield pool
    pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch,variant,dtype", GPU_CASES)
def test_greedy_matches_hf_on_cuda(cuda_cases, arch: str, variant: str, dtype: str) -> None:
    """The parity above on the GPU (Triton attention, sampling and penalty kernels in the loop)."""
    assert_passed(cuda_cases.result((arch, variant, dtype)))
