"""Fused sampling kernel vs its sort-based torch reference (and HF's warpers).

On CPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), so shapes are kept small; the CUDA variants at the bottom
(marked gpu) repeat the comparisons on larger batches.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.chi_square import chisquare_p_value
from tokenmill.kernels import sampling as sampling_module
from tokenmill.kernels._philox import draw_target_torch, philox_word_torch
from tokenmill.kernels.sampling import (
    apply_sampling_filters,
    gpu_filling_split,
    programs_per_row,
    sample,
    sample_reference,
    sample_triton,
    split_factor,
)

NEG_INF = float("-inf")


def make_params(batch: int, vocab: int, gen: torch.Generator, device="cpu", off_fraction=0.4):
    """Per-row parameters covering every filter, each on and off, plus greedy rows."""
    temperature = 0.3 + 1.5 * torch.rand(batch, generator=gen)
    top_k = torch.randint(1, max(2, min(vocab, 200)), (batch,), generator=gen, dtype=torch.int32)
    top_k = torch.where(torch.rand(batch, generator=gen) < off_fraction, torch.zeros_like(top_k), top_k)
    top_p = 0.2 + 0.79 * torch.rand(batch, generator=gen)
    top_p = torch.where(torch.rand(batch, generator=gen) < off_fraction, torch.ones_like(top_p), top_p)
    min_p = 0.2 * torch.rand(batch, generator=gen)
    min_p = torch.where(torch.rand(batch, generator=gen) < 0.6, torch.zeros_like(min_p), min_p)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen, dtype=torch.int64)
    offsets = torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64)
    greedy = torch.rand(batch, generator=gen) < 0.2
    params = (temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    return tuple(p.to(device) for p in params)


def make_logits(batch: int, vocab: int, gen: torch.Generator, dtype=torch.float32):
    if dtype == torch.float32:
        return torch.randn(batch, vocab, generator=gen) * 4.0  # [B, V]
    # Distinct values in the narrow dtype: top-p between ties depends on sort order.
    grid = torch.linspace(-12.0, 12.0, 50 * vocab).to(dtype).unique()
    picks = torch.stack([torch.randperm(grid.numel(), generator=gen)[:vocab] for _ in range(batch)])
    return grid[picks]  # [B, V]


def kept_by_threshold(logits, temperature, greedy, thresholds):
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits.float() / temp[:, None]
    return (scaled >= thresholds[:, None]) & (scaled > NEG_INF)


def kept_by_sorting(logits, temperature, top_k, top_p, min_p, greedy):
    filtered = apply_sampling_filters(
        logits,
        torch.where(greedy, torch.ones_like(temperature), temperature),
        torch.where(greedy, torch.zeros_like(top_k), top_k),
        torch.where(greedy, torch.ones_like(top_p), top_p),
        torch.where(greedy, torch.zeros_like(min_p), min_p),
    )
    return filtered > NEG_INF


def assert_triton_matches_reference(logits, params, split=None):
    temperature, top_k, top_p, min_p, seeds, offsets, greedy = params
    tokens, logprobs, thresholds = sample_triton(logits, *params, return_threshold=True, split=split)
    ref_tokens, ref_logprobs = sample_reference(logits, *params)
    kept = kept_by_threshold(logits, temperature, greedy, thresholds)
    ref_kept = kept_by_sorting(logits, temperature, top_k, top_p, min_p, greedy)
    bad_rows = (kept != ref_kept).any(dim=-1).nonzero().flatten().tolist()
    assert not bad_rows, f"kept sets differ on rows {bad_rows}"
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    torch.testing.assert_close(logprobs.cpu(), ref_logprobs.cpu(), atol=2e-4, rtol=1e-4)


# Few rows for the big vocabularies: the interpreter walks every program in Python.
@pytest.mark.parametrize(
    "vocab,batch",
    [(1, 4), (999, 16), (1024, 8), (4097, 6), (49152, 3), (128256, 2), (151936, 2)],
)
def test_triton_matches_reference_edge_vocabularies(vocab, batch):
    gen = torch.Generator().manual_seed(vocab)
    logits = make_logits(batch, vocab, gen)
    assert_triton_matches_reference(logits, make_params(batch, vocab, gen))


@pytest.mark.parametrize("batch,off_fraction", [(1, 0.0), (37, 0.4), (256, 0.9)])
def test_triton_matches_reference_batch_sizes(batch, off_fraction):
    gen = torch.Generator().manual_seed(batch)
    vocab = 16
    logits = make_logits(batch, vocab, gen)
    # Mostly unfiltered rows in the big batch: the interpreter pays per searched row.
    params = make_params(batch, vocab, gen, off_fraction=off_fraction)
    assert_triton_matches_reference(logits, params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_half_precision(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = make_logits(12, 700, gen, dtype)
    assert_triton_matches_reference(logits, make_params(12, 700, gen))


def test_ties_at_the_top_k_boundary_are_all_kept():
    gen = torch.Generator().manual_seed(3)
    batch, vocab = 8, 300
    logits = torch.randint(-4, 5, (batch, vocab), generator=gen).float()  # many ties
    temperature = torch.full((batch,), 0.7)
    top_k = torch.tensor([1, 2, 5, 17, 40, 100, 299, 0], dtype=torch.int32)
    top_p = torch.ones(batch)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.3])
    seeds = torch.arange(batch, dtype=torch.int64)
    offsets = torch.zeros(batch, dtype=torch.int64)
    greedy = torch.zeros(batch, dtype=torch.bool)
    params = (temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    assert_triton_matches_reference(logits, params)
    _, _, thresholds = sample_triton(logits, *params, return_threshold=True)
    kept = kept_by_threshold(logits, temperature, greedy, thresholds)
    assert kept[0].sum() == (logits[0] == logits[0].max()).sum()  # top-1 keeps every tied max


def test_banned_entries_are_never_sampled():
    gen = torch.Generator().manual_seed(5)
    batch, vocab = 16, 257
    logits = make_logits(batch, vocab, gen)
    logits[:, ::2] = NEG_INF
    logits[3, :255] = NEG_INF  # one token left: 255 (256 is banned above)
    params = make_params(batch, vocab, gen)
    assert_triton_matches_reference(logits, params)
    tokens, _ = sample_triton(logits, *params)
    assert torch.isfinite(logits.gather(1, tokens[:, None])).all()
    assert tokens[3] == 255


def test_greedy_rows_take_argmax_with_full_log_softmax():
    gen = torch.Generator().manual_seed(11)
    batch, vocab = 6, 1500
    logits = make_logits(batch, vocab, gen)
    params = list(make_params(batch, vocab, gen))
    params[0] = torch.zeros(batch)  # temperature is ignored on greedy rows
    params[-1] = torch.ones(batch, dtype=torch.bool)
    for fn in (sample_triton, sample_reference):
        tokens, logprobs = fn(logits, *params)
        assert torch.equal(tokens, logits.argmax(dim=-1))
        expected = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


def test_greedy_rows_keep_the_first_of_tied_maxima():
    """bfloat16 logits tie often: the kernel's greedy rows (the engine's greedy path on CUDA, with
    the parameters `greedy_argmax` caches) pick the first index of the max, as torch's argmax and
    HF's greedy search do, across lanes and blocks of the row."""
    gen = torch.Generator().manual_seed(23)
    batch, vocab = 5, 9000  # three 4096-entry blocks
    logits = (torch.randn(batch, vocab, generator=gen) * 0.5).to(torch.bfloat16).float()
    logits[0, [17, 4113, 8200]] = 9.0  # one max in each block, in different lanes
    logits[1, [8999, 3]] = 7.5
    logits[2] = 0.0  # every entry ties
    logits[3, 100:] = float("-inf")
    tokens, logprobs = sample_triton(logits, *sampling_module._greedy_rows(batch, logits.device))
    expected_tokens, expected_logprobs = sample_reference(logits, *sampling_module._greedy_rows(batch, logits.device))
    assert tokens.tolist() == logits.argmax(dim=-1).tolist() == expected_tokens.tolist()
    assert tokens[:3].tolist() == [17, 3, 0]
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))
    assert sampling_module._greedy_rows(batch, logits.device) is sampling_module._greedy_rows(batch, logits.device)


