"""No-repeat n-gram ban: Triton kernel and torch reference vs HF's processor."""

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from tokenmill.kernels.ngram import ban_ngrams, ban_ngrams_reference, ban_ngrams_triton


def make_batch(batch, vocab, max_len, gen, alphabet=None):
    """Random histories (small alphabet -> many repeated n-grams), padded with -1."""
    alphabet = alphabet or vocab
    seq_lens = torch.randint(0, max_len + 1, (batch,), generator=gen)
    seq_lens[0] = max_len
    token_ids = torch.full((batch, max_len), -1, dtype=torch.int64)  # [B, L]
    for row in range(batch):
        length = int(seq_lens[row])
        token_ids[row, :length] = torch.randint(0, min(alphabet, vocab), (length,), generator=gen)
    logits = torch.randn(batch, vocab, generator=gen)  # [B, V]
    return logits, token_ids, seq_lens


def hf_ban(logits, token_ids, seq_lens, ngram_size):
    """HF takes one n per batch and unpadded histories: call it row by row."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        n = int(ngram_size[row])
        if n == 0:
            continue
        history = token_ids[row, : int(seq_lens[row])][None]
        out[row] = NoRepeatNGramLogitsProcessor(n)(history, logits[row][None].clone())[0]
    return out


@pytest.mark.parametrize(
    "vocab,batch,max_len,alphabet",
    [(1, 3, 12, None), (999, 16, 40, 5), (1024, 8, 64, 3), (4097, 8, 300, 4),
     (49152, 4, 100, 6), (128256, 2, 50, 3), (151936, 2, 64, 2)],
)
def test_matches_hf_on_random_histories(vocab, batch, max_len, alphabet):
    gen = torch.Generator().manual_seed(vocab)
    logits, token_ids, seq_lens = make_batch(batch, vocab, max_len, gen, alphabet)
    ngram_size = torch.randint(0, 5, (batch,), generator=gen, dtype=torch.int32)  # 0 = off
    expected = hf_ban(logits, token_ids, seq_lens, ngram_size)
    ref = ban_ngrams_reference(logits.clone(), token_ids, seq_lens, ngram_size)
    tri = ban_ngrams_triton(logits.clone(), token_ids, seq_lens, ngram_size)
    assert torch.equal(ref, expected)
    assert torch.equal(tri, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_row_the_same_n_like_hf_batch_call(n):
    gen = torch.Generator().manual_seed(100 + n)
    batch, vocab, length = 32, 50, 30
    token_ids = torch.randint(0, 4, (batch, length), generator=gen)
    logits = torch.randn(batch, vocab, generator=gen)
    seq_lens = torch.full((batch,), length)
    ngram_size = torch.full((batch,), n, dtype=torch.int32)
    expected = NoRepeatNGramLogitsProcessor(n)(token_ids, logits.clone())
    assert torch.equal(ban_ngrams_triton(logits.clone(), token_ids, seq_lens, ngram_size), expected)
    assert torch.equal(ban_ngrams_reference(logits.clone(), token_ids, seq_lens, ngram_size), expected)
    assert torch.isinf(expected).any()  # the small alphabet does repeat n-grams


def test_batch_of_256_with_rows_off_and_histories_shorter_than_n():
    gen = torch.Generator().manual_seed(7)
    batch, vocab, max_len = 256, 40, 24
    logits, token_ids, seq_lens = make_batch(batch, vocab, max_len, gen, alphabet=3)
    ngram_size = torch.randint(0, 8, (batch,), generator=gen, dtype=torch.int32)
    seq_lens[1], ngram_size[1] = 2, 4  # n > history + 1: nothing banned
    seq_lens[2], ngram_size[2] = 3, 4  # n == history + 1: still nothing (no full window)
    expected = hf_ban(logits, token_ids, seq_lens, ngram_size)
    tri = ban_ngrams_triton(logits.clone(), token_ids, seq_lens, ngram_size)
    assert torch.equal(tri, expected)
    assert torch.equal(tri[1], logits[1]) and torch.equal(tri[2], logits[2])
    off = ngram_size == 0
    assert torch.equal(tri[off], logits[off])


def test_known_example():
    # history a b c a b: the bigram (b, c) exists, last token b -> c banned for n=2;
    # trigram (a, b, c) exists, last two a b -> c banned for n=3; n=1 bans a, b, c.
    token_ids = torch.tensor([[0, 1, 2, 0, 1]] * 3)
    seq_lens = torch.tensor([5, 5, 5])
    ngram_size = torch.tensor([2, 3, 1], dtype=torch.int32)
    for fn in (ban_ngrams_triton, ban_ngrams_reference, ban_ngrams):
        out = fn(torch.zeros(3, 6), token_ids, seq_lens, ngram_size)
        banned = [torch.isinf(out[row]).nonzero().flatten().tolist() for row in range(3)]
        assert banned == [[2], [2], [0, 1, 2]]


def test_half_precision_logits_and_in_place():
    gen = torch.Generator().manual_seed(9)
    logits, token_ids, seq_lens = make_batch(6, 300, 40, gen, alphabet=3)
    logits = logits.to(torch.bfloat16)
    ngram_size = torch.tensor([2, 3, 0, 1, 2, 5], dtype=torch.int32)
    expected = hf_ban(logits.float(), token_ids, seq_lens, ngram_size).to(torch.bfloat16)
    out = ban_ngrams_triton(logits, token_ids, seq_lens, ngram_size)
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 999, 32000, 128256, 151936])
@pytest.mark.parametrize("batch,max_len", [(1, 2048), (64, 1024), (256, 300)])
def test_cuda_matches_reference(vocab, batch, max_len):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(vocab + batch)
    logits, token_ids, seq_lens = make_batch(batch, vocab, max_len, gen, alphabet=8)
    ngram_size = torch.randint(0, 5, (batch,), generator=gen, dtype=torch.int32)
    expected = ban_ngrams_reference(logits.clone(), token_ids, seq_lens, ngram_size)
    out = ban_ngrams(logits.cuda(), token_ids.cuda(), seq_lens.cuda(), ngram_size.cuda())
    assert torch.equal(out.cpu(), expected)
