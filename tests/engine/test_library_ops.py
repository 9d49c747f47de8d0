"""The `tokenmill::` operators (engine/library_ops.py): defined again they replace the first
definition; the int8 op finds each layer, a copied one too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tokenmill.engine.library_ops import define_op


def test_defining_an_op_again_replaces_it() -> None:
    """A module imported a second time defines its ops again: no 'registered multiple times'."""
    first = define_op("test_redefined", "(Tensor x) -> Tensor", lambda x: x + 1, lambda x: torch.empty_like(x))
    assert first(torch.zeros(2)).tolist() == [1.0, 1.0]
    second = define_op("test_redefined", "(Tensor x) -> Tensor", lambda x: x + 2, lambda x: torch.empty_like(x))
    assert second(torch.zeros(2)).tolist() == [2.0, 2.0]
    assert torch.ops.tokenmill.test_redefined(torch.zeros(1)).item() == 2.0


def test_fake_implementation_gives_shapes_under_compile() -> None:
    op = define_op("test_shape", "(Tensor x, SymInt n) -> Tensor", lambda x, n: x.new_ones((x.shape[0], n)),
                   lambda x, n: x.new_empty((x.shape[0], n)))
    compiled = torch.compile(lambda x: op(x, 3) * 2, backend="aot_eager", fullgraph=True)
    assert compiled(torch.zeros(4, 1)).tolist() == [[2.0] * 3] * 4


def test_int8_op_reaches_each_layer_and_a_copy_of_it() -> None:
    """The compiled forward's int8 op finds its layer by number; a deep copy gets its own number
    (else the op would run the original's weights for the copy)."""
    pytest.importorskip("torch.ao.quantization")
    from tokenmill.engine.quantization import Int8DynamicLinear, int8_linear_op

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.fail("fbgemm is torch's int8 engine on x86 CPUs; this torch build lacks it")
    torch.manual_seed(0)
    layer = Int8DynamicLinear(nn.Linear(16, 8))
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.bias += 100.0
    x = torch.randn(3, 16)
    assert twin.layer_id != layer.layer_id
    torch.testing.assert_close(int8_linear_op(x, layer.layer_id, 8), layer.matmul(x))
    torch.testing.assert_close(int8_linear_op(x, twin.layer_id, 8), twin.matmul(x))
    assert (int8_linear_op(x, twin.layer_id, 8) - int8_linear_op(x, layer.layer_id, 8)).min() > 99
    gone = layer.layer_id
    del layer
    with pytest.raises(RuntimeError, match=f"int8 layer {gone} no longer exists"):
        int8_linear_op(x, gone, 8)


def test_engine_modules_import_again_after_the_package_is_forgotten() -> None:
    """What an import test or a notebook's autoreload does: the second import defines the ops again."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "import tokenmill.engine.llm\n"
        "for name in [m for m in sys.modules if m == 'tokenmill' or m.startswith('tokenmill.')]:\n"
        "    del sys.modules[name]\n"
        "import tokenmill.engine.llm\n"
        "from tokenmill.engine.cpu_linear import cpu_linear_op\n"
        "x, w = torch.randn(2, 4), torch.randn(3, 4)\n"
        "torch.testing.assert_close(cpu_linear_op(x, w, None, 1), x @ w.T)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