def test_draw_does_not_depend_on_batch_neighbours_or_position():
    gen = torch.Generator().manual_seed(13)
    batch, vocab = 12, 333
    logits = make_logits(batch, vocab, gen)
    params = make_params(batch, vocab, gen)
    params[-1][:] = False  # all sampled
    tokens, logprobs = sample_triton(logits, *params)
    perm = torch.randperm(batch, generator=gen)
    others = make_logits(batch, vocab, gen)
    mixed = torch.cat([logits[perm], others])  # the same rows shuffled among strangers
    mixed_params = tuple(torch.cat([p[perm], p[perm.flip(0)]]) for p in params)
    mixed_tokens, mixed_logprobs = sample_triton(mixed, *mixed_params)
    assert torch.equal(mixed_tokens[:batch], tokens[perm])
    assert torch.equal(mixed_logprobs[:batch], logprobs[perm])
    # A different offset (the next position) gives fresh draws.
    shifted = list(params)
    shifted[5] = params[5] + 1
    assert not torch.equal(sample_triton(logits, *shifted)[0], tokens)


def test_public_sample_uses_reference_on_cpu():
    gen = torch.Generator().manual_seed(17)
    logits = make_logits(5, 64, gen)
    params = make_params(5, 64, gen)
    for got, want in zip(sample(logits, *params), sample_reference(logits, *params)):
        assert torch.equal(got, want)


