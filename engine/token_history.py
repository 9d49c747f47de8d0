"""A sequence's token ids as a numpy array, converted a few ids at a time across steps.

Rows with penalties or n-gram bans hand their whole history to the kernels every step. Converting
each Python list from scratch (torch.as_tensor per row) took ~17 ms per step at 256 rows of ~750
tokens; keeping a growing int64 copy per row and converting only what is new makes the step's
padded [rows, max_len] matrix a memory copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# The engine only appends to a sequence's list, except at its end: an overlapped step appends a
# placeholder and later swaps it for the drawn token. The last ids are therefore copied again.
REFRESHED_TAIL = 2


class TokenHistory:
    """The int64 copy of one growing token list (`array()` brings it up to date)."""

    __slots__ = ("_buffer", "_converted")

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.int64)
        self._converted = 0

    def array(self, token_ids: Sequence[int]) -> np.ndarray:
        n = len(token_ids)
        if n > len(self._buffer):
            grown = np.empty(max(2 * len(self._buffer), n, 64), dtype=np.int64)
            grown[: self._converted] = self._buffer[: self._converted]
            self._buffer = grown
        start = max(0, min(self._converted, n) - REFRESHED_TAIL)
        self._buffer[start:n] = token_ids[start:n]
        self._converted = n
        return self._buffer[:n]


def padded_rows(rows: Sequence[Sequence[float]], fill: float = -1, dtype: type = np.int64) -> torch.Tensor:
    """[len(rows), longest] (at least one column), each row its values (a list or an array) then
    `fill`: token histories, banned ids, logit biases."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)
