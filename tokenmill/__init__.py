"""tokenmill: high-throughput batched text generation."""

from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
