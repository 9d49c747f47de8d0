"""Runs one flat batch of tokens from many sequences through the HF model over the paged KV cache.

The step is: copy-on-write block copies, input preparation (engine/input_buffers.py), the forward
(eager, or a compiled / CUDA-graph decode bucket from engine/compiled_forward.py), and the logits
of the rows that sample.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.engine.attention_backend import AttentionContext
from tokenmill.engine.compiled_forward import DecodeGraphs
from tokenmill.engine.device_copy import to_device_rows
from tokenmill.engine.input_buffers import InputBuffers, StepShape
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.kernels.attention import StepPlans

logger = logging.getLogger(__name__)


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


def resolve_enforce_eager(enforce_eager: bool | None, device: torch.device) -> bool:
    """None means the device's default: compiled forward with CUDA graphs on CUDA, eager on the CPU
    (measured in BENCHMARKS.md: on a small CPU the compile time is not won back)."""
    if enforce_eager is None:
        return device.type != "cuda"
    return bool(enforce_eager)


class ModelRunner:
    """Owns the KV cache tensors and the step's input buffers; turns a ScheduledBatch into next-token logits.

    `enforce_eager=False` runs pure-decode steps through the compiled forward (CUDA graphs on
    CUDA once `capture_graphs` ran); prefill and mixed steps always run eager.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
    ) -> None:
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
        # A sequence holds at most max_model_len tokens, and never more blocks than the cache has.
        self.max_blocks = min(num_blocks, -(-max_model_len // block_size)) if max_model_len else num_blocks
        self.enforce_eager = enforce_eager
        self._make_buffers(max_num_seqs, max_num_batched_tokens)

    def _make_buffers(self, max_num_seqs: int, max_num_tokens: int) -> None:
        self.buffers = InputBuffers(
            max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs, max_blocks=self.max_blocks,
            block_size=self.block_size, device=self.device,
        )
        self.decode_graphs = (
            None if self.enforce_eager
            else DecodeGraphs(self.model, self.buffers, self.k_caches, self.v_caches, max_num_seqs)
        )

    def capture_graphs(self, buckets: list[int] | None = None) -> None:
        """Capture the decode buckets' CUDA graphs (CUDA, not enforce_eager)."""
        if self.decode_graphs is not None and self.device.type == "cuda":
            self.decode_graphs.capture(buckets)

    def profile_graph_memory(self) -> int:
        """Bytes the decode CUDA graphs hold, measured by capturing the largest bucket (the others
        share its memory pool); 0 when graphs are off. Called on the KV-sizing probe."""
        if self.decode_graphs is None or self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved(self.device)
        buckets = self.decode_graphs.buckets
        self.decode_graphs.capture([buckets[-1]])
        used = torch.cuda.memory_reserved(self.device) - before
        logits_row = self.decode_graphs.graphs[buckets[-1]][1][0].nbytes  # one row of a graph's output
        self.decode_graphs.graphs.clear()
        # The smaller buckets' graphs mostly reuse the pool (a quarter on top), but each keeps its
        # own output logits alive: [bucket, vocab] apiece (buckets up to 256 add up to ~4.2k rows,
        # ~1.1 GB in bf16 at a 128k vocabulary).
        return int(used * 1.25) + sum(buckets[:-1]) * logits_row

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src, dst = to_device_rows(([c[0] for c in copies], [c[1] for c in copies]), torch.int64, self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def prepare_inputs(self, batch: ScheduledBatch) -> tuple[StepShape, int | None]:
        """Fill the input buffers for `batch`; the decode bucket it is padded to (None: eager)."""
        if not self.buffers.fits(batch):  # bigger than configured: new buffers (and graphs) for it
            logger.warning("step of %d sequences / %d tokens outgrows the input buffers", len(batch.seqs), batch.num_tokens)
            self._make_buffers(max(len(batch.seqs), self.buffers.max_num_seqs), max(batch.num_tokens, self.buffers.max_num_tokens))
        graphs = self.decode_graphs
        bucket = graphs.bucket_for(len(batch.seqs), batch.num_tokens) if graphs is not None else None
        shape = self.buffers.prepare(batch, pad_to=bucket)
        # Overlapped steps: placeholders take the previous step's sampled ids, on the device.
        batch.fill_pending_input_ids(self.buffers.dev["input_ids"][: shape.num_tokens])
        return shape, bucket

    def _eager_context(self, shape: StepShape) -> AttentionContext:
        dev = self.buffers.dev
        n, t = shape.num_seqs, shape.num_tokens
        return AttentionContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=dev["slot_mapping"][:t],  # [num_tokens]
            block_tables=dev["block_tables"][:n],  # [num_seqs, max_blocks]
            seq_lens=dev["seq_lens"][:n],  # [num_seqs]
            query_start_loc=dev["query_start_loc"][: n + 1],  # [num_seqs + 1]
            max_query_len=shape.max_query_len,
            max_seq_len=shape.max_seq_len,
            plans=None if self.device.type == "cuda" else StepPlans(),  # fresh each step
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [num_sampled, vocab] (float32) for the sequences that reach their last token.

        Requests with prompt_logprobs add rows after those (engine/prompt_logprobs.py)."""
        self.copy_blocks(batch.block_copies)
        shape, bucket = self.prepare_inputs(batch)
        keep = self.buffers.dev["logits_indices"][: shape.num_sampled]  # [num_sampled (+ prompt rows)]
        if bucket is not None:
            logits = self.decode_graphs.run(bucket)  # [bucket, vocab]; padding rows are never kept
            return logits.index_select(0, keep).float()
        dev, t = self.buffers.dev, shape.num_tokens
        ids = dev["input_ids"][:t].unsqueeze(0)  # [1, num_tokens]
        pos = dev["positions"][:t].unsqueeze(0)  # [1, num_tokens]
        ctx = self._eager_context(shape)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, tokenmill_context=ctx)
        return out.logits[0].float()  # [num_sampled (+ prompt rows), vocab]

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
