"""Paged KV-cache write and paged attention: reference and Triton against a naive dense attention."""

import pytest
import torch

from tokenmill.kernels import attention as attn
from tokenmill.kernels import attention_reference as ref

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton runs compiled where there is a GPU, through the interpreter (conftest.py) otherwise.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cpu", seed=0, data_seed=None):
    """Random paged caches for sequences ``specs`` = [(q_len, seq_len), ...] on shuffled blocks.

    Every slot of the caches starts as garbage; only each sequence's positions are written, so a
    kernel reading a slot it should not read gives a wrong answer. ``data_seed``: other caches and
    queries over the same blocks (``seed`` places the blocks), as in another layer of one step.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in specs]
    num_blocks = sum(blocks_per_seq) + 3
    max_blocks = max(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, generator=gen)
    # Padding entries point at arbitrary (garbage-holding) blocks.
    block_tables = torch.randint(0, num_blocks, (len(specs), max_blocks), generator=gen, dtype=torch.int32)
    if data_seed is not None:
        gen = torch.Generator().manual_seed(1000 + data_seed)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) * 5
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen) * 5
    keys, values, next_block = [], [], 0
    for s, (q_len, seq_len) in enumerate(specs):
        table = order[next_block : next_block + blocks_per_seq[s]]
        next_block += blocks_per_seq[s]
        block_tables[s, : len(table)] = table.to(torch.int32)
        pos = torch.arange(seq_len)
        slots = table[pos // block_size] * block_size + pos % block_size  # [seq_len]
        seq_keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)  # [seq_len, Hkv, D]
        seq_values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = seq_keys
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = seq_values
        keys.append(seq_keys.to(dtype))
        values.append(seq_values.to(dtype))
    q_lens = [q_len for q_len, _ in specs]
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)  # [T, Hq, D]
    return dict(
        query=query.to(device),
        k_cache=k_cache.to(dtype).to(device),
        v_cache=v_cache.to(dtype).to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([seq_len for _, seq_len in specs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device),
        scale=head_dim**-0.5,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_len for _, seq_len in specs),
    ), (keys, values)


def naive_attention(batch, dense, sliding_window=None):
    """Dense causal attention per sequence, in float64, from the sequences' own keys/values."""
    keys, values = dense
    query = batch["query"].cpu().double()
    starts = batch["query_start_loc"].tolist()
    group = query.shape[1] // keys[0].shape[1]
    out = torch.zeros_like(query)
    for s, (seq_keys, seq_values) in enumerate(zip(keys, values)):
        q = query[starts[s] : starts[s + 1]]  # [q_len, Hq, D]
        k = seq_keys.double().repeat_interleave(group, 1)  # [L, Hq, D]
        v = seq_values.double().repeat_interleave(group, 1)
        seq_len, q_len = k.shape[0], q.shape[0]
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]  # [q_len, 1]
        k_pos = torch.arange(seq_len)[None, :]  # [1, L]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q, k) * batch["scale"]  # [Hq, q_len, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[starts[s] : starts[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


DECODE = [(1, 7), (1, 33), (1, 1), (1, 20)]
PREFILL = [(9, 9), (17, 17), (1, 1)]
MIXED = [(1, 40), (6, 23), (1, 5), (12, 12), (3, 35)]  # prefix in cache: q_len < seq_len
LAYOUTS = {"decode": DECODE, "prefill": PREFILL, "mixed": MIXED}


def check(out, batch, dense, dtype, sliding_window=None):
    expected = naive_attention(batch, dense, sliding_window)
    assert out.shape == batch["query"].shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_reference_matches_naive(layout, group, block_size):
    batch, dense = make_batch(LAYOUTS[layout], 2 * group, 2, 32, block_size, torch.float32)
    check(attn.paged_attention_reference(**batch), batch, dense, torch.float32)


