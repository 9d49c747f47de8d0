"""How many streaming multiprocessors the kernels' launch heuristics may fill on a device."""

import functools

import torch

DEFAULT_SM_COUNT = 16  # without a CUDA device to ask (the interpreter): a few programs per row or sequence


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
