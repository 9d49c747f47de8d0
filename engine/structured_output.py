"""Structured outputs with xgrammar: compile off the step loop, mask inside the batch, advance after sampling.

A request with `SamplingParams.structured_outputs` goes through three places:

1. `add_request` -> `StructuredOutputManager.hold(group)`: the grammar is compiled in a worker thread
   (cached by (kind, spec), so a repeated schema costs nothing). The request waits outside the scheduler
   until its grammar is ready; `admit(...)` at the start of each step hands the ready ones to the
   scheduler. Other requests keep stepping while a new schema compiles.
2. `mask_constrained_rows(logits, rows)` in the step update, before the sampler's processors: each
   constrained sequence's matcher fills its row of a token bitmask; disallowed tokens become -inf (torch
   on the CPU, xgrammar's kernel on CUDA). Unconstrained rows are not touched.
3. `advance_grammars(rows, token_ids)` after sampling: each matcher accepts its token; a sequence whose
   grammar has terminated stops ("stop").

Each sequence owns a `GrammarMatcher` (n samples: one each, created at their first token). Beam search
with a constraint is rejected by SamplingParams.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence as Seq

import torch

from tokenmill.engine.device_copy import to_device
from tokenmill.engine.structured_output_params import StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.engine.scheduler import Scheduler
    from tokenmill.engine.sequence import Sequence, SequenceGroup


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar ships with the serve extra
        raise ValueError("structured_outputs needs the xgrammar package: pip install 'tokenmill[serve]'") from exc
    return xgrammar


def _clean(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/x.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())


class StructuredOutputManager:
    """Compiles grammars for one tokenizer (cached, in a worker thread) and holds requests until theirs is ready."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Seq[int], max_workers: int = 1) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the logits width (may exceed the tokenizer's vocabulary)
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._cache: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self.pending: list[SequenceGroup] = []

    # ------------------------------------------------------------------ compiling
    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                # Compact JSON (no free whitespace): small models otherwise loop on spaces and newlines.
                return compiler.compile_json_schema(json.dumps(spec.json), any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in spec.choice)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(spec.grammar)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for bad specs
            raise ValueError(f"structured_outputs.{kind} is invalid: {_clean(exc)}") from None

    def compile_async(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar as a future, shared by every request with the same spec."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self._compile, spec)
                self._cache[key] = future
        return future

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """Blocking compile (tests and warm-up); raises ValueError for an invalid spec."""
        return self.compile_async(spec).result()

    # ------------------------------------------------------------------ requests
    def hold(self, group: SequenceGroup) -> bool:
        """Start compiling the request's grammar; True when the request must wait for it (it is kept here)."""
        spec = group.params.structured_outputs
        if spec is None:
            return False
        group.grammar = self.compile_async(spec)
        if group.grammar.done() and group.grammar.exception() is None:
            return False
        self.pending.append(group)
        return True

    def admit(self, scheduler: Scheduler, is_live: Callable[[SequenceGroup], bool], wait_s: float = 0.0
              ) -> list[SequenceGroup]:
        """Hand requests whose grammar is ready to the scheduler; return those whose grammar failed.

        `wait_s`: when nothing else can run, wait this long for the oldest compile instead of spinning."""
        if not self.pending:
            return []
        if wait_s > 0:
            try:
                self.pending[0].grammar.exception(timeout=wait_s)
            except TimeoutError:
                pass
        failed, still = [], []
        for group in self.pending:
            if not is_live(group):
                continue  # aborted while compiling
            if not group.grammar.done():
                still.append(group)
            elif group.grammar.exception() is not None:
                group.error = str(group.grammar.exception())
                failed.append(group)
            else:
                scheduler.add(group)
        self.pending = still
        return failed

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- per step
def _matcher(group: SequenceGroup, seq: Sequence) -> Any:
    if seq.grammar_matcher is None:
        seq.grammar_matcher = _xgrammar().GrammarMatcher(group.grammar.result())
    return seq.grammar_matcher


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits[rows[i], t] = -inf where bit t of bitmask[i] is 0. logits [n, vocab] f32, bitmask [len(rows), words] i32."""
    if logits.is_cuda:
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32, device=logits.device)
        full[rows] = bitmask.to(logits.device, non_blocking=True)
        _xgrammar().apply_token_bitmask_inplace(logits, full, indices=rows.tolist())
        return
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32)  # [32]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [len(rows), vocab]
    sub = logits.index_select(0, rows)  # [len(rows), vocab]
    logits.index_copy_(0, rows, sub.masked_fill_(~allowed, float("-inf")))


@torch.inference_mode()
def mask_constrained_rows(logits: torch.Tensor, rows: Iterable[tuple[int, SequenceGroup, Sequence]]) -> None:
    """Mask, in place, the logits row of each constrained sequence: (logits row, group, sequence)."""
    constrained = [(i, g, s) for i, g, s in rows if g.params.structured_outputs is not None]
    if not constrained:
        return
    seen: set[int] = set()
    unique = [(i, g, s) for i, g, s in constrained if not (i in seen or seen.add(i))]  # forks share a first row
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(unique), logits.shape[1])  # [num_rows, ceil(vocab / 32)] int32
    for j, (_, group, seq) in enumerate(unique):
        _matcher(group, seq).fill_next_token_bitmask(bitmask, j)
    index = to_device([i for i, _, _ in unique], torch.int64, logits.device)
    apply_token_bitmask(logits, bitmask, index)


def advance_grammars(targets: Seq[tuple[SequenceGroup, Sequence]], token_ids: Seq[int]) -> None:
    """Each constrained sequence's matcher takes its new token; a finished grammar ends the sequence."""
    for (group, seq), token_id in zip(targets, token_ids):
        if group.params.structured_outputs is None:
            continue
        matcher = _matcher(group, seq)
        if not matcher.accept_token(token_id) and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", token_id  # cannot continue the grammar
        elif matcher.is_terminated() and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", token_id


def check_spec(spec: StructuredOutputsParams) -> None:
    """Parse the constraint without compiling it for a tokenizer (milliseconds); ValueError naming the kind."""
    xgr = _xgrammar()
    kind = spec.kind
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(json.dumps(spec.json), any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec.regex)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(spec.grammar)
    except Exception as exc:  # noqa: BLE001 - xgrammar's parse errors
        raise ValueError(f"structured_outputs.{kind} is invalid: {_clean(exc)}") from None
