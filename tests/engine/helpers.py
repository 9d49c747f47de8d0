"""Small random-weight models for engine tests, built in the test process."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.model_loader import LoadedModel, load_model

VOCAB = 384


def tiny_config(arch: str, max_positions: int = 512):
    common = dict(vocab_size=VOCAB, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=max_positions, **common,
        )
    if arch == "mistral":
        return MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, sliding_window=24, **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **common)
    raise ValueError(arch)


@functools.lru_cache(maxsize=1)
def default_loaded() -> LoadedModel:
    """The default model (converted once, then read from the cache)."""
    return load_model(attn_implementation=register_attention())


TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "def main():\n    return [x * 2 for x in range(10)]\n",
    "Numbers 12345 and symbols #$%&*()[]{} <tags> too.",
] * 8


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE of VOCAB ids trained here, so tiny models need no model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def tiny_pair(
    arch: str, seed: int = 0, device: str = "cpu", dtype=torch.float32, max_positions: int = 512
) -> tuple[LoadedModel, torch.nn.Module]:
    """(tokenmill-attention model wrapped as LoadedModel, the same weights with HF's sdpa attention)."""
    config = tiny_config(arch, max_positions)
    config.eos_token_id = None
    config.bos_token_id = None
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().to(device, dtype)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=register_attention()).eval()
    ours.to(device, dtype).load_state_dict(ref.state_dict())
    ours.generation_config = ref.generation_config
    tok = tiny_tokenizer()
    loaded = LoadedModel(
        model=ours, tokenizer=tok, generation_config=ref.generation_config, model_path="", max_model_len=min(512, max_positions)
    )
    return loaded, ref


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, **kwargs
        )
    return out[0, len(prompt_ids) :].tolist()
