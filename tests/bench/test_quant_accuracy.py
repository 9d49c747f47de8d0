"""tokenmill.bench.quant_accuracy (the source of README's quantization accuracy table) on a tiny
random Llama: the report's fields, float32 against itself, and the quantized modes' numbers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.engine.helpers import hf_greedy, tiny_pair, tiny_tokenizer
from tokenmill.bench import quant_accuracy as qa
from tokenmill.engine.model_loader import LoadedModel
from tokenmill.engine.quantization import model_quantization

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_loaded() -> LoadedModel:
    tokenizer = copy.deepcopy(tiny_tokenizer())  # the shared one stays without a template
    tokenizer.chat_template = TEMPLATE
    _, ref = tiny_pair("llama", max_positions=1024)  # HF's sdpa attention, as load_model(..., "sdpa")
    assert len(tokenizer(qa.TEXT)["input_ids"]) < 1024
    return LoadedModel(model=ref, tokenizer=tokenizer, generation_config=ref.generation_config, model_path="",
                       max_model_len=1024)


@pytest.fixture(scope="module")
def report(tiny_loaded) -> dict:
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    result = qa.evaluate(None, loaded=tiny_loaded)
    # the quantized modes work on copies: the float32 model is left as it was
    assert model_quantization(tiny_loaded.model) is None
    after = tiny_loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return result


def test_report_has_the_readme_table_fields(report) -> None:
    assert report["prompts"] == list(qa.PROMPTS) and report["num_tokens"] == qa.NUM_TOKENS == 32
    assert list(report["modes"]) == ["float32", "int8", "int4"]
    for row in report["modes"].values():
        assert set(row) == {"same_position", "common_prefix", "perplexity", "sample"}
        assert len(row["same_position"]) == len(row["common_prefix"]) == len(qa.PROMPTS)
        for same, prefix in zip(row["same_position"], row["common_prefix"]):
            assert 0 <= prefix <= same <= qa.NUM_TOKENS  # a match fraction in [0, 1]
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert isinstance(row["sample"], str)
    json.dumps(report)  # what --json writes


def test_float32_against_itself_and_independent_numbers(report, tiny_loaded) -> None:
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    row = report["modes"]["float32"]
    assert row["same_position"] == row["common_prefix"] == [qa.NUM_TOKENS] * len(qa.PROMPTS)
    # the reference tokens are the model's greedy continuation of the chat-templated prompt
    chat = tokenizer.apply_chat_template([{"role": "user", "content": qa.PROMPTS[0]}], add_generation_prompt=True,
                                         tokenize=False)
    want = hf_greedy(model, tokenizer.encode(chat), qa.NUM_TOKENS)
    assert qa.greedy_tokens(model, tokenizer, qa.PROMPTS[0]) == want
    assert row["sample"] == tokenizer.decode(want, skip_special_tokens=True)
    # perplexity: exp of HF's own shifted mean token loss, and the same on a second float32 run
    ids = tokenizer(qa.TEXT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert qa.perplexity(model, tokenizer, qa.TEXT) == row["perplexity"]


def test_quantized_modes_stay_close(report) -> None:
    reference = report["modes"]["float32"]["perplexity"]
    for mode in ("int8", "int4"):
        row = report["modes"][mode]
        # a broken quantization (wrong scales, transposed weights) moves a random model's perplexity
        # by far more than this; these are a few percent
        assert row["perplexity"] == pytest.approx(reference, rel=0.2), mode
        assert row["perplexity"] != reference, mode  # the weights did change


def test_common_prefix() -> None:
    assert qa.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert qa.common_prefix([1, 2], [1, 2, 3]) == 2
    assert qa.common_prefix([], [1]) == 0 and qa.common_prefix([5], [6]) == 0


def test_main_writes_the_json(monkeypatch, tmp_path, tiny_loaded) -> None:
    calls = []

    def fake_load_model(model, **kwargs):
        calls.append((model, kwargs))
        return tiny_loaded

    monkeypatch.setattr("tokenmill.engine.model_loader.load_model", fake_load_model)
    monkeypatch.setattr(qa, "MODES", (None, "int8"))
    out = tmp_path / "acc.json"
    assert qa.main(["--model", "m.gguf", "--json", str(out)]) == 0
    assert calls == [("m.gguf", {"attn_implementation": "sdpa"})]
    written = json.loads(out.read_text())
    assert list(written["modes"]) == ["float32", "int8"]
    assert written["modes"]["float32"]["same_position"] == [qa.NUM_TOKENS] * len(qa.PROMPTS)
