"""Penalties kernel and reference vs HF processors and OpenAI's formulas."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from tokenmill.kernels.penalties import (
    apply_penalties,
    apply_penalties_reference,
    apply_penalties_triton,
)

NEG_INF = float("-inf")


def make_batch(batch, vocab, max_len, gen, alphabet=None):
    """Histories with many repeats (small alphabet), a prompt part and padding -1."""
    alphabet = min(alphabet or vocab, vocab)
    seq_lens = torch.randint(0, max_len + 1, (batch,), generator=gen)
    seq_lens[0] = max_len
    prompt_lens = (seq_lens.float() * torch.rand(batch, generator=gen)).long()
    token_ids = torch.full((batch, max_len), -1, dtype=torch.int64)  # [B, L]
    for row in range(batch):
        length = int(seq_lens[row])
        token_ids[row, :length] = torch.randint(0, alphabet, (length,), generator=gen)
    logits = torch.randn(batch, vocab, generator=gen) * 3  # [B, V]
    return logits, token_ids, prompt_lens, seq_lens


def make_penalties(batch, gen):
    """Per-row penalties, each off on some rows."""
    repetition = 0.5 + 1.5 * torch.rand(batch, generator=gen)
    repetition = torch.where(torch.rand(batch, generator=gen) < 0.3, torch.ones(batch), repetition)
    presence = 2 * torch.rand(batch, generator=gen) - 1
    presence = torch.where(torch.rand(batch, generator=gen) < 0.3, torch.zeros(batch), presence)
    frequency = 2 * torch.rand(batch, generator=gen) - 1
    frequency = torch.where(torch.rand(batch, generator=gen) < 0.3, torch.zeros(batch), frequency)
    return repetition, presence, frequency


def make_id_lists(batch, vocab, width, gen):
    """[B, width] distinct ids per row, padded with -1 at random."""
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:width] for _ in range(batch)])
    if ids.shape[1] < width:
        ids = torch.cat([ids, torch.full((batch, width - ids.shape[1]), -1)], dim=1)
    pad = torch.rand(batch, width, generator=gen) < 0.3
    return torch.where(pad, -1, ids)


def expected_by_formula(logits, token_ids, prompt_lens, seq_lens, repetition, presence, frequency,
                        banned_ids=None, bias_ids=None, bias_values=None):
    """HF's repetition processor row by row, then OpenAI's formulas by hand."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        history = token_ids[row, : int(seq_lens[row])]
        scores = out[row][None]
        if history.numel() > 0:
            scores = RepetitionPenaltyLogitsProcessor(float(repetition[row]))(history[None], scores.clone())
        output = history[int(prompt_lens[row]):].tolist()
        for token in set(output):
            count = output.count(token)
            scores[0, token] = scores[0, token] - (float(frequency[row]) * count + float(presence[row]))
        if bias_ids is not None:
            for token, value in zip(bias_ids[row].tolist(), bias_values[row].tolist()):
                if token >= 0:
                    scores[0, token] += value
        if banned_ids is not None:
            for token in banned_ids[row].tolist():
                if token >= 0:
                    scores[0, token] = NEG_INF
        out[row] = scores[0]
    return out


def run_both(logits, *args, **kwargs):
    ref = apply_penalties_reference(logits.clone(), *args, **kwargs)
    tri = apply_penalties_triton(logits.clone(), *args, **kwargs)
    return ref, tri


@pytest.mark.parametrize(
    "vocab,batch,max_len",
    [(1, 3, 10), (999, 16, 60), (1024, 8, 600), (4097, 6, 100), (49152, 3, 80), (128256, 2, 40), (151936, 2, 50)],
)
def test_matches_hf_and_openai_formulas(vocab, batch, max_len):
    gen = torch.Generator().manual_seed(vocab)
    logits, token_ids, prompt_lens, seq_lens = make_batch(batch, vocab, max_len, gen, alphabet=20)
    repetition, presence, frequency = make_penalties(batch, gen)
    banned = make_id_lists(batch, vocab, 3, gen)
    bias_ids = make_id_lists(batch, vocab, 5, gen)
    bias_values = torch.randn(batch, 5, generator=gen) * 5
    args = (token_ids, prompt_lens, seq_lens, repetition, presence, frequency)
    kwargs = dict(banned_ids=banned, bias_ids=bias_ids, bias_values=bias_values)
    expected = expected_by_formula(logits, *args, **kwargs)
    ref, tri = run_both(logits, *args, **kwargs)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.isinf(tri), torch.isinf(expected))


def test_batch_of_256_with_penalties_off_on_most_rows():
    gen = torch.Generator().manual_seed(1)
    batch, vocab = 256, 64
    logits, token_ids, prompt_lens, seq_lens = make_batch(batch, vocab, 30, gen)
    repetition, presence, frequency = make_penalties(batch, gen)
    off = torch.rand(batch, generator=gen) < 0.7
    repetition[off], presence[off], frequency[off] = 1.0, 0.0, 0.0
    args = (token_ids, prompt_lens, seq_lens, repetition, presence, frequency)
    ref, tri = run_both(logits, *args)
    assert torch.equal(tri[off], logits[off])  # off rows untouched
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref, expected_by_formula(logits, *args), atol=1e-5, rtol=1e-5)


