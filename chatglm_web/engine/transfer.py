"""Host-to-device copies that do not make the host wait.

A copy from ordinary (pageable) host memory to a GPU waits for the work queued before it; from pinned
memory it is queued like any other operation and the host goes on. Every per-step input the engine
sends (token ids, positions, sampling settings, random numbers) goes through ``to_device``, so the
only time a step waits for the GPU is when the chosen ids come back.
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device) -> torch.Tensor:
    """``values`` (a host tensor) on ``device``: as is on the CPU, else an asynchronous copy from pinned memory."""
    if torch.device(device).type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)
