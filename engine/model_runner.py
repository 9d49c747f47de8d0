"""Runs one flat batch of tokens from many sequences through the HF model over the paged KV cache."""

from __future__ import annotations

import torch

from tokenmill.engine.attention_backend import AttentionContext
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
        keep = torch.tensor(logits_indices, dtype=torch.int64, device=dev)  # [num_sampled]
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
        """Logits [num_sampled, vocab] (float32) for the sequences that reach their last token."""
        self.copy_blocks(batch.block_copies)
        ids, pos, ctx, keep = self.prepare_inputs(batch)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, tokenmill_context=ctx)
        return out.logits[0].float()  # [num_sampled, vocab]

    def profile_run(self, num_tokens: int, max_seq_len: int | None = None) -> None:
        """A forward over `num_tokens` dummy prompt tokens, the largest step the scheduler can make.

        The tokens are split into sequences no longer than the model's position limit or
        `max_seq_len` (max_model_len), so a model with fewer positions than the token budget
        (GPT-2: 1024 < 2048) is never fed a position it does not have.
        """
        bs = self.block_size
        lens = profile_seq_lens(num_tokens, min(filter(None, (position_limit(self.model.config), max_seq_len))), bs)
        blocks_per_seq = [-(-n // bs) for n in lens]
        max_blocks = max(blocks_per_seq)
        first_block = [sum(blocks_per_seq[:i]) for i in range(len(lens))]
        # Each sequence owns consecutive blocks (wrapping if the cache is small: the values are dummies).
        tables = [[(first + j) % self.num_blocks for j in range(max_blocks)] for first in first_block]
        positions = [p for n in lens for p in range(n)]
        slots = [tables[i][p // bs] * bs + p % bs for i, n in enumerate(lens) for p in range(n)]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        dev = self.device
        ctx = AttentionContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),  # [num_tokens]
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),  # [num_seqs, max_blocks]
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),  # [num_seqs]
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),  # [num_seqs + 1]
            max_query_len=max(lens),
            max_seq_len=max(lens),
        )
        ids = torch.zeros((1, num_tokens), dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, num_tokens]
        keep = torch.tensor(starts[1:], dtype=torch.int64, device=dev) - 1  # [num_seqs] last token of each
        with torch.inference_mode():
            self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, tokenmill_context=ctx)


def position_limit(model_config) -> int | None:
    """The model's own position limit (None when its config states none)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def profile_seq_lens(num_tokens: int, max_len: int, block_size: int) -> list[int]:
    """Lengths of the profiling sequences: `num_tokens` in all, none over `max_len`; full ones are
    whole blocks, so together they need no more blocks than one sequence of `num_tokens` would."""
    if num_tokens < 1 or max_len < 1:
        raise ValueError(f"num_tokens={num_tokens} and max_len={max_len} must be >= 1")
    chunk = max_len // block_size * block_size or max_len
    lens = [chunk] * (num_tokens // chunk)
    if num_tokens % chunk:
        lens.append(num_tokens % chunk)
    return lens
