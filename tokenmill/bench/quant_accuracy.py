"""Accuracy of each quantization mode against the float32 model (transformers, same weights).

For every mode: on a few fixed prompts, how many of the first 32 greedy tokens equal float32's
(position by position, and the length of the common prefix), and the perplexity of a fixed text.
Greedy decoding uses HF generate on the quantized model: the engine is tested to give the same
tokens on the same quantized weights (tests/engine/test_quantization.py).

    PYTHONPATH=$PWD python -m tokenmill.bench.quant_accuracy [--model PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from typing import Any

import torch

PROMPTS = (
    # The walkthrough prompts of the decoding parity suite, then four chat prompts.
    "I enjoy walking with my cute dog",
    "The history of the printing press",
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
)
NUM_TOKENS = 32
# A fixed text for perplexity (plain prose, no chat template).
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Books, "
    "which had been copied by hand for centuries, could now be produced in hundreds of identical copies. "
    "Within fifty years, presses were operating in more than two hundred cities across Europe, and the "
    "price of books fell sharply. Scholars could compare the same text in different places, errors could "
    "be corrected in later editions, and new ideas in science, religion and politics spread faster than "
    "any authority could control. Historians still debate how much the press caused these changes and how "
    "much it merely accelerated trends that were already under way."
)
MODES = (None, "int8", "int4")


def greedy_tokens(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NUM_TOKENS,
                             min_new_tokens=NUM_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def perplexity(model: Any, tokenizer: Any, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, T]
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()  # [T-1, vocab]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(nll.item())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def evaluate(model_path: str | None, *, loaded: Any = None) -> dict[str, Any]:
    """The report for `model_path` (None: the default model), or for `loaded` (a LoadedModel with a
    chat template, e.g. a tiny model in tests) when given; the float32 model is never modified."""
    from tokenmill.engine.model_loader import load_model
    from tokenmill.engine.quantization import quantize_model

    if loaded is None:
        loaded = load_model(model_path, attn_implementation="sdpa")
    reference = [greedy_tokens(loaded.model, loaded.tokenizer, p) for p in PROMPTS]
    report: dict[str, Any] = {"prompts": list(PROMPTS), "num_tokens": NUM_TOKENS, "modes": {}}
    for mode in MODES:
        model = loaded.model if mode is None else quantize_model(copy.deepcopy(loaded.model), mode)
        tokens = reference if mode is None else [greedy_tokens(model, loaded.tokenizer, p) for p in PROMPTS]
        report["modes"][str(mode or "float32")] = {
            "same_position": [sum(x == y for x, y in zip(t, r)) for t, r in zip(tokens, reference)],
            "common_prefix": [common_prefix(t, r) for t, r in zip(tokens, reference)],
            "perplexity": perplexity(model, loaded.tokenizer, TEXT),
            "sample": loaded.tokenizer.decode(tokens[0], skip_special_tokens=True),
        }
        print(f"{str(mode or 'float32'):8s} {report['modes'][str(mode or 'float32')]}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Local HF folder or .gguf (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    report = evaluate(args.model)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
