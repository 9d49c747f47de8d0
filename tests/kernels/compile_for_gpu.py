"""Compile every Triton kernel for a GPU this machine does not have (sm_90, an H100/H200).

The CPU suite runs the kernels in Triton's interpreter, which accepts code that compiled Triton
rejects (a constexpr assigned twice in a static loop was one). Run as a script, without
TRITON_INTERPRET: the public launch functions are called on small CPU tensors with every kernel
replaced by a recorder, so the kernels, argument types, constexprs and launch options are exactly
the ones the wrappers use; then each distinct launch compiles ahead of time to a cubin with the
ptxas that ships with Triton. Prints one JSON line per launch: {"kernel", "ok", "error"}.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from tokenmill.kernels import attention, ngram, penalties, sampling  # noqa: E402

MODULES = (attention, ngram, penalties, sampling)
OPTION_NAMES = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion"}
TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel: JITFunction, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record(calls) -> list:
    """The launches that `calls()` makes, with every module's kernels replaced meanwhile."""
    launches: list = []
    originals = {(m, name): obj for m in MODULES for name, obj in vars(m).items() if isinstance(obj, JITFunction)}
    for (module, name), kernel in originals.items():
        setattr(module, name, Recorder(kernel, launches))
    try:
        calls()
    finally:
        for (module, name), kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def launch_types(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, as `triton.compile` takes them."""
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in OPTION_NAMES})
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = mangle_type(value)
    return signature, constexprs, options


def launches() -> list:
    g = torch.Generator().manual_seed(0)

    def sampling_calls():
        for batch, vocab in ((1, 128_256), (64, 32_000)):  # split rows, and one program per row
            logits = torch.randn(batch, vocab, generator=g)
            rows = dict(
                temperature=torch.full((batch,), 0.8), top_k=torch.full((batch,), 50, dtype=torch.int64),
                top_p=torch.full((batch,), 0.9), min_p=torch.zeros(batch), seeds=torch.arange(batch),
                offsets=torch.zeros(batch, dtype=torch.int64), greedy=torch.zeros(batch, dtype=torch.bool),
            )
            for filters in ((True, True), (False, False)):
                sampling.sample_triton(logits, *rows.values(), filters=filters, split=sampling.split_factor(batch, vocab, 132))

    def penalty_calls():
        logits = torch.randn(3, 1000, generator=g)
        history = torch.randint(0, 1000, (3, 40), generator=g)
        lens = torch.tensor([40, 30, 10], dtype=torch.int32)
        ones = torch.ones(3)
        penalties.apply_penalties_triton(logits, history, torch.tensor([5, 5, 5], dtype=torch.int32), lens,
                                         ones * 1.2, ones * 0.5, ones * 0.1)
        ngram.ban_ngrams_triton(logits, history, lens, torch.tensor([2, 3, 0], dtype=torch.int32))

    def attention_calls():
        for dtype, head_dim in ((torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 256)):
            k_cache = torch.zeros(8, 16, 2, head_dim, dtype=dtype)
            tables = torch.arange(8, dtype=torch.int32).view(2, 4)
            lens = torch.tensor([40, 17], dtype=torch.int32)
            for q_lens, window in (([1, 1], None), ([5, 17], 32)):
                starts = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
                query = torch.randn(sum(q_lens), 6, head_dim, generator=g).to(dtype)
                attention.paged_attention_triton(query, k_cache, k_cache, tables, lens, starts, head_dim ** -0.5,
                                                 max(q_lens), 40, sliding_window=window)
            new = torch.zeros(3, 2, head_dim, dtype=dtype)
            attention.write_kv_cache_triton(new, new, k_cache, k_cache, torch.tensor([0, 5, -1]))

    return record(lambda: (sampling_calls(), penalty_calls(), attention_calls()))


def main() -> int:
    seen, failed = set(), 0
    for kernel, args, kwargs in launches():
        signature, constexprs, options = launch_types(kernel, args, kwargs)
        key = repr((kernel.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                           options=options)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported per kernel
            error, failed = f"{type(exc).__name__}: {str(exc)[-1500:]}", failed + 1
        print(json.dumps({"kernel": kernel.__name__, "ok": error is None, "error": error}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
