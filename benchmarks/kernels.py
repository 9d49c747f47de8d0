"""Kernel micro-benchmark: each per-token op, Triton vs its torch reference vs HF.

    python benchmarks/kernels.py                      # full grid
    python benchmarks/kernels.py --quick              # small sizes
    python benchmarks/kernels.py --ops sampling --batch 64 256 --vocab 128256 --json out.json
    OMP_NUM_THREADS=1 python benchmarks/kernels.py --ops top_p_sort --batch 64 --vocab 49152

On CUDA it times the Triton kernels, the torch references and what HF's
`generate()` does (sort-based TopK+TopP warpers + softmax + multinomial,
NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor), and paged
attention on decode shapes. Without CUDA it times the torch references and HF
only (the Triton interpreter is not a performance path). Prints a table with
ratios; never asserts on times.

Sampling ops: `sampling` (T=0.8, top_k 50, top_p 0.9), `sampling_pure` (T=1, no filter: the
OpenAI default) and `greedy` (triton: the kernel's greedy rows, what the engine runs on CUDA;
torch: argmax + logsumexp, the CPU path; hf: argmax). For each size they also print the passes the Triton kernel makes
over a row (measured by the kernel itself; on the CPU through the interpreter, on one row), the
bytes it moves per row (passes x vocab x 4) and the GB/s that makes at the timed speed: the
kernel's on CUDA, the torch path's on the CPU (there the bytes are one read of the logits, since
the torch path is not the kernel). `progs` is the programs the kernel runs per row: one by default;
on a GPU, small batches are also timed split over as many programs as fill the SMs (`split xN`),
and `--split N` times N programs per row instead of the default.

`top_p_sort` (not in the default grid) times the torch path on the CPU in CPU milliseconds (process
time) for `sampling` rows: top-p taken among the top-k values, as the path does now, against sorting
the whole row, as it did before (`full_sort_top_p=True`), alternating in one process; both draw the
same tokens (checked).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Pass counts come from the Triton interpreter; must be set before a kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenmill.kernels.ngram import ban_ngrams_reference, ban_ngrams_triton
from tokenmill.kernels.penalties import apply_penalties_reference, apply_penalties_triton
from tokenmill.kernels.sampling import (
    gpu_filling_split,
    greedy_reference,
    programs_per_row,
    sample_reference,
    sample_triton,
)

TOP_K, TOP_P, TEMPERATURE, NGRAM, REPETITION = 50, 0.9, 0.8, 3, 1.2


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def graph_time_ms(fn, warmup: int, iters: int, calls: int = 20) -> float:
    """Median GPU time of one `fn()` replayed from a CUDA graph of `calls` calls: what a step captured
    in a graph pays (no Python launch cost, unlike `time_ms`'s eager calls)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, torch.device("cuda"), 2, iters) / calls


SAMPLING_KINDS = {  # op -> (temperature, top_k, top_p, greedy)
    "sampling": (TEMPERATURE, TOP_K, TOP_P, False),
    "sampling_pure": (1.0, 0, 1.0, False),
    "greedy": (1.0, 0, 1.0, True),
}


def sampling_params(op, batch, device):
    temperature, top_k, top_p, greedy = SAMPLING_KINDS[op]
    return (
        torch.full((batch,), temperature, device=device),
        torch.full((batch,), top_k, dtype=torch.int32, device=device),
        torch.full((batch,), top_p, device=device),
        torch.zeros(batch, device=device),
        torch.arange(batch, dtype=torch.int64, device=device),
        torch.full((batch,), 1000, dtype=torch.int64, device=device),
        torch.full((batch,), greedy, dtype=torch.bool, device=device),
    )


def sampling_case(op, batch, vocab, device, split=None):
    logits = torch.randn(batch, vocab, device=device) * 3  # [B, V]
    params = sampling_params(op, batch, device)
    temperature, top_k, top_p, greedy = SAMPLING_KINDS[op]
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []

    def hf():
        if greedy:
            return logits.argmax(dim=-1)
        scores = logits
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)

    return {
        # The filters hint as the engine's sampler passes it (pure sampling skips both selects).
        "triton": lambda: sample_triton(logits, *params, split=split, filters=(top_k > 0, top_p < 1.0)),
        # Rows split over as many programs as fill the GPU (small batches): timed beside the default
        # (one program per row), so that a GPU run shows which of the two a batch size should take.
        "triton_split": lambda: sample_triton(logits, *params, split=gpu_filling_split(batch, vocab, logits.device),
                                              filters=(top_k > 0, top_p < 1.0)),
        "torch": (lambda: greedy_reference(logits)) if greedy else (lambda: sample_reference(logits, *params)),
        "hf": hf,
    }


