"""One step's model inputs, built with numpy into persistent host buffers (pinned on CUDA) and
copied to persistent device buffers once per step.

Per-sequence block tables live in a persistent [rows, max_blocks] array: a sequence keeps its row
across steps and only the entries that changed since the last step are written (a decode step
writes one entry, or none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.engine.prompt_logprobs import prompt_logits_indices
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence


@dataclass
class StepShape:
    """What the host knows about a prepared step (all sizes are of the real, unpadded batch)."""

    num_seqs: int
    num_tokens: int
    num_sampled: int
    max_query_len: int
    max_seq_len: int

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


class BlockTableRows:
    """Persistent block tables: sequence id -> row of a [num_rows, max_blocks] int32 array.

    A row is rewritten from the first entry the step can have changed: a block table only grows,
    except copy-on-write, which replaces the block the step's first token lands in, and free /
    fork, which give the sequence a new list (then the whole row is rewritten).
    """

    def __init__(self, num_rows: int, max_blocks: int, block_size: int) -> None:
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int32)  # [num_rows, max_blocks]
        self.block_size = block_size
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.owner: list[int | None] = [None] * num_rows  # row -> seq_id
        self.source: list[list[int] | None] = [None] * num_rows  # row -> the block_table list written
        self.written: list[int] = [0] * num_rows  # row -> entries written
        self.free_rows = list(range(num_rows - 1, -1, -1))

    @property
    def max_blocks(self) -> int:
        return self.table.shape[1]

    def update(self, seqs: list[Sequence], starts: list[int]) -> np.ndarray:
        """Rows of `seqs` (int64 [num_seqs]) after bringing each up to date with its block_table."""
        rows = np.empty(len(seqs), dtype=np.int64)
        table_np, source, written, row_of = self.table, self.source, self.written, self.row_of
        max_blocks, bs = table_np.shape[1], self.block_size
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            row = row_of.get(seq.seq_id)
            if row is None:
                row = self._new_row(seq.seq_id, seqs)
            table = seq.block_table
            n = len(table)
            done = written[row]
            if source[row] is table and n >= done:
                first = done
                cow = start // bs  # copy-on-write replaces the block the step's first token lands in
                if cow < done and table[cow] != table_np[row, cow]:
                    first = cow
            else:
                first = 0
                source[row] = table
            if n > first:
                if n > max_blocks:
                    raise ValueError(f"sequence {seq.seq_id} holds {n} blocks: allowed at most {max_blocks}")
                table_np[row, first:n] = table[first:n]
            written[row] = n
            rows[i] = row
        return rows

    def _new_row(self, seq_id: int, seqs: list[Sequence]) -> int:
        if not self.free_rows:
            self._evict({s.seq_id for s in seqs})
        row = self.free_rows.pop()
        self.row_of[seq_id] = row
        self.owner[row] = seq_id
        self.source[row] = None
        self.written[row] = 0
        return row

    def _evict(self, live: set[int]) -> None:
        """Free the rows of sequences that are not in the current step (finished or waiting)."""
        for seq_id, row in list(self.row_of.items()):
            if seq_id not in live:
                del self.row_of[seq_id]
                self.owner[row] = None
                self.source[row] = None
                self.free_rows.append(row)
        if not self.free_rows:
            raise ValueError(f"a step holds more than {len(self.owner)} sequences")


def _buffers(max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device, pin: bool) -> dict[str, torch.Tensor]:
    def make(shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")

    return {
        "input_ids": make((max_tokens,), torch.int64),  # [max_tokens]
        "positions": make((max_tokens,), torch.int64),  # [max_tokens]
        "slot_mapping": make((max_tokens,), torch.int64),  # [max_tokens], -1: no write
        "seq_lens": make((max_seqs,), torch.int32),  # [max_seqs]
        "query_start_loc": make((max_seqs + 1,), torch.int32),  # [max_seqs + 1]
        "block_tables": make((max_seqs, max_blocks), torch.int32),  # [max_seqs, max_blocks]
        "logits_indices": make((max_tokens,), torch.int64),  # [<= max_tokens] rows whose logits are kept
    }


class InputBuffers:
    """Host buffers filled with numpy, device buffers filled by one non-blocking copy per field.

    On the CPU the two are the same tensors. The device buffers never move, so a captured CUDA
    graph can read their leading slices.
    """

    def __init__(
        self, *, max_num_tokens: int, max_num_seqs: int, max_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.max_num_tokens = max(max_num_tokens, max_num_seqs)
        self.max_num_seqs = max_num_seqs
        on_cuda = device.type == "cuda"
        self.host = _buffers(self.max_num_tokens, max_num_seqs, max_blocks, torch.device("cpu"), pin=on_cuda)
        self.dev = _buffers(self.max_num_tokens, max_num_seqs, max_blocks, device, pin=False) if on_cuda else self.host
        self.np = {name: t.numpy() for name, t in self.host.items()}
        # Rows for the running sequences plus as many again for preempted/waiting ones.
        self.tables = BlockTableRows(2 * max_num_seqs, max_blocks, block_size)
        self._copied: torch.cuda.Event | None = None  # the last host-to-device copy (pinned buffers reused)
        self.seq_arange = np.arange(self.max_num_tokens + 1, dtype=np.int64)

    def fits(self, batch: ScheduledBatch) -> bool:
        return len(batch.seqs) <= self.max_num_seqs and batch.num_tokens <= self.max_num_tokens

    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None) -> StepShape:
        """Fill the host buffers for `batch` and start their copy to the device. A decode step may
        be padded to `pad_to` sequences (see `pad_decode`)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the pinned buffers
        seqs = batch.seqs
        n = len(seqs)
        starts_list = [s.num_computed_tokens for s in seqs]
        starts = np.array(starts_list, dtype=np.int64)  # [n]
        nums = np.array(batch.num_new_tokens, dtype=np.int64)  # [n]
        ends = starts + nums  # [n]
        totals = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=n)  # [n]
        rows = self.tables.update(seqs, starts_list)  # [n]
        b = self.np
        qsl = b["query_start_loc"]
        qsl[0] = 0
        np.cumsum(nums, out=qsl[1 : n + 1])
        num_tokens = int(qsl[n])
        max_query_len = int(nums.max())
        positions = b["positions"][:num_tokens]
        if max_query_len == 1:  # decode: one token per sequence
            positions[:] = starts
            token_rows = rows
        else:
            seq_of_token = np.repeat(self.seq_arange[:n], nums)  # [T]
            positions[:] = self.seq_arange[:num_tokens] - np.repeat(qsl[:n] - starts, nums)
            token_rows = rows[seq_of_token]
        bs = self.block_size
        blocks = self.tables.table[token_rows, positions // bs]  # [T]
        np.add(blocks.astype(np.int64) * bs, positions % bs, out=b["slot_mapping"][:num_tokens])
        b["seq_lens"][:n] = ends
        width = self.tables.max_blocks
        np.take(self.tables.table, rows, axis=0, out=b["block_tables"][:n, :width])
        fill_input_ids(b["input_ids"], seqs, starts_list, batch.num_new_tokens)
        num_sampled = logits_indices(b["logits_indices"], qsl[1 : n + 1], ends, totals)
        prompt_rows = prompt_logits_indices(batch)  # prompt_logprobs rows, after the sampled ones
        if prompt_rows:
            b["logits_indices"][num_sampled : num_sampled + len(prompt_rows)] = prompt_rows
            num_sampled += len(prompt_rows)
        if pad_to is not None:
            self.pad_decode(n, pad_to)
        rows_copied = max(n, pad_to or 0)
        self._to_device(max(num_tokens, rows_copied), rows_copied, num_sampled)
        return StepShape(
            num_seqs=n, num_tokens=num_tokens, num_sampled=num_sampled,
            max_query_len=max_query_len, max_seq_len=int(ends.max()),
        )

    def pad_decode(self, num_real: int, num_padded: int) -> None:
        """Decode rows num_real..num_padded-1 become padding: token 0 at position 0, slot -1 (the
        cache is not written), one token of context in block 0 (read, result discarded)."""
        if num_padded > self.max_num_seqs:
            raise ValueError(f"num_padded={num_padded} is invalid: allowed at most {self.max_num_seqs}")
        b = self.np
        b["input_ids"][num_real:num_padded] = 0
        b["positions"][num_real:num_padded] = 0
        b["slot_mapping"][num_real:num_padded] = -1
        b["seq_lens"][num_real:num_padded] = 1
        b["query_start_loc"][num_real + 1 : num_padded + 1] = self.seq_arange[num_real + 1 : num_padded + 1]
        b["block_tables"][num_real:num_padded] = 0

    def prepare_padding(self, num_real: int, num_padded: int) -> None:
        """A step of padding rows only (CUDA graph capture, warm-up)."""
        if self._copied is not None:
            self._copied.synchronize()
        self.np["query_start_loc"][0] = 0
        self.pad_decode(num_real, num_padded)
        self._to_device(num_padded, num_padded, 0)

    def _to_device(self, num_tokens: int, num_seqs: int, num_sampled: int) -> None:
        if self.dev is self.host:
            return
        sizes = {
            "input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens, "seq_lens": num_seqs,
            "query_start_loc": num_seqs + 1, "block_tables": num_seqs, "logits_indices": num_sampled,
        }
        for name, size in sizes.items():
            self.dev[name][:size].copy_(self.host[name][:size], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()


def fill_input_ids(out: np.ndarray, seqs: list[Sequence], starts: list[int], nums: list[int]) -> None:
    """This step's token ids, flat, into `out` [>= num_tokens]. (The one place the input ids are
    written: a step that takes ids sampled on the device would hook in here.)"""
    if all(n == 1 for n in nums):
        out[: len(seqs)] = [s.token_ids[c] for s, c in zip(seqs, starts)]
        return
    flat: list[int] = []
    for seq, start, n in zip(seqs, starts, nums):
        flat.extend(seq.token_ids[start : start + n])
    out[: len(flat)] = flat


def logits_indices(out: np.ndarray, query_ends: np.ndarray, ends: np.ndarray, totals: np.ndarray) -> int:
    """Token rows whose logits are kept: each sequence that reaches its last token this step keeps
    its last row. Writes them to `out` and returns how many. (The one place that decides which
    rows of the hidden states reach the LM head.)"""
    keep = query_ends[ends == totals] - 1
    out[: len(keep)] = keep
    return len(keep)
