"""Linear layers for the rows of a decode step on the CPU, on all of torch's threads.

A decode step multiplies one row per sequence by every weight matrix. With MKL (torch's CPU BLAS
on x86), `F.linear` on few rows is a slow shape: a one-row product runs on one thread, 2..8 rows
run the `x @ W.T` GEMM at about half the speed of the same product taken as `W @ x.T`, and up to
~64 rows a second thread adds little to it (BENCHMARKS.md, "Small decode batches: linear layers as
`W @ x.T` over the threads"). Here the same product is `W @ x.T` with W's output rows split into
one chunk per thread, as one `bmm`, which MKL runs a chunk per thread. No new kernel: the same float32
multiply-adds, summed over the input dimension in MKL's GEMM order instead of its GEMV order
(differences of a few float32 ulps; so a single stream's float32 results differ between 1 thread,
which keeps `F.linear` for one row, and 2+).

An engine switches the model it runs, also a model passed in (`LLM(loaded=...)`):
`restore_linear(model)` switches it back, as HF baselines and tensor-parallel engines do.

`use_small_rows_linear(model, num_threads)` switches a model's plain float32 `nn.Linear` layers
(not the quantized ones) in place; larger row counts (prefill), other dtypes and devices keep
`F.linear`. A compiled forward calls the same choice through one custom op per layer
(`tokenmill::cpu_linear`), made when the graph runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine.library_ops import define_op

# Rows up to which `W @ x.T` beats `F.linear` (measured on MKL; BENCHMARKS.md): on one thread, a
# few rows; split over 2+ threads, also the 9-64 rows of a batched decode step, where MKL's
# `x @ W.T` gains little from the second thread (all linear layers of a step at 2 threads: the
# split 1.15-1.49x at 8-64 rows, 1.07x at 128, even at 256).
MAX_SMALL_ROWS = 8
MAX_SPLIT_ROWS = 64


def small_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      num_chunks: int) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as `W @ x.T`, W's rows split in `num_chunks` (one bmm).

    x: [..., K] float32 with few rows; weight: [N, K] contiguous, N divisible by num_chunks.
    """
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k)  # [M, K]; taken as [K, M] with strides (1, K): MKL's fast layout here
    m = rows.shape[0]
    out = torch.bmm(weight.view(num_chunks, n // num_chunks, k), rows.t().expand(num_chunks, k, m))  # [C, N/C, M]
    if m > 1:
        out = out.view(n, m).t().contiguous()  # [M, N]
    out = out.view(*x.shape[:-1], n)  # one row: [C, N/C, 1] is already the row's N outputs in order
    if bias is not None:
        out += bias
    return out


def use_small_rows(rows: int, num_threads: int) -> bool:
    """Whether `rows` rows take the `W @ x.T` path with this many threads."""
    if num_threads >= 2:
        return 1 <= rows <= MAX_SPLIT_ROWS
    return 2 <= rows <= MAX_SMALL_ROWS  # one row on one thread: MKL's GEMV is as fast


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_threads: int) -> torch.Tensor:
    """`F.linear`, or `small_rows_linear` when `x` has few enough rows (float32 on the CPU)."""
    if x.shape[-1] and use_small_rows(x.numel() // x.shape[-1], num_threads) and weight.is_contiguous():
        return small_rows_linear(x, weight, bias, chunks_for(weight.shape[0], num_threads))
    return F.linear(x, weight, bias)


# A compiled forward calls the same choice as one opaque op: the row count of a compiled graph is
# symbolic (one graph serves every decode bucket), so the choice is made when the graph runs.
cpu_linear_op = define_op(
    "cpu_linear", "(Tensor x, Tensor weight, Tensor? bias, SymInt num_threads) -> Tensor",
    lambda x, weight, bias, num_threads: cpu_linear(x, weight, bias, num_threads),
    lambda x, weight, bias, num_threads: x.new_empty((*x.shape[:-1], weight.shape[0])),
    dispatch_key="CPU",
)


class SmallRowsLinear(nn.Linear):
    """An `nn.Linear` whose forward takes `small_rows_linear` for a few float32 rows on the CPU."""

    num_threads: int = 1  # torch's threads when the layer was switched: the chunks W splits into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, w, self.bias)
        if torch.compiler.is_compiling():
            return cpu_linear_op(x, w, self.bias, self.num_threads)
        return cpu_linear(x, w, self.bias, self.num_threads)


def chunks_for(out_features: int, num_threads: int) -> int:
    """One chunk per thread when the output rows split evenly; else one chunk (also for a layer
    resized after it was switched: a tensor-parallel shard)."""
    return num_threads if num_threads > 1 and out_features % num_threads == 0 else 1


def use_small_rows_linear(model: nn.Module, num_threads: int) -> int:
    """Switch the model's plain float32 CPU `nn.Linear` layers to SmallRowsLinear; returns how many.

    Only where torch's BLAS is MKL (the measured case). Weights stay where they are, unchanged.
    """
    if not torch.backends.mkl.is_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, SmallRowsLinear):
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not w.is_contiguous():
            continue
        module.__class__ = SmallRowsLinear
        module.num_threads = num_threads
        switched += 1
    return switched


def restore_linear(model: nn.Module) -> int:
    """Undo `use_small_rows_linear` (for side-by-side measurements); returns how many layers."""
    restored = 0
    for module in model.modules():
        if type(module) is SmallRowsLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("num_threads", None)
            restored += 1
    return restored
