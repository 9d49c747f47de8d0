"""LLMEngine / LLM behaviour: seeds, bad input, aborts, n samples, stops, logprobs, faults."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import random_prompts, tiny_pair
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair("llama")


@pytest.fixture()
def llm(tiny):
    loaded, _ = tiny
    return LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)


def assert_all_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(c == 0 for c in engine.block_manager.ref_counts)


def test_seeded_sample_is_independent_of_batch(llm) -> None:
    prompt = random_prompts([12], seed=5)[0]
    params = SamplingParams(do_sample=True, top_k=0, max_new_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts([3, 30, 7, 50], seed=6)
    mixed_params = [SamplingParams(do_sample=True, temperature=0.7, max_new_tokens=20, ignore_eos=True)] * 2 + [
        params
    ] + [SamplingParams(max_new_tokens=9, ignore_eos=True)] * 2
    batch = llm.generate(others[:2] + [prompt] + others[2:], mixed_params, use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt], params.replace(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone
    assert_all_free(llm)


def test_num_return_sequences_share_prompt_and_free(llm) -> None:
    prompt = random_prompts([40], seed=7)[0]
    params = SamplingParams(do_sample=True, num_return_sequences=4, max_new_tokens=12, seed=3, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_all_free(llm)


BAD_PARAMS = [
    ("max_new_tokens", 0),
    ("temperature", -1.0),
    ("top_k", -5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", 2.0),
    ("typical_p", 0.0),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("no_repeat_ngram_size", -1),
    ("num_beams", 0),
    ("num_return_sequences", 0),
    ("early_stopping", "sometimes"),
    ("seed", -1),
    ("logprobs", 50),
    ("stop_token_ids", [-3]),
    ("eos_token_id", -1),
    ("min_new_tokens", -2),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_invalid_sampling_params_name_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_combinations() -> None:
    with pytest.raises(ValueError, match="num_return_sequences"):
        SamplingParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        SamplingParams(num_return_sequences=2)  # greedy cannot return several sequences (as HF)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0)


def test_bad_requests_are_rejected_and_engine_keeps_serving(llm) -> None:
    engine = llm.llm_engine
    good = random_prompts([10, 20], seed=8)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine.add_request("a", good[0], params)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad-empty", [], params)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad-empty-text", "", params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("bad-long", [1] * 300, params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("bad-total", [1] * 200, SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="token id"):
        engine.add_request("bad-token", [1, 10**6], params)
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", good[1], params)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("bad-cache", [1] * 10, SamplingParams(num_beams=8, max_new_tokens=200))
    engine.add_request("b", good[1], params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["a", "b"]
    assert all(len(o.outputs[0].token_ids) == 8 for o in done.values())
    assert_all_free(llm)


def test_abort_frees_blocks_at_once(llm) -> None:
    engine = llm.llm_engine
    prompts = random_prompts([30, 30, 30], seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request(["r0", "r1", "r2", "unknown"])
    assert_all_free(llm)


def test_stops_and_lengths(llm, tiny) -> None:
    _, ref = tiny
    prompt = random_prompts([15], seed=10)[0]
    base = llm.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    toks = base.outputs[0].token_ids
    # EOS = the 5th generated token: stops there (EOS kept in token_ids, as HF).
    eos = toks[4]
    first = toks.index(eos)
    out = llm.generate([prompt], SamplingParams(max_new_tokens=20, eos_token_id=eos), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop" and out.stop_reason == eos
    # stop_token_ids behave the same; min_new_tokens bans the EOS until reached (as HF).
    out = llm.generate([prompt], SamplingParams(max_new_tokens=20, stop_token_ids=[eos], ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == toks[: first + 1]
    out = llm.generate(
        [prompt], SamplingParams(max_new_tokens=20, eos_token_id=eos, min_new_tokens=first + 2), use_tqdm=False
    )[0].outputs[0]
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos, min_new_tokens=first + 2
        )[0, len(prompt) :].tolist()
    assert out.token_ids == want
    # max_length counts the prompt, as in HF.
    out = llm.generate([prompt], SamplingParams(max_length=len(prompt) + 3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    assert_all_free(llm)


def test_greedy_logprobs_match_hf_scores(llm, tiny) -> None:
    _, ref = tiny
    prompt = random_prompts([9], seed=11)[0]
    out = llm.generate([prompt], SamplingParams(max_new_tokens=6, logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    total = 0.0
    for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        lp = torch.log_softmax(hf.scores[step][0].float(), -1)
        assert entry[tok] == pytest.approx(lp[tok].item(), abs=1e-4)
        top = lp.topk(3).indices.tolist()
        assert set(top) <= set(entry)
        total += lp[tok].item()
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_incremental_outputs_are_cumulative(llm) -> None:
    engine = llm.llm_engine
    prompt = random_prompts([8], seed=12)[0]
    engine.add_request("s", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out)
    lengths = [len(o.outputs[0].token_ids) for o in seen]
    assert lengths == list(range(1, 11))
    texts = [o.outputs[0].text for o in seen]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert seen[-1].finished and not any(o.finished for o in seen[:-1])


def test_fault_in_step_fails_only_that_batch(llm, monkeypatch) -> None:
    engine = llm.llm_engine
    prompt = random_prompts([8], seed=13)[0]
    engine.add_request("doomed", prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    original = engine.runner.run

    def broken(batch):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.runner, "run", broken)
    outs = engine.step()
    assert len(outs) == 1 and outs[0].finished and "injected fault" in outs[0].error
    assert outs[0].outputs[0].finish_reason == "error"
    assert_all_free(llm)
    monkeypatch.setattr(engine.runner, "run", original)
    ok = llm.generate([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 5


def test_warm_up_leaves_an_idle_engine_with_zero_counters(llm) -> None:
    engine = llm.llm_engine
    expected = llm.generate(["a b c"], SamplingParams(max_new_tokens=6, do_sample=False), use_tqdm=False)
    engine.prompt_tokens_total = engine.generation_tokens_total = 0
    steps = []
    original = engine.step
    engine.step = lambda: steps.append(1) or original()  # type: ignore[method-assign]
    engine.warm_up()
    del engine.step
    assert len(steps) >= 2  # a prefill and a decode at least
    assert_all_free(llm)
    stats = engine.get_stats()
    assert (stats.prompt_tokens_total, stats.generation_tokens_total, stats.prefix_cache_hit_blocks_total,
            stats.num_preemptions_total) == (0, 0, 0, 0)
    again = llm.generate(["a b c"], SamplingParams(max_new_tokens=6, do_sample=False), use_tqdm=False)
    assert again[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.warm_up()
    engine.abort_request("busy")
