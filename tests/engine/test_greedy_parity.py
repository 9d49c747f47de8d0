"""Greedy decoding through the engine is token-identical to transformers' generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.helpers import default_loaded, hf_greedy, random_prompts, tiny_pair
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("variant", ["default", "preemption", "chunked_prefill"])
def test_greedy_matches_hf_on_cuda(arch: str, variant: str) -> None:
    """The same parity on the GPU: Triton attention, sampling and penalty kernels in the loop."""
    loaded, ref = tiny_pair(arch, device="cuda")
    prompts = random_prompts(LENGTHS, seed=1)
    prompts += [prompts[3][:32] + p for p in random_prompts([7, 9], seed=2)]
    llm = make_llm(loaded, **ENGINE_VARIANTS[variant])
    assert llm.llm_engine.runner.device.type == "cuda"
    got = run_greedy(llm, prompts)
    want = [hf_greedy(ref, p, MAX_NEW) for p in prompts]
    assert got == want
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
