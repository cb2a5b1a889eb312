"""fp32 linear layers on the CPU with their weights prepacked for oneDNN.

At the batch sizes of a chat server (1 to 16 rows per decode step), PyTorch's default CPU linear
spends much of its time re-reading the weight in its plain layout. oneDNN with the weight stored
once in its own blocked layout is faster, and more so the more rows a step has. ``PackedLinear``
calls oneDNN's linear on the plain (dense) activations with the prepacked weight, the op that
PyTorch's own compiler (inductor) emits for fp32 CPU linears; ``torch.utils.mkldnn.MkldnnLinear``,
the public wrapper, converts the activations to oneDNN's tensor type and back around every call,
which costs about as much as the product itself at one row. Measured on this project's 87 M-parameter
bench model (2 cores): a 1024 x 5460 product took 1,030 us plain, 442 us with ``MkldnnLinear`` and
280-330 us here at 1 row; 2,475 / 1,314 / 706 us at 8 rows. The same weights give the same logits up to
float rounding (summation order).

Applied by the engine process (``process.py``) to its CPU model, whose decode loop runs in
that process's main thread (oneDNN's kernels are slower when called from a thread started later).
Only plain fp32 ``nn.Linear`` layers are packed: not GPU weights, not 16-bit ones, not quantized
layers (bitsandbytes' are subclasses of ``nn.Linear`` and are left alone). The weights become buffers
in oneDNN's layout: such a model is for inference only (no ``state_dict`` round trip, no ``.to(device)``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.mkldnn import MkldnnLinear


class PackedLinear(nn.Module):
    """``nn.Linear`` for fp32 CPU inference with the weight in oneDNN's blocked layout (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _mkldnn_linear(linear: nn.Linear) -> nn.Module:
    return MkldnnLinear(linear, torch.float32)


@functools.cache
def packing() -> type | None:
    """How this torch build packs a linear layer: ``PackedLinear`` (its private oneDNN ops, which
    tests/test_cpu_linear.py names), else the public ``MkldnnLinear``, else None. Each is tried once on a
    small layer and must give the plain layer's output: a build or CPU where one fails or differs
    keeps plain weights instead of failing at start-up."""
    if not torch.backends.mkldnn.is_available():
        return None
    probe = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    for candidate in (PackedLinear, _mkldnn_linear):
        try:
            with torch.inference_mode():
                if torch.allclose(candidate(probe)(x), probe(x), rtol=1e-4, atol=1e-5):
                    return candidate
        except Exception:  # a missing op, a CPU oneDNN does not support
            continue
    return None


def prepack_linear_layers(model: nn.Module) -> int:
    """Replace every plain fp32 ``nn.Linear`` of a CPU model by its oneDNN-prepacked twin; returns how many."""
    packed = packing()
    if packed is None:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
                setattr(parent, name, packed(child))
                replaced += 1
    return replaced
