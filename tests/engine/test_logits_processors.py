"""engine/logits_processors.py against transformers' own processors and generate()'s processor list."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tokenmill.engine.logits_processors import (
    RowInput,
    apply_processors,
    apply_warpers,
    banned_token_ids,
    sampling_tensors,
    uses_extra_warpers,
)
from tokenmill.engine.sampling_params import SamplingParams

VOCAB = 96


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same -inf pattern, finite values equal up to float32 rounding."""
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-6)


def history(rng: random.Random, length: int, alphabet: int = 6) -> list[int]:
    # A small alphabet makes repeated tokens and n-grams likely.
    return [rng.randrange(alphabet) for _ in range(length)]


def random_logits(num_rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=g) * 3  # [num_rows, vocab]


def hf_row(processor, token_ids: list[int], logits_row: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([token_ids]), logits_row[None].clone())[0]


# ------------------------------------------------------------------------------------------ processors
def test_repetition_penalty_matches_hf_per_row():
    rng = random.Random(0)
    penalties = [1.3, 0.7, 1.0, 2.0, 1.1]
    lengths = [5, 9, 4, 1, 12]
    rows = [
        RowInput(SamplingParams(repetition_penalty=p), history(rng, n), num_prompt_tokens=min(3, n))
        for p, n in zip(penalties, lengths)
    ]
    logits = random_logits(len(rows), seed=1)
    expected = torch.stack(
        [
            hf_row(RepetitionPenaltyLogitsProcessor(p), list(r.token_ids), logits[i]) if p != 1.0 else logits[i]
            for i, (p, r) in enumerate(zip(penalties, rows))
        ]
    )
    out = apply_processors(logits.clone(), rows)
    assert_same(out, expected)
    assert not torch.equal(out[0], logits[0])  # the penalty did something


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 7])
def test_no_repeat_ngram_matches_hf(ngram_size):
    rng = random.Random(ngram_size)
    histories = [history(rng, n, alphabet=4) for n in (3, 6, 10)]  # length 3 < 7: nothing to ban for n=7
    base = history(rng, 8, alphabet=4)
    histories.append(base + base[: ngram_size - 1])  # ends with an (n-1)-gram seen before: bans base[n-1]
    rows = [RowInput(SamplingParams(no_repeat_ngram_size=ngram_size), h, num_prompt_tokens=2) for h in histories]
    logits = random_logits(len(rows), seed=2)
    expected = torch.stack(
        [hf_row(NoRepeatNGramLogitsProcessor(ngram_size), list(r.token_ids), logits[i]) for i, r in enumerate(rows)]
    )
    out = apply_processors(logits.clone(), rows)
    assert_same(out, expected)
    if ngram_size <= 3:
        assert torch.isinf(out[3, base[ngram_size - 1]])


def test_bad_words_match_hf_including_eos_exemption():
    eos = (7,)
    bad = ((11,), (7,), (1, 2), (2, 1, 3), (5, 5, 5, 9))
    histories = [[0, 1], [4, 2, 1], [5, 5], [5, 5, 5], [3]]
    rows = [RowInput(SamplingParams(bad_words_ids=bad), h, num_prompt_tokens=1, eos_token_ids=eos) for h in histories]
    logits = random_logits(len(rows), seed=3)
    hf = NoBadWordsLogitsProcessor([list(w) for w in bad], eos_token_id=list(eos))
    expected = torch.stack([hf_row(hf, h, logits[i]) for i, h in enumerate(histories)])
    out = apply_processors(logits.clone(), rows)
    assert_same(out, expected)
    assert torch.isinf(out[0, 2]) and torch.isinf(out[1, 3]) and torch.isinf(out[3, 9])
    assert torch.isfinite(out[:, 7]).all()  # a one-token bad word equal to EOS is exempt, as in HF


def test_bad_word_outside_vocab_is_rejected():
    row = RowInput(SamplingParams(bad_words_ids=((VOCAB + 3,),)), [1, 2], num_prompt_tokens=1)
    with pytest.raises(ValueError, match="bad_words_ids"):
        apply_processors(random_logits(1, seed=0), [row])


@pytest.mark.parametrize("num_generated", [0, 2, 3, 5])
def test_min_length_and_min_new_tokens_ban_eos_like_hf(num_generated):
    eos = (4, 9)
    prompt = [1, 2, 3, 1]
    tokens = prompt + [5] * num_generated
    p_len = len(prompt)
    logits = random_logits(2, seed=4)
    rows = [
        RowInput(SamplingParams(min_length=p_len + 3), tokens, p_len, eos),
        RowInput(SamplingParams(min_new_tokens=3), tokens, p_len, eos),
    ]
    expected = torch.stack(
        [
            hf_row(MinLengthLogitsProcessor(p_len + 3, list(eos)), tokens, logits[0]),
            hf_row(MinNewTokensLengthLogitsProcessor(p_len, 3, list(eos)), tokens, logits[1]),
        ]
    )
    out = apply_processors(logits.clone(), rows)
    assert_same(out, expected)
    assert bool(torch.isinf(out[:, list(eos)]).all()) == (num_generated < 3)


def test_min_tokens_without_eos_bans_nothing():
    row = RowInput(SamplingParams(min_new_tokens=5), [1, 2, 3], num_prompt_tokens=3, eos_token_ids=())
    logits = random_logits(1, seed=5)
    assert torch.equal(apply_processors(logits.clone(), [row]), logits)


def test_presence_frequency_and_logit_bias():
    prompt = [1, 1, 2]
    output = [3, 3, 3, 2, 8]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={8: 2.0, 20: -1.5})
    logits = random_logits(1, seed=6)
    out = apply_processors(logits.clone(), [RowInput(params, prompt + output, len(prompt))])
    expected = logits[0].clone()
    for token_id, count in {3: 3, 2: 1, 8: 1}.items():  # OpenAI: output tokens only
        expected[token_id] -= 0.25 * count + 0.5
    expected[8] += 2.0
    expected[20] -= 1.5
    assert_same(out[0], expected)
    assert out[0, 1] == logits[0, 1]  # prompt-only token untouched


def test_neutral_rows_are_untouched_and_cost_nothing():
    rows = [
        RowInput(SamplingParams(repetition_penalty=1.0), [1, 2, 3, 1], 2),
        RowInput(SamplingParams(do_sample=True, top_k=0), [4, 5], 1),
    ]
    logits = random_logits(2, seed=7)
    before = logits.clone()
    out = apply_processors(logits, rows)
    assert out is logits and torch.equal(out, before)


def test_only_rows_that_ask_are_changed():
    rng = random.Random(8)
    rows = [
        RowInput(SamplingParams(), history(rng, 6), 3),
        RowInput(SamplingParams(repetition_penalty=1.5, no_repeat_ngram_size=2), history(rng, 9, 3), 3),
        RowInput(SamplingParams(), history(rng, 4), 3),
        RowInput(SamplingParams(bad_words_ids=((2,),)), history(rng, 5), 3),
    ]
    logits = random_logits(4, seed=9)
    out = apply_processors(logits.clone(), rows)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    expected1 = hf_row(RepetitionPenaltyLogitsProcessor(1.5), list(rows[1].token_ids), logits[1])
    expected1 = hf_row(NoRepeatNGramLogitsProcessor(2), list(rows[1].token_ids), expected1)
    assert_same(out[1], expected1)
    assert torch.isinf(out[3, 2]) and torch.isfinite(out[3]).sum() == VOCAB - 1


def test_all_tokens_banned_but_one():
    vocab = 16
    keep = 5
    bad = tuple((t,) for t in range(vocab) if t != keep)
    row = RowInput(SamplingParams(bad_words_ids=bad, do_sample=True, top_p=0.5), [1, 2], 1)
    logits = random_logits(1, seed=10, vocab=vocab)
    out = apply_warpers(apply_processors(logits.clone(), [row]), [row])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [keep]
    assert banned_token_ids(row, vocab) == [t for t in range(vocab) if t != keep]


# ------------------------------------------------------------------------------------------ warpers
WARPER_CASES = [
    ("temperature", 0.7, lambda v, k: TemperatureLogitsWarper(v)),
    ("top_k", 5, lambda v, k: TopKLogitsWarper(v, min_tokens_to_keep=k)),
    ("top_p", 0.6, lambda v, k: TopPLogitsWarper(v, min_tokens_to_keep=k)),
    ("min_p", 0.2, lambda v, k: MinPLogitsWarper(v, min_tokens_to_keep=k)),
    ("typical_p", 0.5, lambda v, k: TypicalLogitsWarper(v, min_tokens_to_keep=k)),
    ("epsilon_cutoff", 0.02, lambda v, k: EpsilonLogitsWarper(v, min_tokens_to_keep=k)),
    ("eta_cutoff", 0.05, lambda v, k: EtaLogitsWarper(v, min_tokens_to_keep=k)),
]


@pytest.mark.parametrize("name,value,make", WARPER_CASES, ids=[c[0] for c in WARPER_CASES])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 3])
def test_each_warper_matches_hf(name, value, make, min_tokens_to_keep):
    base = dict(do_sample=True, top_k=0)
    values = [value, value * 0.5 if name != "top_k" else 2, value]
    rows = [RowInput(SamplingParams(**{**base, name: v}), [1], 1) for v in values]
    rows.append(RowInput(SamplingParams(), [1], 1))  # greedy: warpers do not apply
    logits = random_logits(len(rows), seed=11)
    if name == "epsilon_cutoff" or name == "eta_cutoff":
        logits[2] = logits[2] / 20  # a flat row: every token under the cutoff, min_tokens_to_keep decides
    out = apply_warpers(logits.clone(), rows, min_tokens_to_keep)
    for i, v in enumerate(values):
        assert_same(out[i], hf_row(make(v, min_tokens_to_keep), [1], logits[i]))
    assert torch.equal(out[-1], logits[-1])
    assert torch.isinf(out[:3]).any() or name == "temperature"


