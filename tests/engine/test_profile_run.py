"""The KV-sizing profile forward stays inside the model's position limit and max_model_len."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.model_runner import ModelRunner, profile_seq_lens


def test_profile_seq_lens_split_whole_blocks() -> None:
    assert profile_seq_lens(2048, 1024, 16) == [1024, 1024]
    assert profile_seq_lens(300, 128, 16) == [128, 128, 44]
    assert profile_seq_lens(100, 1000, 16) == [100]
    assert profile_seq_lens(50, 20, 16) == [16, 16, 16, 2]  # full sequences are whole blocks
    assert profile_seq_lens(5, 3, 16) == [3, 2]  # limit below a block
    for tokens, limit in [(2048, 1024), (300, 128), (777, 100)]:
        lens = profile_seq_lens(tokens, limit, 16)
        assert sum(lens) == tokens and max(lens) <= limit
        assert sum(-(-n // 16) for n in lens) == -(-tokens // 16)
    with pytest.raises(ValueError, match="num_tokens"):
        profile_seq_lens(0, 10, 16)


def _gpt2(n_positions: int) -> torch.nn.Module:
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=n_positions, vocab_size=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=register_attention()).eval()


def test_profile_run_respects_gpt2_position_limit() -> None:
    model = _gpt2(128)
    seen = []
    handle = model.transformer.wpe.register_forward_hook(lambda m, args, out: seen.append(int(args[0].max())))
    budget = 300  # above the 128 positions: one sequence of 300 would index past the table
    runner = ModelRunner(model, num_blocks=-(-budget // 16), block_size=16)
    runner.profile_run(budget)
    handle.remove()
    assert seen and max(seen) == 127


def test_profile_run_respects_max_model_len() -> None:
    model = _gpt2(512)
    seen = []
    model.transformer.wpe.register_forward_hook(lambda m, args, out: seen.append(int(args[0].max())))
    runner = ModelRunner(model, num_blocks=-(-400 // 16), block_size=16)
    runner.profile_run(400, max_seq_len=96)
    assert max(seen) == 95
