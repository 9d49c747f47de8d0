"""Quantized linear layers for CPU inference (opt-in; the default stays exact float32).

``quantize_model(model, mode)`` swaps the model's ``nn.Linear`` modules (the decoder layers' and,
by default, the output head; never the input embeddings) for one of these modules, built on
torch's own CPU kernels:

- ``"int8"``: :class:`Int8DynamicLinear`, int8 weights (symmetric, one scale per output channel)
  run by fbgemm's dynamically quantized matmul (``quantized::linear_dynamic``; activations are
  quantized on the fly, one scale per token). On an AVX2 CPU this is the fast int8 kernel torch has: the
  weight-only ``aten._weight_int8pack_mm`` has a vectorized path for AVX-512 and ARM only and runs
  4-40x slower than float32 here (measured, see BENCHMARKS.md).
- ``"int4"``: :class:`Int4WeightOnlyLinear`, 4-bit weights in groups of 32 input channels with a
  scale and a minimum per group (the layout of GGUF's Q4_1, so the default model's Q4_1 weights
  are kept exactly), run by ``aten._weight_int4pack_mm_for_cpu``. Accurate, but on an AVX2 CPU
  torch's int4 kernel is slower than float32 (it is vectorized for AVX-512): memory, not speed.

torch marks its quantized tensor types deprecated; fbgemm's prepack still needs one at load time.

Both are CPU-only: :func:`check_quantization` rejects them on another device.
"""

from __future__ import annotations

import itertools
import logging
import warnings
import weakref

import torch
from torch import nn

from tokenmill.engine.cpu_linear import SmallRowsLinear
from tokenmill.engine.library_ops import define_op

logger = logging.getLogger(__name__)

QUANTIZATION_MODES = ("int8", "int4")
# Output head by mode, chosen by measurement and accuracy: int8 speeds it up (the tied 49152 x 576
# head is a fifth of SmolLM2's weights); int4 would slow it down and lose the GGUF's 8-bit head.
QUANTIZE_LM_HEAD = {"int8": True, "int4": False}
INT4_GROUP_SIZE = 32  # input channels per scale/minimum (GGUF's Q4_0/Q4_1 block size)
QUANTIZATION_ATTR = "tokenmill_quantization"  # set on a quantized model: its mode


def check_quantization(quantization: str | None, device: torch.device | str | None = None) -> None:
    """ValueError for an unknown mode, or a mode the device cannot run."""
    if quantization is None:
        return
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantization={quantization!r} is invalid: allowed None, {', '.join(map(repr, QUANTIZATION_MODES))}"
        )
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(
            f"quantization={quantization!r} is invalid on device={str(device)!r}: the quantized kernels are "
            "CPU-only; allowed None on this device (or device='cpu')"
        )
    if quantization == "int8" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantization='int8' is invalid here: this torch build has no fbgemm quantized engine "
            f"(has {torch.backends.quantized.supported_engines}); allowed None, 'int4'"
        )


def check_quantization_fits(quantization: str | None, tensor_parallel_size: int) -> None:
    """ValueError for a mode the rest of the engine configuration cannot run."""
    if quantization is None:
        return
    if tensor_parallel_size > 1:
        raise ValueError(
            f"quantization={quantization!r} is invalid with tensor_parallel_size={tensor_parallel_size}: "
            "the ranks shard float weights; allowed None, or tensor_parallel_size=1"
        )


def model_quantization(model: nn.Module) -> str | None:
    """The mode a model was quantized with by :func:`quantize_model`, or None."""
    return getattr(model, QUANTIZATION_ATTR, None)