def test_uses_extra_warpers_and_sampling_tensors():
    rows = [
        RowInput(SamplingParams(do_sample=True, temperature=0.5, top_k=7, top_p=0.9, min_p=0.1), [1], 1),
        RowInput(SamplingParams(temperature=0.5, top_k=7), [1], 1),  # greedy: neutral values
    ]
    t = sampling_tensors(rows, "cpu")
    assert t.temperature.tolist() == [0.5, 1.0] and t.top_k.tolist() == [7, 0]
    assert t.top_p.tolist() == pytest.approx([0.9, 1.0]) and t.min_p.tolist() == pytest.approx([0.1, 0.0])
    assert uses_extra_warpers(SamplingParams(do_sample=True, typical_p=0.9))
    assert not uses_extra_warpers(SamplingParams(typical_p=0.9))  # greedy
    assert not uses_extra_warpers(SamplingParams(do_sample=True, top_p=0.9))


# ------------------------------------------------------------------------------------------ the whole list
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def hf_generation_config(model, **kwargs) -> GenerationConfig:
    """The config generate() really uses: unset fields take the model's, then HF's defaults (top_k=50)."""
    config, _ = model._prepare_generation_config(GenerationConfig(**kwargs))
    return config


def hf_processor_list(model, config: GenerationConfig, prompt_len: int, input_ids: torch.Tensor):
    config = copy.deepcopy(config)
    model._prepare_special_tokens(config, True, device="cpu")
    return model._get_logits_processor(
        config, input_ids_seq_length=prompt_len, encoder_input_ids=input_ids, device="cpu", model_kwargs={}
    )


GENERATION_CONFIGS = [
    dict(),
    dict(repetition_penalty=1.4, no_repeat_ngram_size=2),
    dict(bad_words_ids=[[3], [1, 2], [4, 4, 5]], min_new_tokens=4, eos_token_id=[0, 6]),
    dict(do_sample=True, temperature=0.8),  # HF's default top_k=50 applies (model eos 2)
    dict(do_sample=True, top_k=0, top_p=0.7, min_p=0.05, repetition_penalty=0.8),
    dict(do_sample=True, top_k=20, typical_p=0.8, min_length=9, eos_token_id=2),
    dict(do_sample=True, top_k=0, epsilon_cutoff=0.01, eta_cutoff=0.02, no_repeat_ngram_size=3),
]


def test_whole_pipeline_matches_generate_processor_list(tiny_model):
    rng = random.Random(12)
    prompt_len = 5
    rows, expected = [], []
    logits = random_logits(len(GENERATION_CONFIGS), seed=13)
    for i, kwargs in enumerate(GENERATION_CONFIGS):
        gen_config = hf_generation_config(tiny_model, **kwargs)
        tokens = history(rng, prompt_len + 4)
        procs = hf_processor_list(tiny_model, gen_config, prompt_len, torch.tensor([tokens[:prompt_len]]))
        expected.append(procs(torch.tensor([tokens]), logits[i][None].clone())[0])
        params = SamplingParams.from_generation_config(gen_config)
        rows.append(RowInput(params, tokens, prompt_len, params.eos_token_ids))
    out = apply_warpers(apply_processors(logits.clone(), rows), rows)
    for i in range(len(rows)):
        assert_same(out[i], expected[i])
    assert int(torch.isinf(out[3]).sum()) == VOCAB - 50  # HF's default top_k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_cuda_matches_cpu():
    """The Triton kernels (CUDA tensors) against the torch references (CPU), all processors mixed in one batch."""
    rng = random.Random(14)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=2),
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.3, logit_bias={3: 1.0, 9: -2.0}),
        SamplingParams(bad_words_ids=((1,), (2, 3)), min_new_tokens=10),
        SamplingParams(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05),
        SamplingParams(do_sample=True, top_k=0, typical_p=0.7, repetition_penalty=0.9),
    ]
    rows = [RowInput(p, history(rng, 12, alphabet=5), 4, (5,)) for p in params]
    logits = random_logits(len(rows), seed=15)
    on_cpu = apply_warpers(apply_processors(logits.clone(), rows), rows)
    on_cuda = apply_warpers(apply_processors(logits.cuda(), rows), rows).cpu()
    assert_same(on_cuda, on_cpu)
