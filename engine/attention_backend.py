"""tokenmill's attention inside HF models: registered with transformers' AttentionInterface.

The model is loaded with `attn_implementation="tokenmill"`; every attention layer then calls
`paged_attention_forward`, which writes the step's keys/values into the paged cache and attends
over each sequence's blocks. The step's metadata reaches it as the `tokenmill_context` keyword
that the model forward passes down to attention. The work is one custom op (engine/attention_op.py),
so a compiled forward traces the whole model without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from tokenmill.engine.attention_op import attention_step
from tokenmill.kernels.attention import StepPlans

ATTN_IMPLEMENTATION = "tokenmill"


@dataclass
class AttentionContext:
    k_caches: list[torch.Tensor]  # per layer: [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int  # <= 0: not known on the host (compiled decode; attention bounds it)
    plans: StepPlans | None = None  # an eager CPU step's layer-independent attention work, built once


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    tokenmill_context: AttentionContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    ctx = tokenmill_context
    if ctx is None:
        raise RuntimeError("tokenmill attention called without a tokenmill_context (run the model through ModelRunner)")
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    out = attention_step(
        q, k, v, ctx.k_caches[layer], ctx.v_caches[layer], ctx.slot_mapping, ctx.block_tables, ctx.seq_lens,
        ctx.query_start_loc, float(scaling), ctx.max_query_len, ctx.max_seq_len, sliding_window or 0,
        plans=ctx.plans,
    )  # [num_tokens, num_heads, head_dim]
    return out.unsqueeze(0), None  # [1, num_tokens, num_heads, head_dim]


def register_attention() -> str:
    """Make `attn_implementation="tokenmill"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