class _QuantizedLinear(nn.Module):
    """Shared shape bookkeeping. ``weight`` is a meta tensor: its shape answers callers that read
    ``module.weight.shape`` (e.g. the vocabulary size from the output head) at no memory cost."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.empty((out_features, in_features), device="meta")  # shape only

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8DynamicLinear(_QuantizedLinear):
    """int8 per-output-channel weights, fbgemm's dynamic-activation int8 matmul, float32 out.

    fbgemm quantizes activations with one range per call. Each token's row is first divided by its
    own absolute maximum, and a constant row [1, -1, 0, ...] joins the call, so that range is always
    [-1, 1]: in effect per-token activation scales (per-tensor ones cost the default model 2.6x in
    perplexity), and a token's result does not depend on the other tokens of the step."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features)
        weight = linear.weight.detach().float()  # [N, K]
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [N]
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor types are deprecated; fbgemm's prepack still takes them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        torch.backends.quantized.engine = "fbgemm"  # process-wide: the packed weights are fbgemm's
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # bias added after the rescale
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        range_row = torch.zeros(1, linear.in_features)
        range_row[0, 0], range_row[0, -1] = 1.0, -1.0
        self.register_buffer("range_row", range_row, persistent=False)  # [1, K]
        self._register()

    def _register(self) -> None:
        """A number of its own, by which the compiled forward's op finds this layer."""
        self.layer_id = next(_layer_ids)
        _INT8_LAYERS[self.layer_id] = self

    def __setstate__(self, state) -> None:  # a copy (copy.deepcopy, pickle) is a layer of its own
        super().__setstate__(state)
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if torch.compiler.is_compiling():  # the packed weights are opaque to the compiler
            return int8_linear_op(x, self.layer_id, self.out_features)
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # [M, K]
        row_max = flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [M, 1]
        rows = torch.cat([flat / row_max, self.range_row])  # [M + 1, K], every value in [-1, 1]
        # reduce_range=True: 7-bit activations, as fbgemm needs on AVX2 to avoid int16 overflow.
        out = torch.ops.quantized.linear_dynamic(rows, self._packed, True)[:-1] * row_max  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


# A compiled forward (`enforce_eager=False`) calls each int8 layer as one opaque op: fbgemm's packed
# weights are a TorchScript object torch.compile cannot trace, so the graph carries the layer's
# number and the op finds the layer (weakly held: a dropped model frees its layers). The numbers
# are constants of the graph, so each int8 model compiles a graph of its own.
_INT8_LAYERS: "weakref.WeakValueDictionary[int, Int8DynamicLinear]" = weakref.WeakValueDictionary()
_layer_ids = itertools.count()


def _int8_linear_impl(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    try:
        layer = _INT8_LAYERS[layer_id]
    except KeyError:
        raise RuntimeError(f"tokenmill::int8_linear: int8 layer {layer_id} no longer exists (its model was freed)") from None
    return layer.matmul(x)


int8_linear_op = define_op(
    "int8_linear", "(Tensor x, int layer_id, SymInt out_features) -> Tensor", _int8_linear_impl,
    lambda x, layer_id, out_features: x.new_empty((*x.shape[:-1], out_features)), dispatch_key="CPU",
)


class Int4WeightOnlyLinear(_QuantizedLinear):
    """4-bit weights, groups of INT4_GROUP_SIZE input channels with (scale, minimum); float32 out."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__(linear.in_features, linear.out_features)
        if linear.in_features % group_size:
            raise ValueError(f"in_features={linear.in_features} must be a multiple of group_size={group_size}")
        self.group_size = group_size
        weight = linear.weight.detach().float()  # [N, K]
        n, k = weight.shape
        groups = weight.view(n, k // group_size, group_size)  # [N, K/g, g]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/g]
        scales = ((high - low) / 15.0).clamp(min=1e-12)  # [N, K/g]
        q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15)  # [N, K/g, g] in 0..15
        # The kernel computes w = (q - 8) * scale + zero, so zero = minimum + 8 * scale.
        scales_and_zeros = torch.stack([scales, low + 8 * scales], dim=-1)  # [N, K/g, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous())  # [K/g, N, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(n, k), 1)
        self.register_buffer("packed_weight", packed)  # [N, K/2] uint8
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features).float()  # [M, K]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed_weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


_MODULES = {"int8": Int8DynamicLinear, "int4": Int4WeightOnlyLinear}


@torch.no_grad()
def quantize_model(model: nn.Module, quantization: str | None, *, quantize_lm_head: bool | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` modules of ``model`` in place (embeddings stay float); returns it.
    ``quantize_lm_head`` None: the mode's default (QUANTIZE_LM_HEAD)."""
    check_quantization(quantization, next(model.parameters()).device)
    if quantization is None:
        return model
    if quantize_lm_head is None:
        quantize_lm_head = QUANTIZE_LM_HEAD[quantization]
    done = model_quantization(model)
    if done is not None:
        if done != quantization:
            raise ValueError(f"quantization={quantization!r} is invalid: the model is already quantized as {done!r}")
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    make = _MODULES[quantization]
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (nn.Linear, SmallRowsLinear) or (child is head and not quantize_lm_head):
                continue
            setattr(parent, name, make(child))
            replaced += 1
    setattr(model, QUANTIZATION_ATTR, quantization)
    logger.info("quantization=%s: %d linear layers replaced (output head %s)", quantization, replaced,
                "included" if quantize_lm_head else "kept float")
    return model
