"""tokenmill: high-throughput batched text generation.

`LLM`, `SamplingParams`, `RequestOutput` and `CompletionOutput` are imported on first use, so
`import tokenmill` (and the CLI's --help) stays fast.
"""

import importlib

_EXPORTS = {
    "LLM": "tokenmill.engine.llm",
    "SamplingParams": "tokenmill.engine.sampling_params",
    "RequestOutput": "tokenmill.engine.outputs",
    "CompletionOutput": "tokenmill.engine.outputs",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