def test_repeated_token_is_penalised_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    token_ids = torch.tensor([[0, 0, 0, 1, 1, 0, 1]])
    args = (token_ids, torch.tensor([2]), torch.tensor([7]),
            torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    for fn in (apply_penalties_triton, apply_penalties_reference, apply_penalties):
        out = fn(logits.clone(), *args)
        assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    token_ids = torch.tensor([[4, 4, 1, 2, 2, 2, -1]])  # prompt: 4 4; output: 1 2 2 2
    args = (token_ids, torch.tensor([2]), torch.tensor([6]),
            torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    expected = torch.tensor([[0.0, -0.75, -1.25, 0.0, 0.0]])
    for fn in (apply_penalties_triton, apply_penalties_reference):
        assert torch.equal(fn(logits.clone(), *args), expected)


def test_min_new_tokens_ban_of_eos_matches_hf():
    gen = torch.Generator().manual_seed(3)
    vocab, eos = 50, 7
    logits, token_ids, _, _ = make_batch(1, vocab, 12, gen)
    history = token_ids[:, :12]
    prompt_len, min_new_tokens = 8, 6  # 4 new tokens so far: EOS still banned
    expected = MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, eos)(history, logits.clone())
    ones, zeros = torch.ones(1), torch.zeros(1)
    args = (token_ids, torch.tensor([prompt_len]), torch.tensor([12]), ones, zeros, zeros)
    for out in run_both(logits, *args, banned_ids=torch.tensor([[eos, -1]])):
        assert torch.equal(out, expected)


def test_single_token_bad_words_match_hf():
    gen = torch.Generator().manual_seed(4)
    vocab = 40
    logits, token_ids, prompt_lens, seq_lens = make_batch(2, vocab, 10, gen)
    bad = [[3], [17], [39]]
    expected = NoBadWordsLogitsProcessor(bad)(token_ids.clamp(min=0), logits.clone())
    ones, zeros = torch.ones(2), torch.zeros(2)
    banned = torch.tensor([[3, 17, 39], [39, 3, 17]])
    for out in run_both(logits, token_ids, prompt_lens, seq_lens, ones, zeros, zeros, banned_ids=banned):
        assert torch.equal(out, expected)


def test_all_tokens_banned_but_one():
    vocab = 1000
    logits = torch.randn(2, vocab)
    banned = torch.stack([torch.cat([torch.arange(0, 500), torch.arange(501, vocab)])] * 2)
    banned[1, :10] = -1  # padding
    ones, zeros = torch.ones(2), torch.zeros(2)
    token_ids = torch.full((2, 1), -1)
    ref, tri = run_both(logits, token_ids, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                        ones, zeros, zeros, banned_ids=banned)
    assert torch.equal(tri, ref)
    assert torch.isfinite(tri[0]).sum() == 1 and tri[0, 500] == logits[0, 500]
    assert torch.isfinite(tri[1]).sum() == 11


def test_neutral_parameters_change_nothing_and_work_in_place():
    gen = torch.Generator().manual_seed(6)
    logits, token_ids, prompt_lens, seq_lens = make_batch(8, 300, 40, gen, alphabet=10)
    logits = logits.to(torch.bfloat16)
    ones, zeros = torch.ones(8), torch.zeros(8)
    original = logits.clone()
    out = apply_penalties_triton(logits, token_ids, prompt_lens, seq_lens, ones, zeros, zeros)
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out, original)


def test_half_precision_matches_reference():
    gen = torch.Generator().manual_seed(8)
    logits, token_ids, prompt_lens, seq_lens = make_batch(6, 500, 50, gen, alphabet=30)
    repetition, presence, frequency = make_penalties(6, gen)
    for dtype in (torch.float16, torch.bfloat16):
        ref, tri = run_both(logits.to(dtype), token_ids, prompt_lens, seq_lens, repetition, presence, frequency)
        # One ulp: the interpreter rounds float32 -> bfloat16 its own way (CUDA rounds to nearest).
        torch.testing.assert_close(tri, ref, atol=0.0, rtol=2**-7 if dtype == torch.bfloat16 else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 999, 32000, 128256, 151936])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (64, 1024), (256, 512)])
def test_cuda_matches_reference(vocab, batch, max_len):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(vocab + batch)
    logits, token_ids, prompt_lens, seq_lens = make_batch(batch, vocab, max_len, gen, alphabet=500)
    repetition, presence, frequency = make_penalties(batch, gen)
    banned = make_id_lists(batch, vocab, 4, gen)
    bias_ids = make_id_lists(batch, vocab, 6, gen)
    bias_values = torch.randn(batch, 6, generator=gen)
    args = (token_ids, prompt_lens, seq_lens, repetition, presence, frequency, banned, bias_ids, bias_values)
    expected = apply_penalties_reference(logits.clone(), *args)
    out = apply_penalties(logits.cuda(), *(a.cuda() for a in args))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-6, rtol=1e-6)
