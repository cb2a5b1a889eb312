"""fp32 linear layers on the CPU with their weights prepacked for oneDNN.

At the batch sizes of a chat server (1 to 16 rows per decode step), PyTorch's default CPU linear
spends much of its time re-reading the weight in its plain layout. oneDNN with the weight stored
once in its own blocked layout (``torch.utils.mkldnn.MkldnnLinear``) is faster, and more so the
more rows a step has: on this project's 87 M-parameter bench model, the linear layers of one step
took 32 ms instead of 53 ms at 8 rows and 21 ms instead of 27 ms at 1 row (see BENCHMARKS.md).
The same weights give the same logits up to float rounding (summation order).

Applied by the engine process (``engine_process.py``) to its CPU model, whose decode loop runs in
that process's main thread: measured here, oneDNN's kernels lose most of their gain when called
from a thread started later (the in-process engine's worker thread), so the in-process engine keeps
plain weights. Only plain fp32 ``nn.Linear`` layers are packed: not GPU weights, not 16-bit ones,
not quantized layers (bitsandbytes' are subclasses of ``nn.Linear`` and are left alone). The
weights become buffers in oneDNN's layout: such a model is for inference only (no ``state_dict``
round trip, no ``.to(device)``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.mkldnn import MkldnnLinear


def prepack_linear_layers(model: nn.Module) -> int:
    """Replace every plain fp32 ``nn.Linear`` of a CPU model by its oneDNN-prepacked twin; returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
                setattr(parent, name, MkldnnLinear(child, torch.float32))
                replaced += 1
    return replaced
