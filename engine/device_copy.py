"""Small host values onto the device without stopping the host.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory, which waits for every
kernel queued on the stream: one such call in the sampler would make the host wait for the
step's forward and undo overlapped steps. Staged in pinned memory and copied non-blocking, the
copy is queued behind the forward instead. On the CPU these are plain tensors.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` with no host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_device_rows(rows: Sequence[Sequence[Any]], dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Several equal-length host lists of one dtype on the device in one copy: one 1-D tensor per
    list, each a contiguous row of one packed [len(rows), n] tensor (one pinned staging buffer and
    one transfer on CUDA instead of one per list)."""
    return to_device([list(r) for r in rows], dtype, device).unbind(0)


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device`, with no host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy into pinned host memory, started now and waited for on first read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            self._host, self._ready = tensor, None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host