def test_philox_matches_known_answer():
    # Philox4x32-10 known-answer vectors (Random123 kat_vectors): counter all 0, key all 0.
    word = philox_word_torch(torch.tensor([0]), torch.tensor(0), torch.tensor(0))
    assert word.item() == 0x6627E8D5


def test_draw_target_is_the_exact_96_bit_product():
    gen = torch.Generator().manual_seed(37)
    total = torch.randint(1, 2**58, (4000,), generator=gen, dtype=torch.int64)
    total[:3] = torch.tensor([1, 2**58 - 1, 2**38])
    word = torch.randint(0, 2**32, (4000,), generator=gen, dtype=torch.int64)
    word[:3] = torch.tensor([2**32 - 1, 2**32 - 1, 0])
    got = draw_target_torch(total, word).tolist()
    assert got == [(t * w) >> 32 for t, w in zip(total.tolist(), word.tolist())]


def test_kernel_and_cpu_path_pick_the_same_token_on_many_seeds():
    """The CPU production path (no filter, or top-k only) against the kernel, row by row."""
    gen = torch.Generator().manual_seed(41)
    batch, vocab = 64, 300
    logits = make_logits(batch, vocab, gen)
    temperature = torch.where(torch.arange(batch) % 2 == 0, torch.ones(batch), torch.full((batch,), 0.6))
    top_k = torch.where(torch.arange(batch) % 3 == 0, 40, 0).to(torch.int32)
    params = (
        temperature, top_k, torch.ones(batch), torch.zeros(batch),
        torch.randint(-(2**62), 2**62, (batch,), generator=gen, dtype=torch.int64),
        torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.bool),
    )
    assert_triton_matches_reference(logits, params)
    tokens, _ = sample_reference(logits, *params)
    assert tokens.unique().numel() > batch // 2  # real draws, not the argmax every time


def test_cpu_path_sorts_only_rows_that_use_top_p(monkeypatch):
    gen = torch.Generator().manual_seed(43)
    batch, vocab = 6, 400
    logits = make_logits(batch, vocab, gen)
    temperature, _, _, _, seeds, offsets, _ = make_params(batch, vocab, gen)
    no_filter = (torch.zeros(batch, dtype=torch.int32), torch.ones(batch), torch.zeros(batch))
    top_k_only = (torch.full((batch,), 7, dtype=torch.int32), torch.ones(batch), torch.zeros(batch))
    greedy = torch.zeros(batch, dtype=torch.bool)
    expected = {name: sample_reference(logits, temperature, *f, seeds, offsets, greedy)[0]
                for name, f in (("none", no_filter), ("top_k", top_k_only))}

    def forbidden(*args, **kwargs):
        raise AssertionError("sorted a row that does not use top-p")

    monkeypatch.setattr(torch, "sort", forbidden)
    assert torch.equal(sample_reference(logits, temperature, *top_k_only, seeds, offsets, greedy)[0],
                       expected["top_k"])
    monkeypatch.setattr(torch, "topk", forbidden)
    assert torch.equal(sample_reference(logits, temperature, *no_filter, seeds, offsets, greedy)[0],
                       expected["none"])


