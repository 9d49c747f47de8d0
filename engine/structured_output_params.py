"""What a request constrains its output to (vLLM's `StructuredOutputsParams`): one of json / regex / choice /
grammar / json_object. Plain data, no xgrammar import: the grammar is compiled by engine/structured_output.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint. `json` is a JSON schema (a dict or its JSON text), `choice` a list of
    strings, `grammar` an EBNF grammar in xgrammar's (GBNF-like) syntax with a `root` rule."""

    json: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError(f"structured_outputs.choice={self.choice!r} is invalid: allowed a non-empty list of "
                                 "non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is invalid: not JSON ({exc})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json={self.json!r} is invalid: allowed a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name}={value!r} is invalid: allowed a non-empty string")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object={self.json_object!r} is invalid: allowed true or false")
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs sets {set_kinds or 'nothing'}: allowed exactly one of {list(KINDS)}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached by: (kind, canonical spec text)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            return kind, json.dumps(value, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(list(value))
        if kind == "json_object":
            return kind, ""
        return kind, value
