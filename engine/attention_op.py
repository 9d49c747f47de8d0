"""The paged-attention step as one `torch.library` op (engine/library_ops.py), so `torch.compile` sees the whole
model forward as one graph: the op is opaque to the compiler (it mutates the KV caches and runs
the torch reference on the CPU or the Triton kernels on CUDA through kernels.attention's public
functions), and its fake implementation gives the output shape.

Eager runs call `paged_attention_step` directly (no dispatcher overhead); a traced forward
goes through the op.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from tokenmill.engine.library_ops import define_op
from tokenmill.kernels.attention import StepPlans, paged_attention, write_kv_cache

# A compiled CPU step's plans: set around the compiled forward (`shared_step_plans`) and read by the
# op's layers, so the 30 layers of a step plan once, as an eager step does. Per thread: each engine
# runs its steps in one thread.
_step = threading.local()


@contextmanager
def shared_step_plans() -> Iterator[StepPlans]:
    """Within: the custom op's CPU layers share one fresh StepPlans (one compiled step)."""
    previous = getattr(_step, "plans", None)
    _step.plans = StepPlans()
    try:
        yield _step.plans
    finally:
        _step.plans = previous


def paged_attention_step(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, < 0: do not write (padding)
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,  # <= 0: not known on the host (a bound is used)
    sliding_window: int,  # <= 0: none
    plans: StepPlans | None = None,  # eager CPU steps: what every layer of the step shares
) -> torch.Tensor:
    """Write this step's keys/values into the caches, then attend; returns [T, Hq, D]."""
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping, plans)
    if max_seq_len <= 0:
        # A compiled step does not carry the (changing) longest length as a constant. The CPU
        # reads it (no device to wait for); on CUDA the table width bounds it without a sync.
        if query.is_cuda:
            max_seq_len = block_tables.shape[1] * k_cache.shape[1]
        else:
            max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    return paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        max_query_len, max_seq_len, sliding_window=sliding_window if sliding_window > 0 else None, plans=plans,
    )


def _paged_attention_step_impl(query, key, value, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                               query_start_loc, scale, max_query_len, max_seq_len, sliding_window):
    return paged_attention_step(
        query.contiguous(), key.contiguous(), value.contiguous(), k_cache, v_cache, slot_mapping,
        block_tables, seq_lens, query_start_loc, scale, max_query_len, max_seq_len, sliding_window,
        plans=None if query.is_cuda else getattr(_step, "plans", None),
    )


def _paged_attention_step_fake(query, key, value, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                               query_start_loc, scale, max_query_len, max_seq_len, sliding_window):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


# The schema marks the two caches as written in place.
paged_attention_step_op = define_op(
    "paged_attention_step",
    "(Tensor query, Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
    "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, float scale, SymInt max_query_len, "
    "SymInt max_seq_len, SymInt sliding_window) -> Tensor",
    _paged_attention_step_impl, _paged_attention_step_fake,
)


def attention_step(*args, plans: StepPlans | None = None) -> torch.Tensor:
    """`paged_attention_step` through the custom op when traced by torch.compile (the plans are not
    an argument: a compiled graph serves many steps; see `shared_step_plans`), directly otherwise."""
    if torch.compiler.is_compiling():
        return paged_attention_step_op(*args)
    return paged_attention_step(*args, plans=plans)