def top_k_top_p_rows(kind: str, batch: int, vocab: int, gen: torch.Generator):
    """Rows that stress top-p among the top-k values: ties at the k-th value and at the top-p
    boundary, -inf entries, k past the vocabulary, top-p near 0 and 1, rows with one filter only."""
    if kind == "ties":  # few distinct values: the k-th value and the top-p boundary are often tied
        logits = torch.randint(-6, 7, (batch, vocab), generator=gen).float()
    elif kind == "bfloat16":
        logits = (torch.randn(batch, vocab, generator=gen) * 4).to(torch.bfloat16)
    else:
        logits = torch.randn(batch, vocab, generator=gen) * 4
    if kind == "banned":  # most entries -inf, some rows with fewer finite entries than k, one all -inf
        logits[torch.rand(batch, vocab, generator=gen) < 0.9] = NEG_INF
        logits[0] = NEG_INF
    top_k = torch.randint(1, vocab + 10, (batch,), generator=gen, dtype=torch.int32)
    top_k[: batch // 4] = torch.randint(1, 60, (batch // 4,), generator=gen, dtype=torch.int32)
    top_k[1], top_k[2], top_k[3] = 1, vocab - 1, 0
    if kind == "ties":  # small k in every row: a tie at the k-th value reaches past the top k + 1
        top_k = torch.where(top_k > 0, torch.randint(1, 20, (batch,), generator=gen, dtype=torch.int32), 0)
    top_p = torch.rand(batch, generator=gen)
    top_p[4], top_p[5], top_p[6], top_p[7] = 1e-7, 0.999999, 1.0, 0.0
    min_p = torch.where(torch.rand(batch, generator=gen) < 0.3, 0.2 * torch.rand(batch, generator=gen), 0.0)
    temperature = 0.3 + 1.5 * torch.rand(batch, generator=gen)
    return logits, temperature, top_k, top_p, min_p


@pytest.mark.parametrize("kind", ["distinct", "ties", "bfloat16", "banned"])
def test_top_p_among_top_k_equals_the_full_sort(kind):
    """Top-p taken among the top-k values keeps exactly what sorting the whole row keeps."""
    gen = torch.Generator().manual_seed(53)
    for vocab, min_tokens_to_keep in ((8, 1), (300, 1), (300, 3), (2049, 1)):
        filters = top_k_top_p_rows(kind, 32, vocab, gen)
        fast = apply_sampling_filters(*filters, min_tokens_to_keep)
        sorted_ = apply_sampling_filters(*filters, min_tokens_to_keep, full_sort_top_p=True)
        where = f"{kind}, vocab {vocab}, min_tokens_to_keep {min_tokens_to_keep}"
        assert torch.equal(fast.isneginf(), sorted_.isneginf()), where
        assert torch.equal(fast, sorted_), where


@pytest.mark.parametrize("kind", ["distinct", "ties", "banned"])
def test_top_p_among_top_k_draws_what_the_full_sort_draws(kind):
    gen = torch.Generator().manual_seed(59)
    batch, vocab = 32, 1000
    logits, temperature, top_k, top_p, min_p = top_k_top_p_rows(kind, batch, vocab, gen)
    draw = (
        torch.randint(-(2**62), 2**62, (batch,), generator=gen, dtype=torch.int64),
        torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64),
        torch.rand(batch, generator=gen) < 0.15,  # some greedy rows
    )
    params = (temperature, top_k, top_p, min_p, *draw)
    tokens, logprobs = sample_reference(logits, *params)
    sorted_tokens, sorted_logprobs = sample_reference(logits, *params, full_sort_top_p=True)
    assert torch.equal(tokens, sorted_tokens)
    torch.testing.assert_close(logprobs, sorted_logprobs, rtol=0, atol=0, equal_nan=True)  # all -inf: nan


def test_top_k_top_p_rows_are_not_sorted(monkeypatch):
    """Distinct values: every top-k + top-p row is decided among its top-k values; the sort runs
    for the top-p-only rows alone."""
    gen = torch.Generator().manual_seed(61)
    batch, vocab = 12, 2000
    logits = make_logits(batch, vocab, gen)
    temperature = torch.full((batch,), 0.8)
    top_k = torch.tensor([50, 1, 1999, 7] * 3, dtype=torch.int32)
    top_k[-2:] = 0  # top-p only
    top_p = torch.tensor([0.9, 0.5, 1e-6, 0.999999] * 3)
    min_p = torch.zeros(batch)
    expected = apply_sampling_filters(logits, temperature, top_k, top_p, min_p, full_sort_top_p=True)
    sorted_rows = []
    real_sort = torch.sort

    def counting_sort(x, *args, **kwargs):
        sorted_rows.append(x.shape[0])
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    assert torch.equal(apply_sampling_filters(logits, temperature, top_k, top_p, min_p), expected)
    assert sorted_rows == [2]