def test_decode_chunks_bound_the_gathered_copy():
    """Sorted by length, every sequence in exactly one chunk, each chunk's copy within the budget
    (or MIN_DECODE_CHUNK sequences); a batch that fits keeps its order in one chunk."""
    lens = [700, 3, 650, 20, 1, 340, 333, 5, 900, 64]
    block_bytes = 16 * 8 * 128 * 4  # block_size 16, 8 kv heads, head_dim 128, float32
    budget_blocks = ref.DECODE_GATHER_BYTES * torch.get_num_threads() // block_bytes  # per thread
    chunks = ref.decode_chunks(list(range(len(lens))), lens, 16, block_bytes)
    assert sorted(s for chunk in chunks for s in chunk) == list(range(len(lens)))
    assert [lens[s] for chunk in chunks for s in chunk] == sorted(lens)
    assert len(chunks) > 1
    for chunk in chunks:
        gathered_blocks = len(chunk) * -(-max(lens[s] for s in chunk) // 16)
        assert gathered_blocks <= budget_blocks or len(chunk) <= ref.MIN_DECODE_CHUNK
    assert ref.decode_chunks([7, 1, 4], lens, 16, block_bytes) == [[7, 1, 4]]  # fits: as it came
    assert ref.decode_chunks([0, 8], lens, 16, 10**12) == [[0, 8]]  # at most MIN_DECODE_CHUNK: one chunk
    assert ref.decode_chunks([], lens, 16, block_bytes) == []


def test_reference_decode_lengths_far_apart(monkeypatch):
    """Decode sequences of very different lengths run in several chunks (a small budget forces
    chunks of MIN_DECODE_CHUNK): the same answer as one chunk and as the naive attention."""
    specs = [(1, n) for n in (700, 3, 650, 20, 1, 340, 333, 5)]
    batch, dense = make_batch(specs + [(5, 9)], 4, 2, 32, 16, torch.float32)
    one_chunk = attn.paged_attention_reference(**batch)
    monkeypatch.setattr(ref, "DECODE_GATHER_BYTES", 1)
    chunks = ref.plan_reference(batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 16,
                                block_bytes=batch["k_cache"][0].nbytes).decode
    assert len(chunks) == len(specs) // ref.MIN_DECODE_CHUNK
    chunked = attn.paged_attention_reference(**batch)
    check(chunked, batch, dense, torch.float32)
    torch.testing.assert_close(chunked, one_chunk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    batch, dense = make_batch(MIXED, 6, 2, 64, 16, dtype)
    check(attn.paged_attention_reference(**batch), batch, dense, dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [1, 4, 16])
def test_reference_sliding_window(layout, window):
    batch, dense = make_batch(LAYOUTS[layout], 4, 2, 32, 16, torch.float32)
    out = attn.paged_attention_reference(**batch, sliding_window=window)
    check(out, batch, dense, torch.float32, sliding_window=window)


def test_sliding_window_changes_the_answer():
    batch, dense = make_batch(MIXED, 4, 2, 32, 16, torch.float32)
    full = attn.paged_attention_reference(**batch)
    windowed = attn.paged_attention_reference(**batch, sliding_window=4)
    assert not torch.allclose(full, windowed)


def test_dispatch_on_cpu_is_reference():
    batch, _ = make_batch(MIXED, 4, 2, 32, 16, torch.float32)
    torch.testing.assert_close(attn.paged_attention(**batch), attn.paged_attention_reference(**batch), atol=0, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS) + ["far_apart"])
@pytest.mark.parametrize("window", [None, 4])
def test_step_plans_shared_by_layers_give_the_same_answer(layout, window):
    """One StepPlans serves every layer of a step: each layer's answer is the one it gets alone."""
    specs = [(1, n) for n in (700, 3, 650, 20, 1, 340)] + [(5, 9)] if layout == "far_apart" else LAYOUTS[layout]
    plans = attn.StepPlans()
    for layer_seed in range(3):  # layers: other caches and queries, the same sequences
        batch, dense = make_batch(specs, 4, 2, 32, 16, torch.float32, data_seed=layer_seed)
        plan = plans.attention(batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 16, window,
                               torch.float32)
        shared = attn.paged_attention_reference(**batch, sliding_window=window, plan=plan)
        assert torch.equal(shared, attn.paged_attention_reference(**batch, sliding_window=window))
        check(shared, batch, dense, torch.float32, sliding_window=window)
    assert len(plans._attention) == 1  # built by the first layer only


def test_step_plans_keep_windows_apart():
    """A model mixing windowed and full layers gets one plan per window, not the first layer's."""
    batch, dense = make_batch(MIXED, 4, 2, 32, 16, torch.float32)
    plans = attn.StepPlans()
    args = (batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], 16)
    full = attn.paged_attention_reference(**batch, plan=plans.attention(*args, None, torch.float32))
    windowed = attn.paged_attention_reference(**batch, sliding_window=4, plan=plans.attention(*args, 4, torch.float32))
    check(full, batch, dense, torch.float32)
    check(windowed, batch, dense, torch.float32, sliding_window=4)


def test_rejects_bad_head_counts():
    batch, _ = make_batch(DECODE, 4, 2, 32, 16, torch.float32)
    batch["query"] = batch["query"][:, :3]
    with pytest.raises(ValueError, match="num_heads=3"):
        attn.paged_attention_reference(**batch)