def kernel_passes(op, vocab, device, programs) -> float:
    """Passes the Triton kernel makes over a row of this kind (elements read / vocab, over all the
    row's programs), as it counts them, with `programs` programs per row."""
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(1, vocab, generator=gen) * 3).to(device)
    _, _, passes = sample_triton(logits, *sampling_params(op, 1, device), return_passes=True, split=programs)
    return float(passes[0])


def history_case(batch, vocab, history_len, device):
    token_ids = torch.randint(0, vocab, (batch, history_len), device=device)  # [B, L]
    token_ids[:, -NGRAM:] = token_ids[:, :NGRAM]  # at least one repeated n-gram
    seq_lens = torch.full((batch,), history_len, device=device)
    logits = torch.randn(batch, vocab, device=device)  # [B, V]
    return logits, token_ids, seq_lens


def ngram_case(batch, vocab, device, history_len):
    logits, token_ids, seq_lens = history_case(batch, vocab, history_len, device)
    ngram_size = torch.full((batch,), NGRAM, dtype=torch.int32, device=device)
    processor = NoRepeatNGramLogitsProcessor(NGRAM)
    return {
        "triton": lambda: ban_ngrams_triton(logits, token_ids, seq_lens, ngram_size),
        "torch": lambda: ban_ngrams_reference(logits, token_ids, seq_lens, ngram_size),
        "hf": lambda: processor(token_ids, logits),
    }


def penalties_case(batch, vocab, device, history_len):
    logits, token_ids, seq_lens = history_case(batch, vocab, history_len, device)
    prompt_lens = seq_lens // 2
    rows = (
        torch.full((batch,), REPETITION, device=device),
        torch.full((batch,), 0.5, device=device),
        torch.full((batch,), 0.3, device=device),
    )
    processor = RepetitionPenaltyLogitsProcessor(REPETITION)
    args = (token_ids, prompt_lens, seq_lens, *rows)
    return {
        "triton": lambda: apply_penalties_triton(logits, *args),
        "torch": lambda: apply_penalties_reference(logits, *args),
        "hf": lambda: processor(token_ids, logits),
    }


def top_p_sort_rows(batches, vocabs, iters):
    """CPU ms per `sample_reference` call, top-p among the top-k values vs the full sort of the row."""
    cpu = torch.device("cpu")
    print(f"\n[top_p_sort] torch path on the CPU, {torch.get_num_threads()} thread(s), CPU ms per call "
          f"(process time, median of {iters}, the two alternating); T={TEMPERATURE} top_k={TOP_K} top_p={TOP_P}")
    print(f"{'batch':>6} {'vocab':>7} {'top-k window':>13} {'full sort':>10} {'ratio':>7}")
    rows = []
    for vocab in vocabs:
        for batch in batches:
            logits = torch.randn(batch, vocab) * 3  # [B, V]
            params = sampling_params("sampling", batch, cpu)
            calls = {"window": lambda: sample_reference(logits, *params),
                     "sort": lambda: sample_reference(logits, *params, full_sort_top_p=True)}
            if not torch.equal(calls["window"]()[0], calls["sort"]()[0]):
                raise AssertionError("the two paths drew different tokens")
            samples = {name: [] for name in calls}
            for _ in range(iters):
                for name, fn in calls.items():
                    begin = time.process_time()
                    fn()
                    samples[name].append((time.process_time() - begin) * 1e3)
            ms = {name: statistics.median(values) for name, values in samples.items()}
            print(f"{batch:>6} {vocab:>7} {ms['window']:>13.1f} {ms['sort']:>10.1f} {ms['sort'] / ms['window']:>6.1f}x")
            rows.append({"op": "top_p_sort", "batch": batch, "vocab": vocab,
                         "top_k_window_cpu_ms": ms["window"], "full_sort_cpu_ms": ms["sort"]})
    return rows