@pytest.mark.parametrize("split", [1, 3])
def test_kernel_passes_over_a_row_are_bounded(split):
    """Elements read per row / vocab, as the kernel counts them (over all programs of a split row):
    the pass budget of each row kind."""
    gen = torch.Generator().manual_seed(47)
    vocab = 5000  # two blocks
    kinds = {  # temperature, top_k, top_p, min_p, greedy -> most passes allowed
        "greedy": ((1.0, 0, 1.0, 0.0, True), 1.0),
        "pure": ((1.0, 0, 1.0, 0.0, False), 3.0),
        "min_p": ((0.8, 0, 1.0, 0.1, False), 3.0),
        # One program: a 4-pass top-k select (8-bit digits), then one pass copies the survivors and
        # the rest reads only them. A split row: 8 passes per select, and the row for the rest.
        "top_k": ((0.8, 50, 1.0, 0.0, False), 1.0 + 4 + 1.2 if split == 1 else 3.0 + 8),
        "top_k_top_p": ((0.8, 50, 0.9, 0.0, False), 1.0 + 4 + 1.2 if split == 1 else 3.0 + 16),
    }
    batch = len(kinds)
    logits = make_logits(batch, vocab, gen)
    columns = list(zip(*(spec for spec, _ in kinds.values())))
    params = (
        torch.tensor(columns[0]), torch.tensor(columns[1], dtype=torch.int32), torch.tensor(columns[2]),
        torch.tensor(columns[3]), torch.arange(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64),
        torch.tensor(columns[4]),
    )
    tokens, _, passes = sample_triton(logits, *params, return_passes=True, split=split)
    assert torch.equal(tokens, sample_reference(logits, *params)[0])
    for (name, (_, budget)), got in zip(kinds.items(), passes.tolist()):
        assert got <= budget, f"{name}: {got} passes, budget {budget}"
    assert passes[0] == 1.0  # a greedy row reads its logits once
    assert all(got >= 2.0 for got in passes[1:].tolist())


def test_top_k_survivors_beyond_the_buffer_fall_back_to_the_row(monkeypatch):
    """A top-k row copies its survivors (k plus ties at the boundary) to a buffer of MAX_SURVIVORS
    and reads only them; a row with more survivors than that (ties) reads the row instead. Both
    keep the same set and draw the same token as the reference."""
    monkeypatch.setattr(sampling_module, "MAX_SURVIVORS", 16)
    gen = torch.Generator().manual_seed(5)
    batch, vocab = 6, 700
    logits = make_logits(batch, vocab, gen)
    logits[3] = torch.randint(-2, 3, (vocab,), generator=gen).float()  # ~140 ties at the top value
    logits[4, 100:] = float("-inf")  # more survivors than k: none banned among the first 100
    params = (
        torch.tensor([0.8, 1.0, 0.7, 1.0, 0.9, 1.0]),
        torch.tensor([5, 16, 12, 3, 8, 17], dtype=torch.int32),  # row 5: k above the buffer
        torch.tensor([0.9, 1.0, 0.8, 1.0, 0.7, 0.9]),
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05]),
        torch.arange(batch, dtype=torch.int64) * 13, torch.full((batch,), 2, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.bool),
    )
    assert_triton_matches_reference(logits, params, split=1)
    _, _, passes = sample_triton(logits, *params, return_passes=True, split=1)
    compacted = [0, 1, 2, 4]
    assert all(passes[r] < 6.3 for r in compacted), passes  # 1 + 4 (top-k) + 1 (copy) + the buffer
    assert passes[3] > 7 and passes[5] > 13, passes  # the row again: total and pick (and top-p)


