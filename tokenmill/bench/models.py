"""Models for the offline benchmark: one set of weights shared by tokenmill and transformers.

The model is loaded once with tokenmill's attention; `attention(model, "sdpa")` switches it to
HF's own attention for the transformers runs and back afterwards, so every backend runs the
same weights in the same process. `--random-model` builds random-weight Llamas from a config
(for machines without the model file); their prompts are token ids, so a stub tokenizer that
only decodes ids to digits stands in for a real one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

RANDOM_MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M's shape.
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    # Llama-3.2-1B's shape (~1.2B parameters).
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    # A toy shape for quick functional runs and tests.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024,
    ),
}
RANDOM_MODEL_MAX_LEN = 2048


class TokenIdTokenizer:
    """Stands in for a tokenizer with random-weight models: prompts are token ids, text is ids."""

    eos_token_id = None
    pad_token_id = 0
    bos_token_id = None

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return "".join(f" {int(t)}" for t in token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("random-weight benchmark models have no tokenizer: give prompts as token ids")


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    from tokenmill.engine.llm_engine import resolve_device_dtype as engine_resolve

    return engine_resolve(device, dtype)


def load_bench_model(model: str | None, random_model: str | None, device: str, dtype: str, seed: int):
    """A tokenmill `LoadedModel` (attention: tokenmill's) for `--model` or `--random-model`."""
    from tokenmill.engine.attention_backend import register_attention
    from tokenmill.engine.model_loader import LoadedModel, load_model

    dev, torch_dtype = resolve_device_dtype(device, dtype)
    attn = register_attention()
    if random_model is None:
        return load_model(model, device=dev, dtype=torch_dtype, attn_implementation=attn)
    if random_model not in RANDOM_MODEL_SHAPES:
        raise ValueError(f"random_model={random_model!r} is invalid: allowed {sorted(RANDOM_MODEL_SHAPES)}")
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    config = LlamaConfig(**RANDOM_MODEL_SHAPES[random_model], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(dev):
        net = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn).eval()
    generation_config = GenerationConfig(eos_token_id=None, bos_token_id=None, pad_token_id=0)
    net.generation_config = generation_config
    return LoadedModel(
        model=net,
        tokenizer=TokenIdTokenizer(),
        generation_config=generation_config,
        model_path=f"random-{random_model}",
        max_model_len=min(RANDOM_MODEL_MAX_LEN, config.max_position_embeddings),
    )


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[torch.nn.Module]:
    """Run `model` with another attention implementation inside the block (restored after)."""
    original = model.config._attn_implementation
    if implementation != original:
        model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)


def vocab_size_of(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]
