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
    with torch.inference_mode():  # the sampler's tensors are inference tensors
        tokens, logprobs = sample_reference(x, *args, full_sort_top_p=True)
    sampled = [i for i, kind in enumerate(kinds) if kind != "greedy"]
    assert [out.token_ids[i] for i in sampled] == tokens.tolist()
    assert [out.logprobs[i] for i in sampled] == logprobs.tolist()


def test_sampled_rows_take_two_host_to_device_copies(monkeypatch):
    """Each host-to-device copy of small values costs host time on CUDA: the sampled rows' six
    parameters go over packed in two copies; rows that are the whole logits, in order, need no
    index (nor a copy of the logits)."""
    import tokenmill.engine.device_copy as device_copy

    copies = []
    real = device_copy.to_device

    def counting(values, dtype, device):
        copies.append(dtype)
        return real(values, dtype, device)

    monkeypatch.setattr(device_copy, "to_device", counting)
    monkeypatch.setattr(sampler_module, "to_device", counting)
    kinds = ["top_k_top_p", "pure", "top_p", "top_k"]
    logits = torch.randn(len(kinds), VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    rows = make_rows(kinds)
    out = Sampler()(logits, rows)
    assert copies == [torch.float32, torch.int64]
    # The packed columns reach the kernel as they were given: same draws as one tensor per column.
    expected, _ = sample_reference(
        logits,
        torch.tensor([r.row.params.temperature for r in rows]),
        torch.tensor([r.row.params.top_k for r in rows], dtype=torch.int32),
        torch.tensor([r.row.params.top_p for r in rows]),
        torch.tensor([r.row.params.min_p or 0.0 for r in rows]),
        torch.tensor([r.seed for r in rows]),
        torch.tensor([r.offset for r in rows]),
        torch.zeros(len(rows), dtype=torch.bool),
    )
    assert out.token_ids == expected.tolist()


def test_to_device_rows_packs_columns_into_contiguous_rows():
    from tokenmill.engine.device_copy import to_device_rows

    a, b = to_device_rows(([1.5, 2.0, -3.0], [0.25, 0.5, 1.0]), torch.float32, "cpu")
    assert a.tolist() == [1.5, 2.0, -3.0] and b.tolist() == [0.25, 0.5, 1.0]
    assert a.is_contiguous() and b.is_contiguous() and a.dtype == torch.float32
    (empty,) = to_device_rows(([],), torch.int64, "cpu")
    assert empty.shape == (0,)


def test_rows_that_are_not_the_whole_logits_in_order_are_gathered_first():
    """A sub-batch or another order (beams, prompt-score rows beside the sampled ones): the sampler
    gathers its rows and leaves the step's logits as they were."""
    kinds = ["top_k", "greedy", "pure"]
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4)) * 2
    before = logits.clone()
    rows = make_rows(kinds)
    for row, index in zip(rows, (3, 0, 4)):
        row.logits_index = index
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    in_order = make_rows(kinds)
    expected = Sampler()(logits[[3, 0, 4]].clone(), in_order)
    assert out.token_ids == expected.token_ids
