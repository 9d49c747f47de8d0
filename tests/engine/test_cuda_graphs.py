"""CUDA graphs of the compiled decode buckets (run by `make gpu-check`; skipped without CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from tests.engine.helpers import random_prompts, tiny_pair
from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.llm import LLM
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_NEW = 16


def greedy(loaded, prompts, **kwargs):
    llm = LLM(loaded=loaded, max_num_seqs=8, num_kv_blocks=128, block_size=16, max_model_len=256, **kwargs)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_graph_replay_matches_eager(arch: str) -> None:
    loaded, _ = tiny_pair(arch, device="cuda")
    # 11 prompts at max_num_seqs=8: decode steps of 8 down to 1 sequences, through several buckets.
    prompts = random_prompts([5, 17, 40, 9, 3, 31, 12, 22, 8, 15, 27], seed=5)
    _, want = greedy(loaded, prompts, enforce_eager=True)
    llm, got = greedy(loaded, prompts, enforce_eager=False)
    graphs = llm.llm_engine.runner.decode_graphs
    assert sorted(graphs.graphs) == graphs.buckets == [2, 4, 8]
    assert got == want


def _decode_batch(num_seqs: int) -> ScheduledBatch:
    seqs = []
    for i in range(num_seqs):
        seq = Sequence(seq_id=i, token_ids=list(range(3 + i, 13 + i)), num_prompt_tokens=10)
        seq.num_computed_tokens = 9
        seq.block_table = [2 * i + 1, 2 * i + 2]
        seqs.append(seq)
    return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * num_seqs)


def test_replayed_padding_rows_never_write_the_cache() -> None:
    loaded, _ = tiny_pair("llama", device="cuda")
    runners = [
        ModelRunner(loaded.model, num_blocks=16, block_size=8, max_num_seqs=8, max_model_len=64, enforce_eager=eager)
        for eager in (True, False)
    ]
    runners[1].capture_graphs()
    assert sorted(runners[1].decode_graphs.graphs) == [2, 4, 8]
    torch.manual_seed(0)
    for src, dst in zip(runners[0].k_caches + runners[0].v_caches, runners[1].k_caches + runners[1].v_caches):
        src.normal_()
        dst.copy_(src)
    before = [c.clone() for c in runners[1].k_caches]
    for step in range(2):  # the second replay reuses the graph's output buffer
        eager = runners[0].run(_decode_batch(3))
        replayed = runners[1].run(_decode_batch(3))
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    for old, new, ref in zip(before, runners[1].k_caches, runners[0].k_caches):
        changed = (old != new).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == [2, 4, 6]
        torch.testing.assert_close(new, ref)


def test_kv_sizing_counts_graph_memory_and_respects_gpt2_positions() -> None:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=384)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention()).eval().cuda()
    loaded = dataclasses.replace(tiny_pair("gpt2", device="cuda")[0], model=model, max_model_len=128)
    # A token budget of 512 over 128 positions: the profile forward splits it into 4 sequences.
    engine = LLMEngine.from_args(loaded=loaded, max_num_batched_tokens=512, max_num_seqs=4, max_model_len=128,
                                 gpu_memory_utilization=0.05, enforce_eager=False)
    assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.graphs
    probe = engine._make_runner(8)
    assert probe.profile_graph_memory() > 0
    engine.add_request("a", random_prompts([20], seed=6)[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
