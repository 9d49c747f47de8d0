"""The `tokenmill::` operators a compiled forward calls, registered through torch.library's plain API.

`torch.library.custom_op` wraps every call in Python (argument defaults, aliasing checks, version
bumps of mutated arguments): ~0.1 ms a call for the mutating attention op and ~10 us for a plain
one, where a CPU decode step calls 30 + 211 of them. `Library.define` + `impl` + `register_fake`
costs one dispatcher call. As with `custom_op`, defining an op again (its module imported a second
time: `importlib.reload`, an import test that forgets the package) replaces the first definition.
"""

from __future__ import annotations

from typing import Callable

import torch

# Kept on torch.library rather than here: it must outlive a second import of this package, whose
# definitions replace the first ones' (Library._destroy is how torch's own custom_op does that).
_LIBRARIES: dict[str, torch.library.Library] = torch.library.__dict__.setdefault("_tokenmill_op_libraries", {})


def define_op(name: str, schema: str, impl: Callable, fake: Callable,
              dispatch_key: str = "CompositeExplicitAutograd") -> torch._ops.OpOverload:
    """Define `tokenmill::<name><schema>` with `impl` for `dispatch_key` and `fake` for shapes;
    returns the op (`torch.ops.tokenmill.<name>.default`)."""
    old = _LIBRARIES.pop(name, None)
    if old is not None:
        old._destroy()
    lib = torch.library.Library("tokenmill", "FRAGMENT")
    lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    lib.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"tokenmill::{name}", fake, lib=lib)
    _LIBRARIES[name] = lib
    return getattr(torch.ops.tokenmill, name).default
