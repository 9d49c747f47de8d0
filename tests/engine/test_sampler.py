"""Sampler: greedy rows take an argmax, sampled rows one kernel call, each kind once per batch."""

import torch

import tokenmill.engine.sampler as sampler_module
from tokenmill.engine.logits_processors import RowInput
from tokenmill.engine.sampler import SampleRow, Sampler
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.kernels.sampling import sample_reference

VOCAB = 257


def make_rows(kinds: list[str], seed: int = 0) -> list[SampleRow]:
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "greedy":
            params = SamplingParams(max_new_tokens=4)
        elif kind == "top_k":
            params = SamplingParams(max_new_tokens=4, do_sample=True, top_k=20, temperature=0.7, seed=seed + i)
        elif kind == "top_k_top_p":
            params = SamplingParams(
                max_new_tokens=4, do_sample=True, top_k=30, top_p=0.8, temperature=0.8, seed=seed + i
            )
        elif kind == "top_p":
            params = SamplingParams(max_new_tokens=4, do_sample=True, top_k=0, top_p=0.7, seed=seed + i)
        else:
            params = SamplingParams(max_new_tokens=4, do_sample=True, top_k=0, seed=seed + i)
        row = RowInput(params, [1, 2, 3], 3)
        rows.append(SampleRow(row, logits_index=i, seed=1000 + i, offset=3 + i))
    return rows


def test_mixed_batch_runs_each_kind_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    kinds = ["greedy", "pure", "top_k", "greedy", "pure", "greedy"]
    logits = torch.randn(len(kinds), VOCAB, generator=gen) * 3
    calls, filters = [], []

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        filters.append(kwargs["filters"])
        return sample_reference(x, *args)

    monkeypatch.setattr(sampler_module, "sample", spy)
    rows = make_rows(kinds)
    out = Sampler()(logits, rows)
    assert calls == [3]  # one call, with the sampled rows only
    assert filters == [(True, False)]  # a top-k row, no top-p row: the kernel skips the top-p select
    greedy = [i for i, k in enumerate(kinds) if k == "greedy"]
    assert [out.token_ids[i] for i in greedy] == logits[greedy].argmax(-1).tolist()
    expected_lp = torch.log_softmax(logits[greedy], -1).gather(1, logits[greedy].argmax(-1, keepdim=True))
    assert torch.allclose(torch.tensor([out.logprobs[i] for i in greedy]), expected_lp.squeeze(1), atol=1e-5)
    assert out.token_tensor.tolist() == out.token_ids

    calls.clear()
    Sampler()(logits[greedy], make_rows(["greedy"] * len(greedy)))
    assert calls == []  # a greedy batch never reaches the sampling kernel

    filters.clear()
    for kinds, want in ((["pure", "pure"], (False, False)), (["top_p", "pure"], (False, True)),
                        (["top_k_top_p"], (True, True))):
        Sampler()(logits[: len(kinds)], make_rows(kinds))
        assert filters[-1] == want


def test_sampled_rows_do_not_depend_on_their_neighbours():
    gen = torch.Generator().manual_seed(1)
    kinds = ["pure", "greedy", "top_k", "pure"]
    logits = torch.randn(len(kinds), VOCAB, generator=gen) * 3
    rows = make_rows(kinds)
    mixed = Sampler()(logits, rows)
    for i, kind in enumerate(kinds):
        if kind == "greedy":
            continue
        alone_row = SampleRow(rows[i].row, logits_index=0, seed=rows[i].seed, offset=rows[i].offset)
        alone = Sampler()(logits[i : i + 1], [alone_row])
        assert alone.token_ids[0] == mixed.token_ids[i]
        assert alone.logprobs[0] == mixed.logprobs[i]


def test_top_k_top_p_rows_draw_what_the_full_sort_draws(monkeypatch):
    """Top-p among the top-k values (no sort of the row) in a mixed batch: the same tokens and
    log-probs as sorting every top-p row."""
    gen = torch.Generator().manual_seed(2)
    kinds = ["top_k_top_p", "greedy", "top_p", "top_k_top_p", "pure", "top_k", "top_k_top_p"] * 3
    logits = torch.randn(len(kinds), VOCAB, generator=gen) * 3
    logits[0, : VOCAB // 2] = float("-inf")  # banned tokens in one row
    calls = []

    def spy(x, *args, **kwargs):
        calls.append((x, args))
        return sample_reference(x, *args)

    monkeypatch.setattr(sampler_module, "sample", spy)
    out = Sampler()(logits, make_rows(kinds, seed=7))
    (x, args), = calls
    tokens, logprobs = sample_reference(x, *args, full_sort_top_p=True)
    sampled = [i for i, kind in enumerate(kinds) if kind != "greedy"]
    assert [out.token_ids[i] for i in sampled] == tokens.tolist()
    assert [out.logprobs[i] for i in sampled] == logprobs.tolist()
