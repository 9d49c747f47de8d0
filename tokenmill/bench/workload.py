"""Benchmark workloads: seeded random requests or a JSONL file of prompts.

A request is a prompt (token ids, or text for the serving benchmark) and the number of output
tokens it asks for. Random prompts are token ids drawn from the upper part of the vocabulary,
away from the special tokens that usually sit at its start.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A small fixed word list for random text prompts (the serving benchmark sends text).
_WORDS = (
    "time river stone light green window market ocean paper garden silver music winter forest "
    "engine number story summer mountain letter table bridge yellow simple quiet little bright "
    "answer circle animal travel friend morning island question history picture machine village"
).split()


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...] | None  # token ids (offline benchmark); None when only text is known
    prompt_text: str | None  # text (serving benchmark, or a JSONL prompt before tokenisation)
    output_len: int  # output tokens asked for

    @property
    def prompt_len(self) -> int:
        if self.prompt_ids is None:
            raise ValueError("prompt_len is only known for requests with token ids")
        return len(self.prompt_ids)


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int  # inclusive

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"length range [{self.low}, {self.high}] is invalid: allowed 1 <= min <= max")


def random_token_workload(
    num_requests: int,
    prompt_lens: LengthRange,
    output_lens: LengthRange,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """Requests with random token-id prompts and output lengths, reproducible from `seed`."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} is invalid: allowed an integer >= 1")
    low_id = min(1000, vocab_size // 2)  # skip the special tokens at the start of most vocabularies
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(prompt_lens.low, prompt_lens.high)
        output_len = rng.randint(output_lens.low, output_lens.high)
        ids = tuple(rng.randrange(low_id, vocab_size) for _ in range(prompt_len))
        requests.append(BenchRequest(prompt_ids=ids, prompt_text=None, output_len=output_len))
    return requests


def random_text_workload(
    num_requests: int,
    prompt_lens: LengthRange,
    output_lens: LengthRange,
    seed: int,
) -> list[BenchRequest]:
    """Requests with random text prompts (prompt lengths counted in words), reproducible from `seed`."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} is invalid: allowed an integer >= 1")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        num_words = rng.randint(prompt_lens.low, prompt_lens.high)
        output_len = rng.randint(output_lens.low, output_lens.high)
        text = " ".join(rng.choice(_WORDS) for _ in range(num_words))
        requests.append(BenchRequest(prompt_ids=None, prompt_text=text, output_len=output_len))
    return requests


def load_jsonl_workload(
    path: str | Path,
    num_requests: int | None,
    output_lens: LengthRange,
    seed: int,
) -> list[BenchRequest]:
    """Read prompts from a JSONL file: one object a line with "prompt" (text) or "prompt_ids"
    (token ids), and optionally "output_len" (else drawn from `output_lens` with `seed`)."""
    rng = random.Random(seed)
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not JSON ({error})") from error
            if not isinstance(obj, dict) or ("prompt" not in obj and "prompt_ids" not in obj):
                raise ValueError(f'{path}:{line_no}: allowed an object with "prompt" or "prompt_ids"')
            output_len = obj.get("output_len")
            if output_len is None:
                output_len = rng.randint(output_lens.low, output_lens.high)
            if not isinstance(output_len, int) or output_len < 1:
                raise ValueError(f"{path}:{line_no}: output_len={output_len!r} is invalid: allowed an integer >= 1")
            ids = obj.get("prompt_ids")
            if ids is not None and (not ids or not all(isinstance(t, int) and t >= 0 for t in ids)):
                raise ValueError(f"{path}:{line_no}: prompt_ids is invalid: allowed a non-empty list of token ids")
            text = obj.get("prompt")
            if ids is None and (not isinstance(text, str) or not text):
                raise ValueError(f"{path}:{line_no}: prompt={text!r} is invalid: allowed a non-empty string")
            requests.append(
                BenchRequest(prompt_ids=tuple(ids) if ids is not None else None, prompt_text=text, output_len=output_len)
            )
            if num_requests is not None and len(requests) == num_requests:
                break
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


def tokenize_workload(requests: list[BenchRequest], tokenizer: Any) -> list[BenchRequest]:
    """Fill in token ids for text prompts (the offline benchmark feeds token ids to every backend)."""
    out = []
    for r in requests:
        if r.prompt_ids is None:
            if tokenizer is None or not hasattr(tokenizer, "encode"):
                raise ValueError("text prompts need a model with a tokenizer (random models take prompt_ids only)")
            ids = tuple(tokenizer.encode(r.prompt_text, add_special_tokens=True))
            r = BenchRequest(prompt_ids=ids, prompt_text=r.prompt_text, output_len=r.output_len)
        out.append(r)
    return out