def attention_rows(batches, context, device, warmup, iters):
    """write_kv_cache + paged_attention on decode shapes (one new token per sequence)."""
    try:
        from tokenmill.kernels.attention import paged_attention, write_kv_cache
    except ImportError as error:
        print(f"\n[attention] skipped: tokenmill.kernels.attention not importable ({error})")
        return []
    num_q_heads, num_kv_heads, head_dim, block_size = 32, 8, 128, 16
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for batch in batches:
        blocks_per_seq = (context + block_size - 1) // block_size
        num_blocks = batch * blocks_per_seq
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
        query = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=dtype)  # [T, Hq, D]
        key = torch.randn(batch, num_kv_heads, head_dim, device=device, dtype=dtype)  # [T, Hkv, D]
        slot_mapping = (block_tables[:, -1].long() * block_size + (context - 1) % block_size)  # [T]
        scale = head_dim**-0.5
        write_ms = time_ms(lambda: write_kv_cache(key, key, k_cache, v_cache, slot_mapping), device, warmup, iters)
        attn_ms = time_ms(
            lambda: paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                    scale, 1, context),
            device, warmup, iters,
        )
        graph_ms = one_pass_ms = None
        splits = 1
        if device.type == "cuda":  # in a CUDA graph, as decode steps run: the automatic split and one pass
            from tokenmill.kernels.attention import decode_splits, paged_attention_triton

            splits = decode_splits(batch, num_kv_heads, device, context)
            graph_ms = graph_time_ms(
                lambda: paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, 1,
                                        context),
                warmup, iters,
            )
            one_pass_ms = graph_time_ms(
                lambda: paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                               scale, 1, context, num_splits=1),
                warmup, iters,
            )
        kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
        rows.append({
            "op": "paged_attention", "batch": batch, "context": context,
            "ms": attn_ms, "write_kv_ms": write_ms, "kv_gb_per_s": kv_bytes / attn_ms / 1e6,
            "splits": splits, "graph_ms": graph_ms, "one_pass_graph_ms": one_pass_ms,
        })
    print(f"\n[attention] decode, context {context}, {num_q_heads} q heads / {num_kv_heads} kv heads, "
          f"head_dim {head_dim}, block {block_size}, {dtype} ({'triton' if device.type == 'cuda' else 'torch'})")
    print(f"{'batch':>6} {'attn ms':>10} {'write ms':>10} {'KV GB/s':>10} {'splits':>7} {'graph ms':>10} "
          f"{'one pass graph ms':>18}")
    shown = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    for row in rows:
        print(f"{row['batch']:>6} {row['ms']:>10.4f} {row['write_kv_ms']:>10.4f} {row['kv_gb_per_s']:>10.1f} "
              f"{row['splits']:>7} {shown(row['graph_ms']):>10} {shown(row['one_pass_graph_ms']):>18}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_ops = [*SAMPLING_KINDS, "ngram", "penalties", "attention", "top_p_sort"]
    parser.add_argument("--ops", nargs="+", default=all_ops[:-1], choices=all_ops,
                        help="default: all but top_p_sort")
    parser.add_argument("--no-passes", action="store_true", help="skip counting the kernel's passes")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 16 64 256")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="default 32000 128256 151936")
    parser.add_argument("--history", type=int, default=1024, help="tokens of history (n-gram, penalties)")
    parser.add_argument("--context", type=int, default=1024, help="attention context length")
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF baselines")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--split", type=int, default=None,
                        help="sampling kernel programs per row (default: one)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = args.batch or ([1, 16] if args.quick else [1, 16, 64, 256])
    vocabs = args.vocab or ([32000] if args.quick else [32000, 128256, 151936])
    history = min(args.history, 256) if args.quick else args.history
    context = min(args.context, 256) if args.quick else args.context
    on_gpu = device.type == "cuda"
    iters = args.iters or (20 if on_gpu and not args.quick else 3)
    warmup = 3 if on_gpu else 1
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu (torch references and HF only)'}")
    print(f"sampling: T={TEMPERATURE} top_k={TOP_K} top_p={TOP_P}; n-gram n={NGRAM}, history {history}; "
          f"penalties: repetition {REPETITION} + presence/frequency, history {history}")

    impls = (["triton"] if on_gpu else []) + ["torch"] + ([] if args.no_hf else ["hf"])
    results = []

    def save() -> None:  # after every row: a run stopped at its time limit keeps what it measured
        if args.json:
            partial = args.json + ".partial"
            with open(partial, "w") as handle:
                json.dump({"device": str(device), "results": results}, handle, indent=2)
            os.replace(partial, args.json)  # a kill mid-write leaves the previous complete file
    header = f"{'op':<13} {'batch':>5} {'vocab':>7} " + " ".join(f"{name + ' ms':>10}" for name in impls)
    if on_gpu:
        header += f" {'torch/tri':>10}" + ("" if args.no_hf else f" {'hf/tri':>8}")
    elif not args.no_hf:
        header += f" {'hf/torch':>9}"
    header += f" {'progs':>5} {'passes':>7} {'MB/row':>7} {'GB/s':>7}"
    passes_cache: dict[tuple[str, int, int], float] = {}
    kernel_ops = [op for op in args.ops if op not in ("attention", "top_p_sort")]
    if kernel_ops:
        print("\n" + header)
    for op in kernel_ops:
        for vocab in vocabs:
            for batch in batches:
                if op in SAMPLING_KINDS:
                    fns = sampling_case(op, batch, vocab, device, args.split)
                elif op == "ngram":
                    fns = ngram_case(batch, vocab, device, history)
                else:
                    fns = penalties_case(batch, vocab, device, history)
                times = {name: time_ms(fns[name], device, warmup, iters) for name in impls}
                line = f"{op:<13} {batch:>5} {vocab:>7} " + " ".join(f"{times[n]:>10.4f}" for n in impls)
                if on_gpu:
                    line += f" {times['torch'] / times['triton']:>9.1f}x"
                    if not args.no_hf:
                        line += f" {times['hf'] / times['triton']:>7.1f}x"
                elif not args.no_hf:
                    line += f" {times['hf'] / times['torch']:>8.1f}x"
                extra = {}
                if op in SAMPLING_KINDS and not args.no_passes:
                    programs = programs_per_row(batch, vocab, device, args.split)
                    if (op, vocab, programs) not in passes_cache:
                        passes_cache[op, vocab, programs] = kernel_passes(op, vocab, device, programs)
                    passes = passes_cache[op, vocab, programs]
                    row_bytes = passes * vocab * 4  # float32 logits
                    timed_bytes = row_bytes if on_gpu else vocab * 4
                    gb_per_s = batch * timed_bytes / (times["triton" if on_gpu else "torch"] * 1e6)
                    extra = {"programs_per_row": programs, "passes": passes, "kernel_bytes_per_row": row_bytes,
                             "gb_per_s": gb_per_s}
                    line += f" {programs:>5} {passes:>7.2f} {row_bytes / 1e6:>7.2f} {gb_per_s:>7.1f}"
                    split = gpu_filling_split(batch, vocab, device)
                    if on_gpu and args.split is None and split > 1:  # the same rows split, for the policy
                        split_ms = time_ms(fns["triton_split"], device, warmup, iters)
                        extra.update(triton_split_ms=split_ms, split_programs=split,
                                     split_passes=kernel_passes(op, vocab, device, split))
                        line += f"  split x{split}: {split_ms:.4f} ms ({split_ms / times['triton']:.2f}x of one program)"
                print(line, flush=True)
                results.append({"op": op, "batch": batch, "vocab": vocab,
                                **{f"{name}_ms": value for name, value in times.items()}, **extra})
                save()
    if "top_p_sort" in args.ops:
        results += top_p_sort_rows(batches, vocabs, iters)
        save()
    if "attention" in args.ops:
        results += attention_rows([b for b in batches if b <= 64] or batches[:1], context, device, warmup, iters)
    save()
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
