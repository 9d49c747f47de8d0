"""tokenmill: high-throughput batched text generation.

`LLM`, `SamplingParams`, `RequestOutput` and `CompletionOutput` are imported on first use, so
`import tokenmill` (and the CLI's --help) stays fast.
"""

import importlib
import os

# From a plain checkout (repository root on sys.path, nothing installed), `tokenmill.kernels`,
# `tokenmill.engine` and `tokenmill.serve` are the root's kernels/, engine/ and serve/ folders: the
# root joins the package's search path. An installed copy maps them through setup.py instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "engine", "llm_engine.py")) and _ROOT not in __path__:
    __path__.append(_ROOT)

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