def hf_filters(logits, temperature, top_k, top_p, min_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores[0]


def test_apply_sampling_filters_equals_hf_warpers_row_by_row():
    gen = torch.Generator().manual_seed(19)
    batch, vocab = 24, 500
    logits = make_logits(batch, vocab, gen)
    temperature, top_k, top_p, min_p, _, _, _ = make_params(batch, vocab, gen)
    ours = apply_sampling_filters(logits, temperature, top_k, top_p, min_p)
    for row in range(batch):
        expected = hf_filters(
            logits[row], float(temperature[row]), int(top_k[row]), float(top_p[row]), float(min_p[row])
        )
        assert torch.equal(ours[row] > NEG_INF, expected > NEG_INF), f"row {row}"
        kept = expected > NEG_INF
        torch.testing.assert_close(ours[row][kept], expected[kept])


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(0, 1.0, 0.0), (4, 1.0, 0.0), (0, 0.8, 0.0), (6, 0.9, 0.0), (0, 1.0, 0.03), (5, 0.95, 0.01)],
)
def test_samples_follow_the_filtered_distribution(top_k, top_p, min_p):
    """Chi-square over many rows (different seeds) of one logit vector in one launch."""
    gen = torch.Generator().manual_seed(23)
    vocab, num_draws = 10, 20000
    row = torch.randn(vocab, generator=gen) * 1.5
    logits = row.expand(num_draws, vocab).contiguous()
    temperature = torch.full((num_draws,), 0.8)
    params = (
        temperature,
        torch.full((num_draws,), top_k, dtype=torch.int32),
        torch.full((num_draws,), top_p),
        torch.full((num_draws,), min_p),
        torch.arange(num_draws, dtype=torch.int64) * 1_000_003,
        torch.full((num_draws,), 42, dtype=torch.int64),
        torch.zeros(num_draws, dtype=torch.bool),
    )
    tokens, _ = sample_reference(logits, *params)
    probs = torch.softmax(apply_sampling_filters(logits[:1], *params[:4]), dim=-1)[0].double()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert kept.sum() >= 2
    expected = probs[kept] / probs[kept].sum() * counts.sum()
    p_value = chisquare_p_value(counts[kept], expected)
    assert p_value > 1e-4
    # The kernel picks the very same tokens (checked on a slice: the interpreter is slow).
    some = slice(0, 12)
    triton_tokens, _ = sample_triton(logits[some], *(p[some] for p in params))
    assert torch.equal(triton_tokens, tokens[some])


# ---------------------------------------------------------------- one row over several programs

SPLIT_KINDS = {  # temperature, top_k, top_p, min_p, greedy
    "pure": (1.0, 0, 1.0, 0.0, False),
    "temperature": (0.6, 0, 1.0, 0.0, False),
    "top_k": (0.8, 40, 1.0, 0.0, False),
    "top_p": (0.9, 0, 0.85, 0.0, False),
    "top_k_top_p": (0.8, 60, 0.7, 0.0, False),
    "min_p": (1.2, 0, 1.0, 0.08, False),
    "all_filters": (0.7, 30, 0.9, 0.02, False),
    "greedy": (1.0, 0, 1.0, 0.0, True),
}


def split_params(kinds, gen):
    """Per-row parameters of the given SPLIT_KINDS, fresh seeds and offsets per row."""
    columns = list(zip(*(SPLIT_KINDS[kind] for kind in kinds)))
    batch = len(kinds)
    return (
        torch.tensor(columns[0]), torch.tensor(columns[1], dtype=torch.int32), torch.tensor(columns[2]),
        torch.tensor(columns[3]),
        torch.randint(-(2**62), 2**62, (batch,), generator=gen, dtype=torch.int64),
        torch.randint(0, 2**40, (batch,), generator=gen, dtype=torch.int64),
        torch.tensor(columns[4]),
    )


def assert_split_matches_one_program(logits, params, split, reference_rows=slice(None)):
    """The row split over `split` programs draws the very tokens of the one-program kernel, with the
    same thresholds; on `reference_rows` also those of the torch reference, with its kept sets."""
    assert programs_per_row(*logits.shape, logits.device, split) == split  # really split
    tokens, logprobs, thresholds = sample_triton(logits, *params, return_threshold=True, split=split)
    one_tokens, one_logprobs, one_thresholds = sample_triton(logits, *params, return_threshold=True, split=1)
    assert tokens.tolist() == one_tokens.tolist()
    assert torch.equal(thresholds, one_thresholds)
    torch.testing.assert_close(logprobs, one_logprobs, atol=2e-4, rtol=1e-4)
    logits, params = logits[reference_rows], tuple(p[reference_rows] for p in params)
    ref_tokens, ref_logprobs = sample_reference(logits, *params)
    assert tokens[reference_rows].tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs[reference_rows], ref_logprobs, atol=2e-4, rtol=1e-4)
    temperature, top_k, top_p, min_p, _, _, greedy = params
    kept = kept_by_threshold(logits, temperature, greedy, thresholds[reference_rows])
    assert torch.equal(kept, kept_by_sorting(logits, temperature, top_k, top_p, min_p, greedy))


