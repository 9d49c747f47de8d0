"""SamplingParams.output_kind ("cumulative" / "delta" / "final") and detokenize=False."""

from __future__ import annotations

import pytest

from tests.engine.helpers import random_prompts, tiny_pair
from tokenmill.engine.llm import LLM
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded():
    return tiny_pair("llama")[0]


def new_engine(loaded, **kwargs) -> LLMEngine:
    return LLMEngine.from_args(loaded=loaded, max_model_len=256, num_kv_blocks=kwargs.pop("num_kv_blocks", 96), **kwargs)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Every RequestOutput each request got, in order."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    seen: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return seen


def workload(kind: str, detokenize: bool = True, stop: tuple[str, ...] = ()) -> dict[str, tuple[list[int], SamplingParams]]:
    prompts = random_prompts([5, 17, 9, 30], seed=11)
    base = dict(max_new_tokens=14, ignore_eos=True, output_kind=kind, detokenize=detokenize, stop=stop, logprobs=2)
    params = [
        SamplingParams(**base),
        SamplingParams(do_sample=True, temperature=0.8, seed=5, **base),
        SamplingParams(do_sample=True, num_return_sequences=3, seed=7, **{**base, "max_new_tokens": 9}),
        SamplingParams(**{**base, "max_new_tokens": 3}),
    ]
    return {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(prompts, params))}


def by_index(out) -> dict[int, object]:
    return {c.index: c for c in out.outputs}


def test_delta_and_final_add_up_to_cumulative(loaded):
    cumulative = run(new_engine(loaded), workload("cumulative"))
    delta = run(new_engine(loaded), workload("delta"))
    final = run(new_engine(loaded), workload("final"))
    for rid, outs in cumulative.items():
        last = by_index(outs[-1])
        assert outs[-1].finished and len(final[rid]) == 1 and final[rid][0].finished
        assert len(delta[rid]) == len(outs)  # a delta output every step the request moved
        for index, want in last.items():
            got_final = by_index(final[rid][0])[index]
            assert (got_final.token_ids, got_final.text, got_final.finish_reason) == (
                want.token_ids, want.text, want.finish_reason)
            assert got_final.logprobs == want.logprobs
            pieces = [by_index(o)[index] for o in delta[rid] if index in by_index(o)]
            assert [t for p in pieces for t in p.token_ids] == want.token_ids
            assert "".join(p.text for p in pieces) == want.text
            assert [lp for p in pieces for lp in p.logprobs] == want.logprobs
            assert pieces[-1].finish_reason == want.finish_reason
            assert all(p.token_ids for p in pieces)  # nothing-new sequences are left out
        # The text is the whole output decoded once.
        tok = loaded.tokenizer
        for c in final[rid][0].outputs:
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_final_builds_one_output_per_request(loaded):
    engine = new_engine(loaded)
    for rid, (prompt, params) in workload("final").items():
        engine.add_request(rid, prompt, params)
    num_steps, outputs = 0, []
    while engine.has_unfinished_requests():
        step_outputs = engine.step()
        num_steps += 1
        assert all(o.finished for o in step_outputs)
        outputs += step_outputs
    assert sorted(o.request_id for o in outputs) == ["r0", "r1", "r2", "r3"] and num_steps > 4


@pytest.mark.parametrize("kind", ["cumulative", "delta", "final"])
def test_stop_strings_under_every_kind(loaded, kind):
    # A stop string taken from the middle of a greedy output's text ends it there, whatever the kind.
    free = run(new_engine(loaded), {"r": (random_prompts([8], seed=3)[0], SamplingParams(max_new_tokens=20, ignore_eos=True))})
    text = free["r"][-1].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=[stop], output_kind=kind)
    outs = run(new_engine(loaded), {"r": (random_prompts([8], seed=3)[0], params)})["r"]
    if kind == "delta":
        text_out = "".join(c.text for o in outs for c in o.outputs)
    else:
        text_out = outs[-1].outputs[0].text
    assert outs[-1].outputs[-1].finish_reason == "stop" and outs[-1].outputs[-1].stop_reason == stop
    assert text_out == text[: text.index(stop)]


def test_detokenize_false_gives_tokens_only_and_skips_stop_strings(loaded):
    with_text = run(new_engine(loaded), workload("cumulative"))
    stop = (with_text["r0"][-1].outputs[0].text[2:5],)  # would end r0 early if the engine checked it
    without = run(new_engine(loaded), workload("delta", detokenize=False, stop=stop))
    for rid, outs in with_text.items():
        for index, want in by_index(outs[-1]).items():
            pieces = [by_index(o)[index] for o in without[rid] if index in by_index(o)]
            assert [t for p in pieces for t in p.token_ids] == want.token_ids
            assert all(p.text == "" for p in pieces)
            assert pieces[-1].finish_reason == "length"


def test_llm_generate_asks_for_final_outputs(loaded):
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    engine = llm.llm_engine
    built = []
    original = engine.step

    def step():
        outs = original()
        built.extend(outs)
        return outs

    engine.step = step
    prompts = random_prompts([6, 11], seed=2)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)  # cumulative by default: generate overrides it
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(built) == 2 and all(o.finished for o in built)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
    assert params.output_kind == "cumulative"  # the caller's object is unchanged


@pytest.mark.parametrize("field,value", [("output_kind", "stream"), ("output_kind", None), ("detokenize", "yes")])
def test_invalid_output_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_compact_deltas_carry_what_delta_outputs_carry(loaded, async_scheduling):
    """With `compact_deltas` (the engine core's), token-only delta outputs after a request's first go
    out in one TokenDeltas per step; its first and last outputs, and requests wanting text,
    log-probs or several sequences, stay RequestOutputs. Put together they give the same tokens,
    cumulative log-probs and finish reasons as plain delta outputs."""
    from tokenmill.engine.outputs import TokenDeltas

    prompts = random_prompts([5, 17, 9, 30, 12], seed=12)
    base = dict(max_new_tokens=10, ignore_eos=True, output_kind="delta", detokenize=False)
    params = [
        SamplingParams(**base),
        SamplingParams(do_sample=True, temperature=0.8, seed=5, **base),
        SamplingParams(**{**base, "max_new_tokens": 1}),
        SamplingParams(logprobs=1, **base),  # log-probs: full outputs
        SamplingParams(do_sample=True, num_return_sequences=2, seed=3, **base),  # two sequences: full
    ]
    requests = {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(prompts, params))}

    def collect(compact: bool):
        engine = new_engine(loaded, async_scheduling=async_scheduling)
        engine.compact_deltas = compact
        for rid, (prompt, sp) in requests.items():
            engine.add_request(rid, prompt, sp)
        tokens = {rid: [] for rid in requests}  # (sequence index, token ids) per output, in order
        last = {}
        kinds = {rid: [] for rid in requests}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if isinstance(out, TokenDeltas):
                    assert len(set(out.request_ids)) == len(out.request_ids)
                    for rid, ids, cumulative in zip(out.request_ids, out.token_ids, out.cumulative_logprobs):
                        tokens[rid].append((0, list(ids)))
                        last[rid, 0] = (cumulative, None)
                        kinds[rid].append("compact")
                    continue
                kinds[out.request_id].append("full")
                for c in out.outputs:
                    tokens[out.request_id].append((c.index, list(c.token_ids)))
                    last[out.request_id, c.index] = (c.cumulative_logprob, c.finish_reason)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return tokens, last, kinds

    want_tokens, want_last, want_kinds = collect(False)
    got_tokens, got_last, got_kinds = collect(True)
    assert got_tokens == want_tokens
    assert {k: v[1] for k, v in got_last.items()} == {k: v[1] for k, v in want_last.items()}
    for key, (cumulative, _) in got_last.items():
        assert cumulative == pytest.approx(want_last[key][0])
    assert all(k == ["full"] * len(k) for k in want_kinds.values())
    for rid in ("r0", "r1"):  # first and last full, the steps between compact
        assert got_kinds[rid][0] == got_kinds[rid][-1] == "full" and set(got_kinds[rid][1:-1]) == {"compact"}
    for rid in ("r2", "r3", "r4"):
        assert "compact" not in got_kinds[rid]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_compact_deltas_keep_the_cached_token_count_a_consumer_sees(loaded, async_scheduling):
    """A request first admitted without a prefix-cache hit, then preempted and admitted again with
    one, changes its cached-token count after its first output: its next output is a full one, so a
    consumer of the outputs sees the same count at every token as with plain delta outputs."""
    from tokenmill.engine.outputs import TokenDeltas

    prefix = random_prompts([32], seed=21)[0]
    tails = random_prompts([3, 4, 5, 6, 7, 8], seed=22)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, output_kind="delta", detokenize=False)

    def seen(compact: bool) -> dict[str, list[tuple[int, int]]]:
        """Per request, at each output: (its tokens so far, the cached-token count a consumer holds)."""
        engine = new_engine(loaded, async_scheduling=async_scheduling, num_kv_blocks=18, block_size=8)
        engine.compact_deltas = compact
        for i, tail in enumerate(tails):
            engine.add_request(f"r{i}", prefix + tail, params)
        counts = {f"r{i}": [0, 0] for i in range(len(tails))}  # tokens so far, cached tokens held
        trace: dict[str, list[tuple[int, int]]] = {rid: [] for rid in counts}
        preempted = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if isinstance(out, TokenDeltas):
                    for rid, ids in zip(out.request_ids, out.token_ids):
                        counts[rid][0] += len(ids)
                        trace[rid].append(tuple(counts[rid]))
                    continue
                counts[out.request_id][0] += sum(len(c.token_ids) for c in out.outputs)
                counts[out.request_id][1] = out.num_cached_tokens
                trace[out.request_id].append(tuple(counts[out.request_id]))
            preempted = max(preempted, engine.scheduler.num_preemptions_total)
        assert preempted > 0  # the case needs preemption
        return trace

    plain, compact = seen(False), seen(True)
    changed = [rid for rid, t in plain.items() if len({c for _, c in t}) > 1]
    assert changed  # some request's count changed after its first output
    for rid in plain:
        assert compact[rid] == plain[rid], (rid, plain[rid], compact[rid])
