"""SamplingParams.prompt_logprobs: HF's log_softmax at every prompt position, inside the batch."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import default_loaded, random_prompts, tiny_pair
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair("llama")


def hf_prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is log_softmax of the logits at position p (scores token p + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return logits[:-1].log_softmax(-1)


def check_against(ref: torch.Tensor, prompt: list[int], scores, k: int, atol: float) -> None:
    """Every value equals HF's; the alternatives are the k best (up to near-ties); ranks agree."""
    assert scores is not None
    assert len(scores.logprobs) == len(prompt) and scores.logprobs[0] is None and scores.ranks[0] is None
    for p in range(len(prompt) - 1):
        entry, tok, row = scores.logprobs[p + 1], prompt[p + 1], ref[p]
        assert abs(entry[tok] - row[tok].item()) < atol, (p, entry[tok], row[tok].item())
        for t, v in entry.items():
            assert abs(v - row[t].item()) < atol
        alternatives = set(entry) - {tok}
        assert len(alternatives) in (k - 1, k) if k else not alternatives
        if k:
            kth_best = row.topk(k).values[-1].item()
            assert all(row[t].item() >= kth_best - atol for t in alternatives)
        rank = scores.ranks[p + 1]
        assert int((row > row[tok] + atol).sum()) + 1 <= rank <= int((row > row[tok] - atol).sum()) + 1


def test_tiny_model_matches_hf_with_chunking_and_neighbours(tiny) -> None:
    loaded, ref = tiny
    # A small token budget chunks the long prompts over several steps, beside other requests.
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=48)
    prompts = random_prompts([100, 7, 61, 1, 33], seed=3)
    asks = [3, None, 0, 2, None]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=k) for k in asks]
    outs = llm.generate(prompts, params, use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)
    for prompt, k, out, alone in zip(prompts, asks, outs, plain):
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids  # generation unchanged
        if k is None:
            assert out.prompt_logprobs is None
            continue
        check_against(hf_prompt_logprobs(ref, prompt), prompt, out.prompt_logprobs, k, atol=1e-4)
        assert len(out.prompt_logprobs.logprobs[-1] if len(prompt) > 1 else {}) <= k + 1


def test_only_asking_requests_pay_for_prompt_rows(tiny) -> None:
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    runner = llm.llm_engine.runner
    shapes = []
    original = runner.run

    def spy(batch):
        logits = original(batch)
        shapes.append(logits.shape[0])
        return logits

    runner.run = spy
    prompts = random_prompts([40, 30, 20], seed=4)
    params = [SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=p) for p in (None, 1, None)]
    llm.generate(prompts, params, use_tqdm=False)
    assert shapes[0] == 3 + 29  # three sampled rows + the asking prompt's 29 scoring positions
    assert shapes[1:] == [3]
    llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)
    assert shapes[2] == 3


def test_prefix_cache_hit_still_scores_every_position(tiny) -> None:
    loaded, ref = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64, block_size=8)
    prompt = random_prompts([50], seed=5)[0]
    llm.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)  # warms the cache
    hits = llm.llm_engine.block_manager.num_cache_hits
    out = llm.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert llm.llm_engine.block_manager.num_cache_hits == hits  # the cache is skipped for this request
    check_against(hf_prompt_logprobs(ref, prompt), prompt, out.prompt_logprobs, 1, atol=1e-4)
    again = llm.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # others still hit the cache


def test_preempted_request_keeps_its_scores(tiny) -> None:
    loaded, ref = tiny
    # Few blocks: the long requests preempt each other and recompute their prompts.
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=14, block_size=8, max_num_batched_tokens=32)
    prompts = random_prompts([40, 40, 40], seed=6)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions_total > 0
    for prompt, out in zip(prompts, outs):
        check_against(hf_prompt_logprobs(ref, prompt), prompt, out.prompt_logprobs, 2, atol=1e-4)


def test_beams_and_samples_get_prompt_logprobs(tiny) -> None:
    loaded, ref = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    prompt = random_prompts([25], seed=7)[0]
    expected = hf_prompt_logprobs(ref, prompt)
    for params in (
        SamplingParams(max_new_tokens=5, num_beams=3, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(max_new_tokens=5, do_sample=True, num_return_sequences=3, ignore_eos=True, prompt_logprobs=1),
    ):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        check_against(expected, prompt, out.prompt_logprobs, 1, atol=1e-4)


def test_bad_prompt_logprobs_rejected() -> None:
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_default_model_matches_hf() -> None:
    loaded = default_loaded()
    from transformers import AutoModelForCausalLM

    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=40)
    text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
    prompt = loaded.tokenizer.encode(text)
    out = llm.generate([prompt], SamplingParams(max_new_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    # The same weights through HF's own attention.
    ref = AutoModelForCausalLM.from_config(loaded.model.config, attn_implementation="sdpa").eval()
    ref.load_state_dict(loaded.model.state_dict())
    check_against(hf_prompt_logprobs(ref, prompt), prompt, out.prompt_logprobs, 5, atol=2e-3)
