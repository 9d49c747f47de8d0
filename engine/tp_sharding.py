"""Shard an HF decoder over tensor-parallel ranks with the model's own transformers tensor-parallel plan.

Transformers 5 ships a plan per architecture (`config.base_model_tp_plan`, e.g. Llama's
`"layers.*.self_attn.q_proj": "colwise"`, `"layers.*.self_attn.o_proj": "rowwise"`). Its own
`from_pretrained(tp_plan="auto")` turns the weights into DTensors; here the same plan is applied with
plain slicing, so every rank keeps ordinary tensors and the model's ordinary forward:

- colwise: a Linear keeps rows [rank * out / N, (rank + 1) * out / N) of its weight (and bias): the
  layer computes its share of heads / MLP features from the full hidden state.
- packed_colwise: a fused gate_up Linear; each packed half is split the same way.
- rowwise: a Linear keeps the matching columns of its weight; its partial outputs are summed over
  the ranks by an all-reduce (a forward hook), and the bias is added on rank 0 only.
- the LM head, where the model's own plan says `colwise_gather_output` (Llama, Qwen2, Mistral...):
  each rank keeps 1/N of the vocabulary's rows (the last shard padded with zero rows to an equal
  size) and computes those logits; an all-gather puts the full rows together on every rank. A tied
  head gets its own copy of its shard, so the input embedding stays whole.
- embeddings and norms stay replicated (each rank holds them whole), as does an LM head the plan
  does not shard.

Attention layers infer their head count from the projection's output (`view(..., -1, head_dim)`),
so after slicing they see their local heads; the config's head counts are then set to the local
counts so the paged KV cache of each rank holds only its own KV heads.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.distributed as dist

SHARDED_STYLES = ("colwise", "rowwise", "packed_colwise")
# Styles that act on modules tokenmill keeps whole on every rank (embeddings, LM head, norms).
REPLICATED_STYLES = ("colwise_gather_output", "embedding_rowwise", "replicated_with_grad_allreduce", "default")


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tp_plan(config: Any) -> dict[str, str]:
    """The architecture's base-model tensor-parallel plan ({} when transformers ships none)."""
    return dict(getattr(text_config(config), "base_model_tp_plan", None) or {})


def check_tensor_parallel(config: Any, tensor_parallel_size: int) -> None:
    """Raise a ValueError naming the problem when `config`'s model cannot be split over that many ranks."""
    if tensor_parallel_size == 1:
        return
    cfg = text_config(config)
    arch = type(cfg).__name__.removesuffix("Config")
    plan = tp_plan(config)
    if not plan:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} is invalid for {arch}: transformers ships no "
            "tensor-parallel plan (base_model_tp_plan) for it; allowed tensor_parallel_size=1"
        )
    unknown = sorted({s for s in plan.values() if s not in SHARDED_STYLES + REPLICATED_STYLES})
    if unknown:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} is invalid for {arch}: its plan uses the styles "
            f"{unknown}, which tokenmill does not shard (supported: {', '.join(SHARDED_STYLES)}); allowed 1"
        )
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    sizes = {"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
             "intermediate_size": getattr(cfg, "intermediate_size", 0) or 0}
    for name, value in sizes.items():
        if value % tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} is invalid for {arch}: {name}={value} is not "
                "divisible by it; allowed a divisor of the attention and KV head counts"
            )


def shard_model(model: torch.nn.Module, rank: int, world_size: int, group: Any = None) -> int:
    """Slice `model` in place to rank `rank`'s share; returns how many Linear layers were split."""
    check_tensor_parallel(model.config, world_size)
    if world_size == 1:
        return 0
    plan = tp_plan(model.config)
    base = getattr(model, "base_model_prefix", "model")
    base_model = getattr(model, base, model)
    num_split = 0
    for name, module in base_model.named_modules():
        style = _style_for(name, plan)
        if style is None or style in REPLICATED_STYLES:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"tensor-parallel plan style {style!r} on {name} ({type(module).__name__}): "
                             "allowed only on nn.Linear layers")
        if style == "colwise":
            _keep_rows(module, rank, world_size, packed=1)
        elif style == "packed_colwise":
            _keep_rows(module, rank, world_size, packed=2)
        else:
            _keep_columns(module, rank, world_size, group)
        num_split += 1
    num_split += _shard_lm_head(model, rank, world_size, group)
    cfg = text_config(model.config)
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    cfg.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    cfg.num_attention_heads = num_heads // world_size
    cfg.num_key_value_heads = num_kv_heads // world_size
    return num_split


def _style_for(name: str, plan: dict[str, str]) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _keep_rows(linear: torch.nn.Linear, rank: int, world_size: int, packed: int) -> None:
    # weight: [out, in] -> [out / N, in]; a packed weight [packed * out, in] keeps its share of each part.
    def share(t: torch.Tensor) -> torch.Tensor:
        parts = t.chunk(packed, dim=0)
        return torch.cat([p.chunk(world_size, dim=0)[rank] for p in parts], dim=0).contiguous()

    with torch.no_grad():
        linear.weight = torch.nn.Parameter(share(linear.weight.data), requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(share(linear.bias.data), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _keep_columns(linear: torch.nn.Linear, rank: int, world_size: int, group: Any) -> None:
    # weight: [out, in] -> [out, in / N]; the N partial outputs are summed by an all-reduce.
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.data.chunk(world_size, dim=1)[rank].contiguous(),
                                           requires_grad=False)
        if linear.bias is not None and rank != 0:
            linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = linear.weight.shape[1]
    linear.register_forward_hook(_all_reduce_hook(group))


def _shard_lm_head(model: torch.nn.Module, rank: int, world_size: int, group: Any) -> int:
    """Split the LM head over the vocabulary (1 when done, 0 when it stays whole)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    style = (getattr(model, "_tp_plan", None) or {}).get("lm_head")
    if style != "colwise_gather_output" or type(head) is not torch.nn.Linear:  # a quantized head stays whole
        return 0
    vocab = head.out_features
    shard = -(-vocab // world_size)
    start, stop = min(vocab, rank * shard), min(vocab, (rank + 1) * shard)
    with torch.no_grad():
        weight = torch.zeros(shard, head.in_features, dtype=head.weight.dtype, device=head.weight.device)
        weight[: stop - start] = head.weight[start:stop]  # [vocab / N, hidden]; a copy, untied
        local = torch.nn.Linear(head.in_features, shard, bias=head.bias is not None,
                                dtype=head.weight.dtype, device=head.weight.device)
        local.weight = torch.nn.Parameter(weight, requires_grad=False)
        if head.bias is not None:
            bias = torch.zeros(shard, dtype=head.bias.dtype, device=head.bias.device)
            bias[: stop - start] = head.bias[start:stop]
            local.bias = torch.nn.Parameter(bias, requires_grad=False)
    local.register_forward_hook(_gather_vocab_hook(group, world_size, vocab))
    model.set_output_embeddings(local)
    return 1


def _gather_vocab_hook(group: Any, world_size: int, vocab: int):
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(output) for _ in range(world_size)]
        dist.all_gather(parts, output.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]  # [..., vocab]: the padding rows dropped

    return hook


def _all_reduce_hook(group: Any):
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook
