"""Test-wide set-up: Triton kernels run through the interpreter when there is no GPU."""

import os

import torch

# Must happen before any module that defines a Triton kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