def write_case(seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 6, 4, 3, 24, 10
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)  # [T, Hkv, D]
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    tensors = [key, value, k_cache, v_cache, slots]
    return [t.to(device) for t in tensors]


def check_write(write, device="cpu", dtype=torch.float32):
    key, value, k_cache, v_cache, slots = write_case(dtype=dtype, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    write(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    kept = slots >= 0
    assert torch.equal(flat_k[slots[kept]], key[kept]) and torch.equal(flat_v[slots[kept]], value[kept])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots[kept]] = False
    assert torch.equal(flat_k[untouched], k_before.view_as(flat_k)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view_as(flat_v)[untouched])


def test_write_kv_cache_reference_skips_negative_slots():
    check_write(attn.write_kv_cache_reference)


def test_write_plan_shared_by_layers():
    """The write plan (rows kept, their slots) made once serves the keys and values of every layer."""
    plans = attn.StepPlans()
    slots = write_case(seed=0)[-1]
    for seed in range(2):
        key, value, k_cache, v_cache, _ = write_case(seed=seed)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        attn.write_kv_cache_reference(key, value, expected_k, expected_v, slots)
        attn.write_kv_cache_reference(key, value, k_cache, v_cache, slots, plans.write(slots))
        assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    check_write(lambda *args: attn.write_kv_cache_reference(*args, ref.plan_write(args[-1])))


def test_write_then_attend_prefill_then_decode():
    """Prefill writes a prompt, decode appends one token: same answer as attending to it all at once."""
    num_kv_heads, head_dim, block_size, prompt_len = 2, 32, 4, 10
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(prompt_len + 1, num_kv_heads, head_dim, generator=gen)
    values = torch.randn(prompt_len + 1, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(prompt_len + 1, 4, head_dim, generator=gen)
    k_cache = torch.zeros(5, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[3, 0, 4]], dtype=torch.int32)
    pos = torch.arange(prompt_len + 1)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    common = dict(k_cache=k_cache, v_cache=v_cache, block_tables=table, scale=0.2)
    attn.write_kv_cache(keys[:prompt_len], values[:prompt_len], k_cache, v_cache, slots[:prompt_len])
    prefill = attn.paged_attention(
        query[:prompt_len], seq_lens=torch.tensor([prompt_len], dtype=torch.int32),
        query_start_loc=torch.tensor([0, prompt_len], dtype=torch.int32),
        max_query_len=prompt_len, max_seq_len=prompt_len, **common,
    )
    attn.write_kv_cache(keys[prompt_len:], values[prompt_len:], k_cache, v_cache, slots[prompt_len:])
    decode = attn.paged_attention(
        query[prompt_len:], seq_lens=torch.tensor([prompt_len + 1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, max_seq_len=prompt_len + 1,
        **common,
    )
    full = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), keys.repeat_interleave(2, 1).transpose(0, 1),
        values.repeat_interleave(2, 1).transpose(0, 1), is_causal=True, scale=0.2,
    ).transpose(0, 1)  # [prompt_len + 1, Hq, D]
    torch.testing.assert_close(torch.cat([prefill, decode]), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Triton (interpreted without a GPU) against the naive attention and the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,group,block_size",
    [("decode", 1, 16), ("decode", 4, 1), ("prefill", 4, 16), ("prefill", 1, 32), ("mixed", 4, 32), ("mixed", 1, 16)],
)
def test_triton_matches_naive_and_reference(layout, group, block_size):
    batch, dense = make_batch(LAYOUTS[layout], 2 * group, 2, 32, block_size, torch.float32, TRITON_DEVICE)
    out = attn.paged_attention_triton(**batch)
    check(out, batch, dense, torch.float32)
    torch.testing.assert_close(out, attn.paged_attention_reference(**batch), atol=2e-5, rtol=2e-5)


def test_triton_float16():
    # bfloat16 runs only on a GPU (test_gpu_*): the interpreter's tl.dot multiplies bfloat16 bit
    # patterns (triton-lang/triton#11584).
    batch, dense = make_batch(MIXED, 6, 2, 64, 16, torch.float16, TRITON_DEVICE)
    check(attn.paged_attention_triton(**batch), batch, dense, torch.float16)


@pytest.mark.parametrize("layout,window", [("decode", 5), ("mixed", 1), ("mixed", 7)])
def test_triton_sliding_window(layout, window):
    batch, dense = make_batch(LAYOUTS[layout], 4, 2, 32, 4, torch.float32, TRITON_DEVICE)
    check(attn.paged_attention_triton(**batch, sliding_window=window), batch, dense, torch.float32, window)


def test_triton_head_dim_not_power_of_two():
    batch, dense = make_batch(MIXED[:3], 6, 2, 40, 16, torch.float32, TRITON_DEVICE)
    check(attn.paged_attention_triton(**batch), batch, dense, torch.float32)


def test_triton_group_not_power_of_two_and_strided_query():
    """SmolLM2's 9 query heads over 3 kv heads; the query is a view of a wider projection."""
    batch, dense = make_batch(MIXED, 9, 3, 16, 16, torch.float32, TRITON_DEVICE)
    wide = torch.randn(batch["query"].shape[0], 9, 32, device=TRITON_DEVICE)
    wide[..., :16] = batch["query"]
    batch["query"] = wide[..., :16]
    check(attn.paged_attention_triton(**batch), batch, dense, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_triton_skips_negative_slots(dtype):
    check_write(attn.write_kv_cache_triton, device=TRITON_DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# GPU (make gpu-check): compiled kernels on bigger shapes
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_LAYOUTS = {
    "decode": [(1, length) for length in (1, 15, 16, 17, 129, 600, 333, 64) * 4],
    "mixed": [(1, 600), (1, 1), (300, 300), (37, 512), (1, 257), (64, 65), (200, 480), (1, 33)],
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("window", [None, 300])
def test_gpu_split_decode_bf16_llama_heads(num_splits, window):
    """A 1B/8B Llama's heads in bfloat16 (the engine's default on CUDA), one and two streams of
    1000+ keys: every split count against the naive attention and one pass."""
    for specs in ([(1, 1300)], [(1, 1030), (1, 77)]):
        batch, dense = make_batch(specs, 32, 8, 128, 16, torch.bfloat16, "cuda")
        out = attn.paged_attention_triton(**batch, sliding_window=window, num_splits=num_splits)
        check(out, batch, dense, torch.bfloat16, window)
        one_pass = attn.paged_attention_triton(**batch, sliding_window=window, num_splits=1)
        torch.testing.assert_close(out, one_pass, atol=2 * TOLERANCE[torch.bfloat16], rtol=2 * TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@needs_cuda
def test_gpu_split_decode_replays_in_a_cuda_graph():
    """Captured once for a batch of 2 (as the engine captures decode buckets), replayed with other
    lengths and a padding row: the automatic split stays right."""
    batch, _ = make_batch([(1, 900), (1, 40)], 32, 8, 128, 16, torch.bfloat16, "cuda")
    static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    static["max_seq_len"] = static["block_tables"].shape[1] * 16  # the bound a compiled step passes
    assert attn.decode_splits(2, 8, torch.device("cuda"), static["max_seq_len"]) > 1
    run = lambda: attn.paged_attention_triton(**static)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seq_lens in ([900, 40], [17, 901], [1, 0]):
        static["seq_lens"].copy_(torch.tensor(seq_lens, dtype=torch.int32))
        graph.replay()
        expected = attn.paged_attention_triton(**{**static, "max_seq_len": max(seq_lens)}, num_splits=1)
        torch.testing.assert_close(out, expected, atol=2 * TOLERANCE[torch.bfloat16], rtol=2 * TOLERANCE[torch.bfloat16])
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the last replay's second row has no keys


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128), (16, 16, 128), (8, 2, 80), (4, 1, 256)])
@pytest.mark.parametrize("layout", sorted(GPU_LAYOUTS))
@pytest.mark.parametrize("block_size,window", [(16, None), (32, None), (16, 100)])
def test_gpu_paged_attention(dtype, heads, layout, block_size, window):
    num_heads, num_kv_heads, head_dim = heads
    batch, dense = make_batch(GPU_LAYOUTS[layout], num_heads, num_kv_heads, head_dim, block_size, dtype, "cuda")
    torch.cuda.set_sync_debug_mode("error")  # the CUDA path must not wait on the device
    try:
        out = attn.paged_attention(**batch, sliding_window=window)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(out, batch, dense, dtype, window)
    reference = attn.paged_attention_reference(**batch, sliding_window=window)
    tolerance = 2 * TOLERANCE[dtype]
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_write_kv_cache(dtype):
    check_write(attn.write_kv_cache, device="cuda", dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Split decode (flash-decoding): a decode step's keys over several programs per sequence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 2, 8])
@pytest.mark.parametrize("group,block_size,window", [(1, 16, None), (4, 1, None), (3, 4, 5)])
def test_triton_split_decode_matches_naive_and_one_pass(num_splits, group, block_size, window):
    """The splits' partial results merge into the one-pass answer; 8 splits of these short
    sequences leave some splits with no key at all."""
    specs = DECODE + [(1, 70)]
    batch, dense = make_batch(specs, 2 * group, 2, 32, block_size, torch.float32, TRITON_DEVICE)
    out = attn.paged_attention_triton(**batch, sliding_window=window, num_splits=num_splits)
    check(out, batch, dense, torch.float32, window)
    one_pass = attn.paged_attention_triton(**batch, sliding_window=window, num_splits=1)
    torch.testing.assert_close(out, one_pass, atol=2e-5, rtol=2e-5)


def test_triton_split_decode_float16_and_odd_head_dim():
    batch, dense = make_batch(DECODE, 9, 3, 40, 16, torch.float16, TRITON_DEVICE)
    check(attn.paged_attention_triton(**batch, num_splits=4), batch, dense, torch.float16)


def test_triton_split_decode_padding_rows_are_zero():
    """A padding sequence (one query, nothing cached) and a token row no sequence owns come out as
    zeros, as the one-pass kernel leaves them (CUDA graphs pad decode batches so)."""
    batch, dense = make_batch(DECODE, 4, 2, 32, 16, torch.float32, TRITON_DEVICE)
    real = attn.paged_attention_triton(**batch, num_splits=1)
    padded = dict(batch)
    device = batch["query"].device
    padded["query"] = torch.cat([batch["query"], torch.randn(2, *batch["query"].shape[1:], device=device)])
    padded["seq_lens"] = torch.cat([batch["seq_lens"], torch.zeros(1, dtype=torch.int32, device=device)])
    padded["block_tables"] = torch.cat([batch["block_tables"], batch["block_tables"][:1]])
    last = batch["query_start_loc"][-1:] + 1
    padded["query_start_loc"] = torch.cat([batch["query_start_loc"], last])
    for num_splits in (1, 4):
        out = attn.paged_attention_triton(**padded, num_splits=num_splits)
        torch.testing.assert_close(out[: len(real)], real, atol=2e-5, rtol=2e-5)
        assert torch.equal(out[len(real):], torch.zeros_like(out[len(real):]))


@pytest.mark.parametrize("num_splits", [0, 3])
def test_triton_split_count_must_be_a_power_of_two(num_splits):
    batch, _ = make_batch(DECODE, 4, 2, 32, 16, torch.float32, TRITON_DEVICE)
    with pytest.raises(ValueError, match=f"num_splits={num_splits}"):
        attn.paged_attention_triton(**batch, num_splits=num_splits)


@pytest.mark.parametrize("window", [None, 130])
def test_triton_sixteen_splits_over_long_sequences(window):
    """Every split holds several key blocks; a window wider than a block spans several splits."""
    specs = [(1, 1100), (1, 300), (1, 70)]
    batch, dense = make_batch(specs, 4, 2, 32, 16, torch.float32, TRITON_DEVICE)
    out = attn.paged_attention_triton(**batch, sliding_window=window, num_splits=16)
    check(out, batch, dense, torch.float32, window)


def test_decode_splits_fill_the_sms_from_the_batch_shape_only(monkeypatch):
    monkeypatch.setattr(attn, "_sm_count", lambda device: 132)  # an H100 / H200
    cpu = torch.device("cpu")
    assert attn.decode_splits(1, 8, cpu) == 16  # one stream of a 1B Llama: 128 programs, not 8
    assert attn.decode_splits(2, 8, cpu) == 8
    assert attn.decode_splits(8, 8, cpu) == 2
    assert attn.decode_splits(16, 8, cpu) == 1  # 128 programs already
    assert attn.decode_splits(256, 8, cpu) == 1
    assert attn.decode_splits(1, 1, cpu) == attn.MAX_DECODE_SPLITS
    # No more splits than key blocks of the longest sequence (a short context: mostly empty splits).
    assert attn.decode_splits(1, 8, cpu, max_seq_len=100) == 2
    assert attn.decode_splits(1, 8, cpu, max_seq_len=64) == 1
    assert attn.decode_splits(1, 8, cpu, max_seq_len=4096) == 16


def test_prefill_and_mixed_steps_ignore_the_split_count():
    batch, dense = make_batch(MIXED, 4, 2, 32, 16, torch.float32, TRITON_DEVICE)
    check(attn.paged_attention_triton(**batch, num_splits=8), batch, dense, torch.float32)
