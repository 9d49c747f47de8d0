"""The vocabulary-parallel LM head (engine/tp_sharding.py), two ranks simulated in one process: the
gathered logits equal the whole head's, for a vocabulary that does not divide evenly."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tokenmill.engine import tp_sharding


def tiny_tied_llama(vocab: int) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_vocab_parallel_head_gathers_the_whole_head(monkeypatch):
    vocab = 101  # shards of 51 rows; the second rank's last row is padding
    model = tiny_tied_llama(vocab)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    hidden = torch.randn(1, 5, 32)  # [1, T, hidden]
    want = model.lm_head(hidden)  # [1, T, vocab]
    ranks = [copy.deepcopy(model) for _ in range(2)]
    for rank, m in enumerate(ranks):
        assert tp_sharding._shard_lm_head(m, rank, 2, group=None) == 1
        assert m.lm_head.weight.shape == (51, 32)
        assert m.get_input_embeddings().weight.shape == (vocab, 32)  # the embedding stays whole
        assert m.lm_head.weight is not m.get_input_embeddings().weight
    assert torch.equal(ranks[1].lm_head.weight[-1], torch.zeros(32))  # padding row
    local = [torch.nn.functional.linear(hidden, m.lm_head.weight) for m in ranks]  # each rank's [1, T, 51]

    def all_gather(parts, tensor, group=None):  # what the other rank contributes
        for i, part in enumerate(parts):
            part.copy_(tensor if torch.equal(tensor, local[i]) else local[i])

    monkeypatch.setattr(tp_sharding.dist, "all_gather", all_gather)
    for m in ranks:
        got = m.lm_head(hidden)
        assert got.shape == (1, 5, vocab)
        torch.testing.assert_close(got, want)


def test_a_head_the_plan_does_not_shard_stays_whole():
    model = tiny_tied_llama(64)
    model._tp_plan = {}  # Llama's class plan shards the head; this instance's plan leaves it alone
    assert tp_sharding._shard_lm_head(model, 0, 2, group=None) == 0
    assert model.lm_head.weight.shape == (64, 32)
