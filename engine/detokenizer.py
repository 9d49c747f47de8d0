"""Incremental detokenization with stop strings.

Each generated token is decoded inside a small window of ids instead of re-decoding the
whole output: ``decode(ids[prefix_offset:])`` minus ``decode(ids[prefix_offset:read_offset])``
is the new text (the prefix/read-offset technique of vLLM and TGI). The window keeps the
previous piece as context, so decoders that act on the first token (a SentencePiece leading
space) or merge bytes across tokens (byte-level BPE) give the same text as one
``tokenizer.decode(output_ids)``. A window whose text ends in U+FFFD (an incomplete UTF-8
character) is not read until a later token completes it, or until the output finishes. Nor is
one that ends in a byte-fallback token (``<0xNN>``, SentencePiece style): such decoders turn a
whole run of byte tokens into U+FFFD when any byte of it is invalid, so the run's text is known
only once a token that is not a byte ends it.

The output is decoded on its own, as ``tokenizer.decode(output_ids, skip_special_tokens=...)``
does; windows are decoded without ``clean_up_tokenization_spaces`` (off by default, and
ignored by transformers for BPE tokenizers).
"""

from __future__ import annotations

import re
from typing import Any, Callable

REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback token


class IncrementalDetokenizer:
    """Text of one output sequence, built token by token, with stop-string checks."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={stop!r} is invalid: allowed a tuple of non-empty strings")
        self.tokenizer = tokenizer
        self._decode_ids = make_decoder(tokenizer, skip_special_tokens)
        self._id_to_piece = _id_to_piece_function(tokenizer)
        self._skipped_ids = _special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self.prompt_token_ids = prompt_token_ids  # kept for reference; the output is decoded on its own
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_holdback = max((len(s) for s in self.stop), default=1) - 1
        self.output_ids: list[int] = []
        self.stop_str: str | None = None  # the stop string that ended the text, if any
        self._read_text = ""  # text of output_ids[:read_offset]
        self._prefix_offset = 0  # window start: context for decoding the tokens after read_offset
        self._read_offset = 0  # output_ids[:read_offset] are turned into _read_text
        self._prefix_text = ""  # decode(output_ids[prefix_offset:read_offset])
        self._num_sent_chars = 0  # characters of text handed out by take_delta
        self._pending_cache: tuple[int, str] = (0, "")  # (len(output_ids), text of unread tokens)

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids)

    def append(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string if the text now contains one, else None."""
        if self.stop_str is not None:
            raise RuntimeError(f"append(token_id={token_id}) after stop string {self.stop_str!r} ended the text")
        self.output_ids.append(token_id)
        if token_id in self._skipped_ids:
            return None  # decodes to nothing, and does not end a run of byte tokens either
        if self._is_byte_piece(token_id):
            return None  # a run of byte tokens is decoded only once it ends
        window_text = self._decode(self.output_ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return None  # nothing new yet (skipped special token, or an incomplete character)
        new_text = window_text[len(self._prefix_text) :]
        num_old_chars = len(self._read_text)
        self._read_text += new_text
        next_prefix_text = self._decode(self.output_ids[self._read_offset :])
        if next_prefix_text:
            self._prefix_offset, self._prefix_text = self._read_offset, next_prefix_text
        else:  # the new piece alone decodes to nothing: keep the older context in the window
            self._prefix_text = window_text
        self._read_offset = len(self.output_ids)
        return self._check_stop(num_old_chars)

    def _is_byte_piece(self, token_id: int) -> bool:
        if self._id_to_piece is None:
            return False
        piece = self._id_to_piece(token_id)
        return isinstance(piece, str) and len(piece) == 6 and _BYTE_PIECE.fullmatch(piece) is not None

    def _check_stop(self, num_old_chars: int) -> str | None:
        """Find the earliest stop string overlapping the text added after ``num_old_chars``."""
        best: tuple[int, int, str] | None = None  # (start, -length, stop)
        for s in self.stop:
            start = self._read_text.find(s, max(0, num_old_chars - len(s) + 1))
            if start >= 0 and (best is None or (start, -len(s)) < best[:2]):
                best = (start, -len(s), s)
        if best is None:
            return None
        start, _, s = best
        self._read_text = self._read_text[: start + len(s) if self.include_stop_str_in_output else start]
        self.stop_str = s
        return s

    def _pending_text(self) -> str:
        """Text of the tokens not read yet (it may end in an incomplete character)."""
        num_ids = len(self.output_ids)
        if self.stop_str is not None or num_ids == self._read_offset:
            return ""
        if self._pending_cache[0] != num_ids:
            window_text = self._decode(self.output_ids[self._prefix_offset :])
            self._pending_cache = (num_ids, window_text[len(self._prefix_text) :])
        return self._pending_cache[1]

    # -- output ---------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The whole output text so far; once finished, ``tokenizer.decode(output_ids)`` (cut at a stop)."""
        return self._read_text + self._pending_text()

    @property
    def finished_by_stop(self) -> bool:
        return self.stop_str is not None

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. Unless finished (or stopped), hold back a tail that could still
        become a stop string and a trailing incomplete character; the deltas add up to ``text``."""
        text = self.text
        end = len(text)
        if not finished and self.stop_str is None:
            end = max(len(self._read_text) - self.stop_holdback, 0)
            while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
                end -= 1
        if end <= self._num_sent_chars:
            return ""
        delta = text[self._num_sent_chars : end]
        self._num_sent_chars = end
        return delta


def make_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`ids -> tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.

    For a tokenizer that uses transformers' own decode over a Rust `tokenizers` backend, the backend is
    called directly: the same text without the wrapper's per-call argument checks (which cost far more
    than the decode itself for the short windows decoded per token).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and _uses_stock_decode(tokenizer) and hasattr(backend, "decode"):
        def decode_backend(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode_backend

    def decode_wrapper(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    return decode_wrapper


def _uses_stock_decode(tokenizer: Any) -> bool:
    """Whether decode/_decode are transformers' fast-tokenizer ones (no subclass adds its own steps)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    )


def _id_to_piece_function(tokenizer: Any) -> Callable[[int], Any] | None:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and _uses_stock_decode(tokenizer) and hasattr(backend, "id_to_token"):
        return backend.id_to_token
    return getattr(tokenizer, "convert_ids_to_tokens", None)


def _special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer decides what it skips: its added tokens marked special
        return frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))