def test_split_factor_splits_small_batches_only():
    assert split_factor(1, 128256, 132) > 1
    assert split_factor(256, 128256, 132) == 1
    assert split_factor(31, 128256, 132) > 1
    assert split_factor(32, 128256, 132) == 1
    assert split_factor(1, 1000, 132) == 1  # a short row: one program streams it fast enough
    for batch in (1, 2, 7, 16, 31):
        programs = split_factor(batch, 151936, 132)
        assert batch * programs <= 132
        assert 151936 / programs >= 2048  # no program left with a sliver
    cpu = torch.device("cpu")
    assert programs_per_row(1, 128256, cpu) == 1  # the default: one program per row at every batch
    assert programs_per_row(1, 128256, cpu, gpu_filling_split(1, 128256, cpu)) > 1
    assert gpu_filling_split(256, 128256, cpu) == 1
    assert programs_per_row(1, 128256, cpu, split=1) == 1
    assert programs_per_row(3, 1000, cpu, split=3) == 3


@pytest.mark.parametrize("vocab,split", [(1000, 3), (4099, 4)])
def test_split_row_mixed_batch_matches_one_program_and_reference(vocab, split):
    """Every row kind in one batch (greedy included), vocabularies that are no multiple of a block."""
    gen = torch.Generator().manual_seed(vocab + split)
    kinds = list(SPLIT_KINDS)
    assert_split_matches_one_program(make_logits(len(kinds), vocab, gen), split_params(kinds, gen), split)


@pytest.mark.parametrize(
    "kind,seeds", [("pure", 8), ("min_p", 8), ("top_k", 3), ("top_p", 3), ("top_k_top_p", 3)]
)
def test_split_row_draws_match_on_many_seeds(kind, seeds):
    """One row drawn with many seeds (rows that search thresholds cost the interpreter more)."""
    gen = torch.Generator().manual_seed(len(kind))
    vocab = 1000
    logits = make_logits(1, vocab, gen).expand(seeds, vocab).contiguous()
    assert_split_matches_one_program(logits, split_params([kind] * seeds, gen), split=2)


def test_split_row_ties_at_the_boundary():
    gen = torch.Generator().manual_seed(53)
    batch, vocab = 7, 1000
    logits = torch.randint(-4, 5, (batch, vocab), generator=gen).float()  # many ties
    params = (
        torch.full((batch,), 0.7),
        torch.tensor([1, 5, 17, 100, 0, 0, 20], dtype=torch.int32),
        torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.8]),
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]),
        torch.arange(batch, dtype=torch.int64) * 977,
        torch.full((batch,), 3, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.bool),
    )
    # Ties under top-p: the sort order decides the reference's set, so those rows (5, 6) are
    # compared with the one-program kernel only.
    assert_split_matches_one_program(logits, params, 2, reference_rows=slice(0, 5))


def test_split_row_with_banned_entries_and_empty_chunks():
    gen = torch.Generator().manual_seed(59)
    kinds = ["pure", "top_k", "top_p", "min_p", "greedy"]
    vocab = 2051  # chunks [0, 704), [704, 1408), [1408, 2051)
    logits = make_logits(len(kinds), vocab, gen)
    logits[:, ::2] = NEG_INF
    logits[1, :1500] = NEG_INF  # the first two chunks of the row hold nothing
    logits[2, :2049] = NEG_INF  # one token left, in the last chunk
    logits[3, 500:] = NEG_INF  # everything in the first chunk
    logits[4, :1600] = NEG_INF
    params = split_params(kinds, gen)
    assert_split_matches_one_program(logits, params, split=3)
    tokens, _ = sample_triton(logits, *params, split=3)
    assert torch.isfinite(logits.gather(1, tokens[:, None])).all()
    assert tokens[2] == 2049


