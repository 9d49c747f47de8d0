"""Runs one flat batch of tokens from many sequences through the HF model over the paged KV cache."""

from __future__ import annotations

import torch

from tokenmill.engine.attention_backend import AttentionContext
from tokenmill.engine.prompt_logprobs import prompt_logits_indices
from tokenmill.engine.scheduler import ScheduledBatch


def kv_cache_shape(model_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder-only HF config."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    num_layers = cfg.num_hidden_layers
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return num_layers, num_kv_heads, head_dim


def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
    num_layers, num_kv_heads, head_dim = kv_cache_shape(model_config)
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    """Owns the KV cache tensors and turns a ScheduledBatch into next-token logits."""

    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        num_layers, num_kv_heads, head_dim = kv_cache_shape(model.config)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(num_layers)]

    def prepare_inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + num_new)
            if batch.samples(i):
                logits_indices.append(query_start_loc[-1] - 1)
        logits_indices.extend(prompt_logits_indices(batch))  # prompt_logprobs rows, after the sampled ones
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        dev = self.device
        ctx = AttentionContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),  # [num_tokens]
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),  # [num_seqs, max_blocks]
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),  # [num_seqs]
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),  # [num_seqs + 1]
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, num_tokens]
        pos = torch.tensor(positions, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, num_tokens]
        keep = torch.tensor(logits_indices, dtype=torch.int64, device=dev)  # [num_sampled + num_prompt_rows]
        return ids, pos, ctx, keep

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num_sampled, vocab] (float32) for the sequences that reach their last token.

        Requests with prompt_logprobs add rows after those (engine/prompt_logprobs.py)."""
        self.copy_blocks(batch.block_copies)
        ids, pos, ctx, keep = self.prepare_inputs(batch)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, tokenmill_context=ctx)
        return out.logits[0].float()  # [num_sampled (+ prompt rows), vocab]

    def profile_run(self, num_tokens: int) -> None:
        """A forward over one prompt of `num_tokens` dummy tokens (the cache must hold that many)."""
        bs = self.block_size
        num_blocks = -(-num_tokens // bs)
        dev = self.device
        ctx = AttentionContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev).unsqueeze(0),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        ids = torch.zeros((1, num_tokens), dtype=torch.int64, device=dev)
        pos = torch.arange(num_tokens, device=dev).unsqueeze(0)
        with torch.inference_mode():
            self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, tokenmill_context=ctx)
