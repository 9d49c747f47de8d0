"""Structured outputs (xgrammar): outputs follow the constraint; neighbours in the batch are unchanged."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from tests.engine.helpers import default_loaded, random_prompts, tiny_pair
from tokenmill.engine.llm import LLM
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.structured_output import apply_token_bitmask
from tokenmill.engine.structured_output_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        # (xgrammar 0.2.9 lets a maxLength-bounded string hold raw control characters: a pattern bounds it here)
        "name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z .-]{0,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "member"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair("llama")


@pytest.fixture(scope="module")
def default_llm():
    return LLM(loaded=default_loaded(), max_model_len=256, num_kv_blocks=128, max_num_seqs=16)


def test_torch_bitmask_matches_xgrammar_cpu_kernel() -> None:
    import xgrammar

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([4, 0, 2])
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, rows)
    ref = logits.clone()
    full = torch.full((5, 4), -1, dtype=torch.int32)
    full[rows] = bitmask
    xgrammar.apply_token_bitmask_inplace(ref, full, vocab_size=100)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched
    assert (ours == float("-inf")).any()


def test_regex_and_choice_on_tiny_model_over_seeds(tiny) -> None:
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    prompts = random_prompts([5] * 12, seed=1)
    regex = StructuredOutputsParams(regex=r"(ab|ba){1,3}c")
    outs = llm.generate(prompts, [SamplingParams(do_sample=True, seed=s, max_new_tokens=32, structured_outputs=regex)
                                  for s in range(12)], use_tqdm=False)
    for out in outs:
        assert re.fullmatch(r"(ab|ba){1,3}c", out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
    choice = StructuredOutputsParams(choice=["yes", "no", "maybe so"])
    params = SamplingParams(do_sample=True, seed=3, max_new_tokens=16, num_return_sequences=4, structured_outputs=choice)
    out = llm.generate(prompts[:1], params, use_tqdm=False)[0]
    assert all(c.text in ("yes", "no", "maybe so") for c in out.outputs)


def test_json_schema_on_tiny_model_validates_over_many_seeds(tiny) -> None:
    """A random-weight model has no idea of JSON: the grammar alone makes every output valid."""
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=128, max_num_seqs=32)
    spec = StructuredOutputsParams(json=SCHEMA)
    prompts = random_prompts([6] * 32, seed=8)
    params = [SamplingParams(do_sample=True, seed=s, max_new_tokens=200, structured_outputs=spec) for s in range(32)]
    for out in llm.generate(prompts, params, use_tqdm=False):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_json_schema_on_default_model_validates_over_seeds(default_llm) -> None:
    tok = default_llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}], tokenize=False,
                                     add_generation_prompt=True)
    spec = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(do_sample=True, temperature=1.0, seed=s, max_new_tokens=80, structured_outputs=spec)
              for s in range(4)]
    for out in default_llm.generate([prompt] * 4, params, use_tqdm=False):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_constrained_request_leaves_neighbours_unchanged(tiny) -> None:
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    prompts = random_prompts([9, 20, 13], seed=2)
    free = [SamplingParams(do_sample=True, seed=7, max_new_tokens=12, ignore_eos=True),
            SamplingParams(max_new_tokens=12, ignore_eos=True)]
    alone = llm.generate([prompts[0], prompts[2]], free, use_tqdm=False)
    constrained = SamplingParams(do_sample=True, seed=1, max_new_tokens=20,
                                 structured_outputs=StructuredOutputsParams(regex="[0-9]{3}-[a-z]{2}"))
    mixed = llm.generate(prompts, [free[0], constrained, free[1]], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", mixed[1].outputs[0].text)


def test_compile_is_cached_and_off_the_step_loop(tiny) -> None:
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    engine = llm.llm_engine
    spec = StructuredOutputsParams(json={"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(40)},
                                         "required": [f"k{i}" for i in range(40)]})
    engine.add_request("free", random_prompts([8], seed=3)[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add_request("json", random_prompts([8], seed=4)[0], SamplingParams(max_new_tokens=240, structured_outputs=spec))
    assert engine.requests["json"] in engine.structured.pending or engine.requests["json"].grammar.done()
    start = time.perf_counter()
    engine.step()  # the free request runs while the schema compiles
    assert time.perf_counter() - start < 5
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.structured.compile_async(spec) is engine.structured.compile_async(spec)  # one cached compile
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_invalid_specs_are_value_errors(tiny) -> None:
    for bad in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"json": "{not json"}, {"regex": ""}):
        with pytest.raises(ValueError, match="structured_outputs"):
            StructuredOutputsParams(**bad)
    with pytest.raises(ValueError, match="num_beams"):
        SamplingParams(num_beams=2, structured_outputs=StructuredOutputsParams(regex="a"))
    loaded, _ = tiny
    llm = LLM(loaded=loaded, max_model_len=256, num_kv_blocks=64)
    out = llm.generate(random_prompts([4], seed=5), SamplingParams(
        max_new_tokens=4, structured_outputs=StructuredOutputsParams(grammar="root ::= nope")), use_tqdm=False)[0]
    assert out.finished and "structured_outputs.grammar" in out.error
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks
