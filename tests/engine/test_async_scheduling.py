"""Overlapped steps (async_scheduling=True) give exactly the outputs of synchronous steps.

With overlap, step N+1 is scheduled and run before step N's sampled tokens are applied: each pending
token is a placeholder whose input id the runner takes from the sampled-id tensor, and a request that
finished at step N has its step N+1 work thrown away. On the CPU nothing runs concurrently, but the
same pipeline (placeholders, the input-id fill, discards, late stop checks) runs here.
"""

from __future__ import annotations

import pytest

from tests.engine.helpers import random_prompts, tiny_pair
import torch

from tokenmill.engine.llm_engine import LLMEngine, resolve_async_scheduling
from tokenmill.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded():
    return tiny_pair("llama")[0]


def new_engine(loaded, overlap: bool, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_kv_blocks", 128)
    return LLMEngine.from_args(loaded=loaded, max_model_len=256, block_size=4, async_scheduling=overlap, **kwargs)


def test_overlap_is_the_default_on_one_cuda_device_only(loaded):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_async_scheduling(None, cuda, tensor_parallel=False) is True
    assert resolve_async_scheduling(None, cpu, tensor_parallel=False) is False
    assert resolve_async_scheduling(None, cuda, tensor_parallel=True) is False
    assert resolve_async_scheduling(True, cpu, tensor_parallel=False) is True
    assert resolve_async_scheduling(False, cuda, tensor_parallel=False) is False
    engine = LLMEngine.from_args(loaded=loaded, max_model_len=64, num_kv_blocks=16)  # the CPU default
    assert engine.scheduler_config.async_scheduling is False and engine.updater.async_scheduling is False


def test_warm_up_with_overlapped_steps_leaves_an_idle_engine(loaded):
    """A server on CUDA warms up with overlap on (its default there): nothing may be left pending."""
    engine = new_engine(loaded, True, max_num_seqs=8)
    engine.warm_up()
    assert not engine.has_unfinished_requests() and engine.updater._in_flight is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.get_stats().generation_tokens_total == 0
    params = SamplingParams(max_new_tokens=5, ignore_eos=True, do_sample=False, output_kind="final")
    engine.add_request("after", [3, 4, 5], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 5


def summary(out) -> list[tuple]:
    return [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs]


def assert_same(overlap: dict, sync: dict) -> None:
    """Tokens, text and finish reasons exactly; log-probabilities up to float noise (overlapped steps
    run different batches: a finished request's discarded row is still in the next step's forward)."""
    assert overlap.keys() == sync.keys()
    for rid in sync:
        assert [s[:5] for s in overlap[rid]] == [s[:5] for s in sync[rid]], rid
        for a, b in zip(overlap[rid], sync[rid]):
            if b[5] is not None:
                assert [list(x) for x in a[5]] == [list(x) for x in b[5]]
                assert [v for x in a[5] for v in x.values()] == pytest.approx([v for x in b[5] for v in x.values()], abs=1e-4)


def run(engine: LLMEngine, requests, abort_at: dict[int, str] | None = None) -> tuple[dict, dict, int]:
    """Final (cumulative) outputs per request, the last output seen for aborted ones, and the step count."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    final, last_seen, steps = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            (final if out.finished else last_seen)[out.request_id] = summary(out)
        steps += 1
        if abort_at and steps in abort_at:
            engine.abort_request(abort_at[steps])
        assert steps < 1000
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and set(bm.ref_counts) == {0}
    assert not engine.updater.has_in_flight and not engine.requests
    return final, last_seen, steps


def mixed_requests(num: int = 10, seed: int = 0) -> list[tuple]:
    prompts = random_prompts([3 + (7 * i) % 29 for i in range(num)], seed=seed)
    shared = prompts[0][:8] if len(prompts[0]) >= 8 else prompts[0]
    requests = []
    for i, prompt in enumerate(prompts):
        kind = i % 5
        if kind == 0:
            params = SamplingParams(max_new_tokens=6 + i, ignore_eos=True, logprobs=1)
        elif kind == 1:
            params = SamplingParams(do_sample=True, temperature=0.9, top_k=20, seed=100 + i, max_new_tokens=9)
        elif kind == 2:
            params = SamplingParams(do_sample=True, num_return_sequences=2, seed=i, max_new_tokens=7, ignore_eos=True)
        elif kind == 3:
            prompt = shared + prompt  # prefix-cache hits
            params = SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3, no_repeat_ngram_size=2)
        else:
            params = SamplingParams(do_sample=True, seed=i, max_new_tokens=10, output_kind="delta")
        requests.append((f"r{i}", prompt, params))
    return requests


def eos_and_stop_requests(loaded) -> list[tuple]:
    """Requests that end on an EOS id and on a stop string, both seen in a free run's output."""
    prompt = random_prompts([9], seed=4)[0]
    free, _, _ = run(new_engine(loaded, False), [("f", prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))])
    _, tokens, text, *_ = free["f"][0]
    return [
        ("eos", prompt, SamplingParams(max_new_tokens=16, eos_token_id=tokens[5])),
        ("stop", prompt, SamplingParams(max_new_tokens=16, stop=[text[len(text) // 2 : len(text) // 2 + 2]])),
        ("plain", prompt, SamplingParams(max_new_tokens=16, ignore_eos=True)),
    ]


def test_overlap_matches_sync_on_a_mixed_batch(loaded):
    requests = mixed_requests() + eos_and_stop_requests(loaded)
    sync, _, sync_steps = run(new_engine(loaded, False), requests)
    overlap, _, overlap_steps = run(new_engine(loaded, True), requests)
    assert_same(overlap, sync)
    assert sync["eos"][0][3] == "stop" and len(sync["eos"][0][1]) < 16
    assert sync["stop"][0][3] == "stop" and isinstance(sync["stop"][0][4], str)
    assert overlap_steps == sync_steps + 1  # the last tokens are applied one step later


def test_overlap_matches_sync_under_preemption(loaded):
    requests = mixed_requests(12, seed=3)
    sync_engine, overlap_engine = new_engine(loaded, False, num_kv_blocks=24), new_engine(loaded, True, num_kv_blocks=24)
    sync, _, _ = run(sync_engine, requests)
    overlap, _, _ = run(overlap_engine, requests)
    assert_same(overlap, sync)
    assert sync_engine.scheduler.num_preemptions_total > 0 and overlap_engine.scheduler.num_preemptions_total > 0


def test_overlap_abort_mid_run(loaded):
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    requests = mixed_requests(6, seed=5) + [("a1", random_prompts([4], 8)[0], long), ("a2", random_prompts([20], 9)[0], long)]
    aborts = {3: "a1", 5: "a2"}
    sync, sync_seen, _ = run(new_engine(loaded, False), requests, aborts)
    overlap, overlap_seen, _ = run(new_engine(loaded, True), requests, aborts)
    assert_same(overlap, sync)  # the requests that were not aborted
    assert "a1" not in sync and "a2" not in sync and "a2" in overlap_seen
    full, _, _ = run(new_engine(loaded, False), requests)
    for rid in ("a1", "a2"):
        # An aborted request got a prefix of its full output (one step shorter with overlap), nothing after.
        for seen in (sync_seen, overlap_seen):
            if rid in seen:
                for (i, ids, *_), (_, full_ids, *_) in zip(seen[rid], full[rid]):
                    assert full_ids[: len(ids)] == ids


def test_overlap_discards_work_of_requests_that_finished(loaded):
    # An EOS at the first token: the request's next step was already scheduled; it must leave no trace.
    prompt = random_prompts([7], seed=9)[0]
    first, _, _ = run(new_engine(loaded, False), [("p", prompt, SamplingParams(max_new_tokens=1))])
    eos = first["p"][0][1][0]
    engine = new_engine(loaded, True)
    requests = [("e", prompt, SamplingParams(max_new_tokens=10, eos_token_id=eos)),
                ("x", random_prompts([5], seed=1)[0], SamplingParams(max_new_tokens=10, ignore_eos=True))]
    overlap, _, _ = run(engine, requests)
    assert overlap["e"][0][1] == [eos] and overlap["e"][0][3] == "stop"
    assert engine.generation_tokens_total == 11
    sync, _, _ = run(new_engine(loaded, False), requests)
    assert_same(overlap, sync)


def test_beams_run_with_overlap_on(loaded):
    prompt = random_prompts([6], seed=2)[0]
    requests = [("b", prompt, SamplingParams(num_beams=3, num_return_sequences=2, max_new_tokens=6)),
                ("s", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))]
    sync, _, _ = run(new_engine(loaded, False), requests)
    overlap, _, _ = run(new_engine(loaded, True), requests)
    assert_same(overlap, sync)
    assert len(sync["b"]) == 2
