"""Every generate() call of HF's "How to generate text" walkthrough, through the engine, against HF.

Greedy and beam search must be token-identical (every returned beam, in order, with its score);
sampling must draw from HF's processed distribution (chi-square on many first tokens).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.chi_square import chisquare_p_value
from tests.engine.helpers import default_loaded, random_prompts, tiny_pair
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams

PROMPTS = ["I enjoy walking with my cute dog", "The history of the printing press"]
NEW = 24  # max_length = prompt + NEW


@pytest.fixture(scope="module")
def setup():
    loaded = default_loaded()
    ref = AutoModelForCausalLM.from_pretrained(loaded.model_path, attn_implementation="sdpa", local_files_only=True)
    llm = LLM(loaded=loaded, max_num_seqs=1024, max_model_len=512, num_kv_blocks=600)
    return loaded, ref.eval(), llm


def hf_generate(ref, prompt_ids: list[int], **kwargs):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        return ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )


WALKTHROUGH_DETERMINISTIC = {
    "greedy": dict(),
    "beam5_early": dict(num_beams=5, early_stopping=True),
    "beam5_ngram2": dict(num_beams=5, early_stopping=True, no_repeat_ngram_size=2),
    "beam5_return5": dict(num_beams=5, early_stopping=True, no_repeat_ngram_size=2, num_return_sequences=5),
}


@pytest.mark.parametrize("name", list(WALKTHROUGH_DETERMINISTIC))
def test_walkthrough_deterministic_matches_hf(setup, name) -> None:
    loaded, ref, llm = setup
    kwargs = WALKTHROUGH_DETERMINISTIC[name]
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_length=len(p) + NEW, **kwargs) for p in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        hf = hf_generate(ref, prompt, max_length=len(prompt) + NEW, do_sample=False, **kwargs)
        want = [row[len(prompt) :].tolist() for row in hf.sequences]
        # HF pads finished beams with pad_token_id (= eos here) to the longest; compare without it.
        got = [c.token_ids for c in out.outputs]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g == w[: len(g)] and all(t == ref.generation_config.pad_token_id for t in w[len(g) :])
        if "num_beams" in kwargs:
            scores = torch.tensor([c.score for c in out.outputs])
            assert torch.allclose(scores, hf.sequences_scores.float(), atol=1e-4)


def hf_first_token_probs(ref, prompt_ids: list[int], temperature=1.0, top_k=50, top_p=1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = ref(torch.tensor([prompt_ids])).logits[:, -1].float()
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.tensor([prompt_ids]), logits)
    return scores.softmax(-1)[0]


WALKTHROUGH_SAMPLING = {
    "top_k_0": dict(top_k=0),
    "temperature_0.7": dict(top_k=0, temperature=0.7),
    "top_k_50": dict(top_k=50),
    "top_p_0.92": dict(top_p=0.92, top_k=0),
    "top_p_0.95_top_k_50": dict(top_p=0.95, top_k=50),
}


@pytest.mark.parametrize("name", list(WALKTHROUGH_SAMPLING))
def test_walkthrough_sampling_follows_hf_distribution(setup, name) -> None:
    loaded, ref, llm = setup
    kwargs = WALKTHROUGH_SAMPLING[name]
    prompt = loaded.tokenizer.encode(PROMPTS[0])
    n = 400
    params = SamplingParams(do_sample=True, max_new_tokens=1, num_return_sequences=n, seed=7, logprobs=5, **kwargs)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    tokens = torch.tensor([c.token_ids[0] for c in out.outputs])
    probs = hf_first_token_probs(ref, prompt, **kwargs)
    # The reported distribution is HF's processed one.
    entry = out.outputs[0].logprobs[0]
    for token, lp in entry.items():
        assert lp == pytest.approx(probs[token].log().item(), abs=1e-3)
    # Every sampled token is allowed by HF's filters.
    assert bool((probs[tokens] > 0).all())
    # Chi-square over the tokens HF expects at least 5 times, the rest lumped together.
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    p = chisquare_p_value(obs, exp)
    assert p > 1e-4, f"first-token distribution differs from HF's (p={p:.2e})"


def test_walkthrough_sampling_return3_runs_whole_sequences(setup) -> None:
    loaded, _, llm = setup
    prompt = loaded.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(
        do_sample=True, max_length=len(prompt) + NEW, top_k=50, top_p=0.95, num_return_sequences=3, seed=11
    )
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(1 <= len(c.token_ids) <= NEW for c in out.outputs)
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beams_batched_with_others_and_preempted(arch) -> None:
    """Beam and n-gram requests mixed with unrelated greedy/sampling ones, under preemption, equal HF."""
    loaded, ref = tiny_pair(arch)
    prompts = random_prompts([12, 30, 7, 21], seed=21)
    beam_kwargs = [
        dict(num_beams=4, num_return_sequences=2, length_penalty=0.8),
        dict(num_beams=3, no_repeat_ngram_size=2, early_stopping=True),
    ]
    eos = 17
    params = [
        SamplingParams(max_new_tokens=16, eos_token_id=eos, **beam_kwargs[0]),
        SamplingParams(max_new_tokens=16, eos_token_id=eos, **beam_kwargs[1]),
        SamplingParams(max_new_tokens=20, ignore_eos=True, no_repeat_ngram_size=3),
        SamplingParams(max_new_tokens=20, do_sample=True, seed=5, ignore_eos=True),
    ]
    calm = LLM(loaded=loaded).generate(prompts, params, use_tqdm=False)
    tight = LLM(loaded=loaded, num_kv_blocks=20, block_size=8)
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions_total > 0
    for a, b in zip(calm, squeezed):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    bm = tight.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    for prompt, kwargs, out in zip(prompts[:2], beam_kwargs, calm[:2]):
        hf = hf_generate(ref, prompt, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0, **kwargs)
        want = [row[len(prompt) :].tolist() for row in hf.sequences]
        got = [c.token_ids for c in out.outputs]
        for g, w in zip(got, want):
            assert g == w[: len(g)]
        assert torch.allclose(torch.tensor([c.score for c in out.outputs]), hf.sequences_scores.float(), atol=1e-4)
    ngram_want = hf_generate(ref, prompts[2], max_new_tokens=20, do_sample=False, no_repeat_ngram_size=3)
    assert calm[2].outputs[0].token_ids == ngram_want.sequences[0, len(prompts[2]) :].tolist()


def test_generation_config_supplies_defaults(setup) -> None:
    loaded, _, llm = setup
    config = GenerationConfig(max_new_tokens=5, do_sample=True, top_k=10, temperature=0.5, eos_token_id=[2, 0])
    params = SamplingParams.from_generation_config(config, seed=3)
    assert (params.max_new_tokens, params.do_sample, params.top_k, params.temperature) == (5, True, 10, 0.5)
    assert params.eos_token_id == (2, 0) and params.seed == 3
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_generation_config(config, not_a_field=1)
    out = llm.generate([loaded.tokenizer.encode("Hi")], params, use_tqdm=False)[0]
    assert 1 <= len(out.outputs[0].token_ids) <= 5
