"""lm-evaluation-harness against the server: a local multiple-choice task (no hub), the same accuracy as the
harness computes with the HF model in-process on the same weights.

The harness's `local-completions` model scores each choice with `/v1/completions` requests of token ids with
`echo: true, logprobs: 1, max_tokens: 1` (it reads the prompt's own token logprobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.conftest import serve_app
from tokenmill.serve.api import build_app

DATA = Path(__file__).parent / "data" / "mc_questions.jsonl"
TASK = "tokenmill_mc"


@pytest.fixture(scope="module")
def model_folder(loaded_model, tmp_path_factory):
    """The default model's weights and tokenizer as a local HF folder (what the hf harness model loads)."""
    folder = tmp_path_factory.mktemp("default_model")
    loaded_model.model.save_pretrained(folder)
    loaded_model.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{TASK}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return folder


def evaluate(model: str, model_args: dict, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                                     task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True,
                                     batch_size=1)
    return result


def test_lm_eval_local_completions_matches_hf(engine, model_folder, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with serve_app(build_app(engine)) as live:
        served = evaluate("local-completions", {
            "base_url": live.url + "/v1/completions", "model": engine.model_name, "tokenizer": str(model_folder),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        }, task_dir)
    hf = evaluate("hf", {"pretrained": str(model_folder), "dtype": "float32", "device": "cpu"}, task_dir)
    served_acc = served["results"][TASK]["acc,none"]
    assert served_acc == hf["results"][TASK]["acc,none"]
    assert served_acc >= 0.5  # the model knows most of these (chance is 0.25)
    served_ll = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in served["samples"][TASK]}
    hf_ll = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in hf["samples"][TASK]}
    assert served_ll.keys() == hf_ll.keys() and len(served_ll) == 12
    for doc_id, values in served_ll.items():
        assert values == pytest.approx(hf_ll[doc_id], abs=2e-3)
