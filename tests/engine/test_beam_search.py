"""engine/beam_search.py against transformers' generate(num_beams=...).

A dense driver runs the HF model step by step with full recompute (no KV cache), feeds the last-position
logits of the live beams to `BeamSearch`, and builds the next beams from its parents and tokens, as the
engine does with forked KV blocks. generate() runs with `use_cache=False`, so both sides see the same
logits bit for bit (the driver computes the first step on `num_beams` copies of the prompt, as HF does),
and sequences, order and `sequences_scores` must match exactly, beam sampling included (same seed, same
torch RNG stream). One test feeds the prompt once, as the engine does, and allows float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.sampling_params import SamplingParams

PROMPTS = ([5, 17, 42, 8, 99], [3, 141, 77, 12, 60, 250, 31])


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.2,  # sharper distributions than the default 0.02: fewer near-ties
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None,  # no default EOS: cases choose theirs (or none)
    )
    return GPT2LMHeadModel(config).eval()


def liked_token(model, prompt: list[int], rank: int) -> int:
    """The token the model ranks `rank`-th after the prompt: as EOS it ends some beams at once."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    return int(logits.topk(rank + 1).indices[rank])


def greedy_token(model, prompt: list[int], step: int) -> int:
    """The greedy continuation's token at `step`: as EOS, beams near the greedy path end early."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(step + 1):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-1]


@torch.no_grad()
def run_beam_search(model, prompt, params, eos, max_new_tokens, generator=None, hf_first_batch=True):
    """Drive BeamSearch with full-recompute logits; returns (hypotheses, number of steps)."""
    search = BeamSearch(params, prompt, eos, max_new_tokens, generator)
    live: list[list[int]] = [[]]
    num_steps = 0
    while True:
        if num_steps == 0 and hf_first_batch:
            batch = [prompt] * params.num_beams  # as generate(); only the first row is sent
            logits = model(torch.tensor(batch, device=model.device), logits_to_keep=1).logits[:1, -1, :].float()
        else:
            batch = [prompt + ids for ids in live]
            logits = model(torch.tensor(batch, device=model.device), logits_to_keep=1).logits[:, -1, :].float()
        assert logits.shape[0] == search.num_live_beams == len(live)
        step = search.step(logits)
        num_steps += 1
        if step.done:
            break
        assert len(step.parent_indices) == len(step.next_token_ids) == params.num_beams
        assert all(0 <= p < len(live) for p in step.parent_indices)
        live = [live[p] + [t] for p, t in zip(step.parent_indices, step.next_token_ids)]
        assert live == search.running_token_ids
    return search.finalize(), num_steps


def hf_generate(model, prompt, params: SamplingParams, eos, max_new_tokens, seed=None):
    """generate()'s returned sequences (generated part only) and sequences_scores."""
    kwargs = dict(
        num_beams=params.num_beams,
        num_return_sequences=params.num_return_sequences,
        early_stopping=params.early_stopping,
        length_penalty=params.length_penalty,
        do_sample=params.do_sample,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        min_new_tokens=params.min_new_tokens,
    )
    if params.bad_words_ids:
        kwargs["bad_words_ids"] = [list(w) for w in params.bad_words_ids]
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if eos:
        kwargs["eos_token_id"] = list(eos)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
        use_cache=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    seqs = [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return seqs, out.sequences_scores.tolist()


def assert_matches_generate(model, prompt, params, eos, max_new_tokens, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    hyps, _ = run_beam_search(model, prompt, params, eos, max_new_tokens, generator)
    hf_seqs, hf_scores = hf_generate(model, prompt, params, eos, max_new_tokens, seed)
    assert len(hyps) == params.num_return_sequences == len(hf_seqs)
    assert [h.token_ids for h in hyps] == hf_seqs
    assert [h.score for h in hyps] == hf_scores  # bit for bit: same logits, same ops
    for h in hyps:
        assert h.finished
        assert len(h.token_ids) <= max_new_tokens
        assert h.cumulative_logprob == pytest.approx(h.score * len(h.token_ids) ** params.length_penalty, rel=1e-5)
        if len(h.token_ids) < max_new_tokens:
            assert h.token_ids[-1] in eos  # ended by EOS, which HF keeps
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    return hyps


LLAMA_CASES = {  # name: (prompt index, SamplingParams fields)
    "early_stopping_true": (1, dict(num_beams=5, early_stopping=True)),
    "early_stopping_true_prompt0": (0, dict(num_beams=5, early_stopping=True)),
    "no_repeat_ngram": (1, dict(num_beams=5, early_stopping=True, no_repeat_ngram_size=2)),
    "return_5": (1, dict(num_beams=5, num_return_sequences=5)),
    "never": (1, dict(num_beams=4, early_stopping="never", num_return_sequences=2)),
    "never_negative_length_penalty": (0, dict(num_beams=4, early_stopping="never", length_penalty=-1.0)),
    "length_penalty_2": (1, dict(num_beams=4, length_penalty=2.0, num_return_sequences=3)),
    "length_penalty_half": (0, dict(num_beams=3, length_penalty=0.5, early_stopping=True)),
    "min_new_tokens": (1, dict(num_beams=3, min_new_tokens=4, num_return_sequences=3)),
    "penalty_and_bad_words": (1, dict(num_beams=3, repetition_penalty=1.5, bad_words_ids=((7,), (40, 41)))),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_beam_search_matches_generate(llama, case):
    prompt_index, fields = LLAMA_CASES[case]
    prompt = list(PROMPTS[prompt_index])
    eos = (greedy_token(llama, prompt, step=2),)
    params = SamplingParams(max_new_tokens=8, eos_token_id=eos, **fields)
    hyps = assert_matches_generate(llama, prompt, params, eos, max_new_tokens=8)
    if case == "min_new_tokens":
        assert all(len(h.token_ids) >= 4 for h in hyps)
    if case == "return_5":
        assert len({len(h.token_ids) for h in hyps}) >= 2  # some ended by EOS, some by max length


def test_two_eos_ids_keep_more_candidates(llama):
    prompt = list(PROMPTS[1])
    eos = (liked_token(llama, prompt, rank=1), liked_token(llama, prompt, rank=4))
    params = SamplingParams(max_new_tokens=6, eos_token_id=eos, num_beams=3, num_return_sequences=3)
    assert BeamSearch(params, prompt, eos, 6).num_candidates == 9  # (1 + len(eos)) * num_beams
    assert_matches_generate(llama, prompt, params, eos, max_new_tokens=6)


@pytest.mark.parametrize(
    "kwargs,with_eos",
    [(dict(num_beams=4, num_return_sequences=3), True), (dict(num_beams=3, early_stopping=True), False)],
    ids=["eos", "no_eos"],
)
def test_gpt2_beam_search_matches_generate(gpt2, kwargs, with_eos):
    prompt = [9, 200, 31, 77]
    eos = (liked_token(gpt2, prompt, rank=1),) if with_eos else ()
    params = SamplingParams(max_new_tokens=7, eos_token_id=eos or None, **kwargs)
    hyps = assert_matches_generate(gpt2, prompt, params, eos, max_new_tokens=7)
    if not with_eos:
        assert all(len(h.token_ids) == 7 for h in hyps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_sampling_matches_generate_with_the_same_seed(llama, gpt2, seed):
    prompt = list(PROMPTS[0])
    eos = (liked_token(llama, prompt, rank=2),)
    params = SamplingParams(
        max_new_tokens=6, eos_token_id=eos, num_beams=3, num_return_sequences=2,
        do_sample=True, top_k=20, temperature=1.5,
    )
    assert_matches_generate(llama, prompt, params, eos, max_new_tokens=6, seed=seed)
    params = SamplingParams(max_new_tokens=5, num_beams=2, do_sample=True, top_k=0, top_p=0.9)
    assert_matches_generate(gpt2, [9, 200, 31, 77], params, (), max_new_tokens=5, seed=seed)


def test_beam_sampling_draws_differ_across_seeds(llama):
    prompt = list(PROMPTS[1])
    params = SamplingParams(max_new_tokens=3, num_beams=2, do_sample=True, top_k=0, temperature=2.0)
    results = set()
    for seed in range(6):
        hyps, _ = run_beam_search(llama, prompt, params, (), 3, torch.Generator().manual_seed(seed))
        results.add(tuple(tuple(h.token_ids) for h in hyps))
    assert len(results) > 1


def test_engine_style_first_step_with_one_prompt_row(llama):
    """The engine sends the prompt's logits once; results equal generate() up to float rounding."""
    prompt = list(PROMPTS[1])
    eos = (liked_token(llama, prompt, rank=2),)
    params = SamplingParams(max_new_tokens=8, eos_token_id=eos, num_beams=4, num_return_sequences=4)
    hyps, _ = run_beam_search(llama, prompt, params, eos, 8, hf_first_batch=False)
    hf_seqs, hf_scores = hf_generate(llama, prompt, params, eos, 8)
    assert [h.token_ids for h in hyps] == hf_seqs
    assert [h.score for h in hyps] == pytest.approx(hf_scores, rel=1e-5)


def test_step_interface_errors_and_first_step_parents(llama):
    prompt = list(PROMPTS[0])
    params = SamplingParams(max_new_tokens=1, num_beams=3)
    search = BeamSearch(params, prompt, (), max_new_tokens=1)
    assert search.num_live_beams == 1
    with pytest.raises(ValueError, match="one row per live beam"):
        search.step(torch.zeros(2, 300))
    with pytest.raises(RuntimeError, match="before any step"):
        search.finalize()
    with torch.no_grad():
        logits = llama(torch.tensor([prompt])).logits[:, -1, :]
    step = search.step(logits)
    assert step.done and step.parent_indices == [0, 0, 0]
    assert [len(h.token_ids) for h in search.finalize()] == [1]
    with pytest.raises(RuntimeError, match="finished"):
        search.step(logits)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BeamSearch(params, prompt, (), max_new_tokens=0)
    # The first step also takes num_beams identical prompt rows, as generate() runs them.
    again = BeamSearch(params, prompt, (), max_new_tokens=1)
    again.step(logits.expand(3, -1))
    assert [h.token_ids for h in again.finalize()] == [h.token_ids for h in search.finalize()]


# ------------------------------------------------------------------------------------------ default model
@pytest.fixture(scope="module")
def default_model():
    from tokenmill.engine.model_loader import load_model

    return load_model()


@pytest.mark.slow
def test_default_model_beam_search_matches_generate(default_model):
    """Kept to 3 beams x 3 tokens: the 135M model costs ~1 s of CPU per forward of a few dozen tokens."""
    prompt = default_model.tokenizer("The capital of France is", add_special_tokens=False).input_ids
    eos_id = default_model.generation_config.eos_token_id
    eos = tuple(eos_id) if isinstance(eos_id, (list, tuple)) else (eos_id,)
    params = SamplingParams(
        max_new_tokens=3, eos_token_id=eos, num_beams=3, num_return_sequences=2, early_stopping=True
    )
    assert_matches_generate(default_model.model, prompt, params, eos, max_new_tokens=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_beam_search_on_cuda_matches_generate(llama):
    """CUDA logits through the Triton processors; beam sampling with a CPU generator (as the engine makes it)."""
    model = copy.deepcopy(llama).cuda()
    prompt = list(PROMPTS[1])
    eos = (greedy_token(llama, prompt, step=2),)
    params = SamplingParams(
        max_new_tokens=8, eos_token_id=eos, num_beams=4, num_return_sequences=3, no_repeat_ngram_size=2,
        repetition_penalty=1.2,
    )
    hyps, _ = run_beam_search(model, prompt, params, eos, 8)
    hf_seqs, hf_scores = hf_generate(model, prompt, params, eos, 8)
    assert [h.token_ids for h in hyps] == hf_seqs
    assert [h.score for h in hyps] == pytest.approx(hf_scores, rel=1e-4)
    sampled = params.replace(do_sample=True, top_k=20, temperature=1.3)
    hyps, _ = run_beam_search(model, prompt, sampled, eos, 8, torch.Generator().manual_seed(0))
    assert len(hyps) == 3 and all(h.finished and 0 < len(h.token_ids) <= 8 for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