# ---------------------------------------------------------------- CUDA variants


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 999, 1024, 4097, 49152, 128256, 151936])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_cuda_matches_reference(vocab, batch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(vocab + batch)
    logits = make_logits(batch, vocab, gen).cuda()
    params = make_params(batch, vocab, gen, device="cuda")
    temperature, top_k, top_p, min_p, seeds, offsets, greedy = params
    tokens, logprobs, thresholds = sample_triton(logits, *params, return_threshold=True)
    ref_tokens, ref_logprobs = sample_reference(logits, *params)  # torch on the GPU
    kept = kept_by_threshold(logits, temperature, greedy, thresholds)
    ref_kept = kept_by_sorting(logits, temperature, top_k, top_p, min_p, greedy)
    assert (kept != ref_kept).any(dim=-1).sum() == 0
    # Exp(1) noise may differ by an ulp between CUDA and torch `log`: allow a rare near-tie.
    assert (tokens != ref_tokens).sum() <= max(1, batch // 100)
    same = tokens == ref_tokens
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], atol=2e-4, rtol=1e-4)
    assert torch.equal(sample(logits, *params)[0], tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_cuda_split_rows_draw_what_one_program_draws(batch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(61 + batch)
    vocab = 128256
    logits = make_logits(batch, vocab, gen).cuda()
    params = make_params(batch, vocab, gen, device="cuda", off_fraction=0.2)
    split = gpu_filling_split(batch, vocab, logits.device)
    assert programs_per_row(batch, vocab, logits.device, split) > 1
    tokens, logprobs, thresholds = sample_triton(logits, *params, return_threshold=True, split=split)
    one = sample_triton(logits, *params, return_threshold=True, split=1)
    assert torch.equal(tokens, one[0])
    assert torch.equal(thresholds, one[2])
    torch.testing.assert_close(logprobs, one[1], atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_cuda_greedy_argmax_is_the_kernel_and_matches_torch(batch, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(71 + batch)
    logits = (torch.randn(batch, 128256, generator=gen) * 3).to(torch.bfloat16).float().cuda()  # ties
    calls = []
    monkeypatch.setattr(sampling_module, "sample_triton",
                        lambda *a, **k: calls.append(1) or sample_triton(*a, **k))
    tokens, logprobs = sampling_module.greedy_argmax(logits)
    assert calls  # the kernel, not torch, on CUDA
    ref_tokens, ref_logprobs = sampling_module.greedy_reference(logits)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_samples_follow_the_filtered_distribution():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(29)
    vocab, num_draws = 32, 200000
    row = torch.randn(vocab, generator=gen) * 1.5
    logits = row.expand(num_draws, vocab).contiguous().cuda()
    params = (
        torch.full((num_draws,), 0.9),
        torch.full((num_draws,), 20, dtype=torch.int32),
        torch.full((num_draws,), 0.9),
        torch.full((num_draws,), 0.02),
        torch.arange(num_draws, dtype=torch.int64) * 7919,
        torch.full((num_draws,), 5, dtype=torch.int64),
        torch.zeros(num_draws, dtype=torch.bool),
    )
    params = tuple(p.cuda() for p in params)
    tokens, _ = sample_triton(logits, *params)
    probs = torch.softmax(apply_sampling_filters(logits[:1], *params[:4]), dim=-1)[0].double().cpu()
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    expected = probs[kept] / probs[kept].sum() * counts.sum()
    p_value = chisquare_p_value(counts[kept], expected)
    assert p_value > 1e-4


@pytest.mark.gpu
def test_cuda_sample_is_graph_capturable():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(31)
    batch, vocab = 16, 32000
    logits = make_logits(batch, vocab, gen).cuda()
    params = make_params(batch, vocab, gen, device="cuda")
    expected = sample_triton(logits, *params)  # also compiles the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample(logits, *params)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0])


class _CountingKernel:
    """Stands in for a Triton kernel: counts its launches and forwards them."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize(
    "kinds,filters,select_launches",
    [(["pure", "min_p", "greedy"], (False, False), 0), (["top_k", "pure"], (True, False), 9),
     (["top_p", "min_p"], (False, True), 9)],
)
def test_split_launches_only_the_selects_a_batch_uses(monkeypatch, kinds, filters, select_launches):
    """The caller's hint that no row filters by top-k / top-p skips that select's radix launches
    (pure sampling at a small batch: 3 launches, not 21) and changes no draw."""
    from tokenmill.kernels import sampling

    gen = torch.Generator().manual_seed(61)
    logits = make_logits(len(kinds), 1000, gen)
    params = split_params(kinds, gen)
    want = sample_triton(logits, *params, return_threshold=True, split=2)
    counting = _CountingKernel(sampling._split_radix_level_kernel)
    monkeypatch.setattr(sampling, "_split_radix_level_kernel", counting)
    got = sample_triton(logits, *params, return_threshold=True, split=2, filters=filters)
    assert counting.launches == select_launches
    for a, b in zip(got, want):
        assert torch.equal(a, b)
