"""The lean decode step replayed as CUDA graphs: one launch per step instead of one per operator.

A graph is captured once per (batch bucket, span bucket) over the running batch's KV slots:

- batch bucket: the running rows rounded up to a power of two (1, 2, 4, 8, ...). Rows past the real
  ones decode token 0 at position 0 of slots no request holds (``SlotCache`` keeps slots in powers of
  two, so those slots exist); their logits are dropped.
- span bucket: the positions attention reads, rounded up to a power of two (at most the capacity).

A graph reads its inputs from its own static tensors (token ids, positions) and writes its logits
into a static output; each step copies the real inputs in (one asynchronous copy from pinned memory)
and replays. When the cache grows (its tensors are replaced: ``SlotCache.version``), the graphs of
the old tensors are dropped and captured again as steps need them; on a GPU the engine keeps its
slots between bursts, so the graphs outlive a quiet minute. The first run of a shape does the step
for real while capturing it (its writes are the step's own, so replaying them again is harmless).

Capture is CUDA-only; ``capture`` is a parameter so that tests on a CPU drive the same bucketing,
padding and static tensors with an eager stand-in. If a capture fails (an operator that cannot be
captured, say a quantized kernel that synchronizes), the step runs eagerly from then on, with a
warning.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from chatglm_web.engine.forward import LeanForward
from chatglm_web.engine.kv_slots import SlotCache
from chatglm_web.engine.transfer import to_device

log = logging.getLogger(__name__)


def bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


class Replay:
    """A captured step: ``replay()`` runs it again over the same tensors; ``output`` is where it writes."""

    def __init__(self, graph, output: torch.Tensor):
        self.graph = graph
        self.output = output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def cuda_capture(run: Callable[[], torch.Tensor], pool, device) -> Replay:
    """Warm up on a side stream (the step for real), then capture ``run`` into a CUDA graph on ``device``.
    Only this thread's CUDA work is captured (``thread_local``): another thread's (a web request's) is no
    error."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = run()
    return Replay(graph, output)


class _Static:
    """One captured shape: its input tensors and its replay."""

    def __init__(self, rows: int, device):
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.replay: Replay | None = None


class DecodeGraphs:
    """CUDA graphs of ``forward``'s decode step (see the module doc)."""

    def __init__(self, forward: LeanForward, capture: Callable | None = None):
        self.forward = forward
        self._capture = capture or cuda_capture
        self._pool = torch.cuda.graph_pool_handle() if capture is None and torch.cuda.is_available() else None
        self._shapes: dict[tuple[int, int], _Static] = {}
        self._buffers: int | None = None  # the version (tensor set) of the cache the graphs read
        self.usable = True
        self.captures = 0  # shapes captured so far (bench and log)

    def decode(self, last_tokens: list[int], lengths: list[int], cache: SlotCache, span: int) -> torch.Tensor:
        """The step's logits [rows, vocab]: ``last_tokens`` at positions ``lengths`` (``cache.prepare``
        has made room; ``span`` positions hold every row's data)."""
        rows = len(last_tokens)
        if cache.version != self._buffers:  # new or grown tensors: the captured graphs read freed memory
            self._shapes.clear()
            self._buffers = cache.version
        shape = (bucket(rows), min(cache.capacity, bucket(span)))
        static = self._shapes.get(shape)
        fresh = static is None
        if fresh:
            static = self._shapes[shape] = _Static(shape[0], cache.keys[0].device)
        padding = [0] * (shape[0] - rows)  # rows past the real ones: token 0 at position 0 of a free slot
        inputs = torch.tensor([last_tokens + padding, lengths + padding], device="cpu")
        inputs = to_device(inputs, static.ids.device)  # one asynchronous copy
        static.ids.copy_(inputs[0, :, None], non_blocking=True)
        static.positions.copy_(inputs[1, :, None], non_blocking=True)
        if fresh:
            try:
                static.replay = self._capture(
                    lambda: self.forward(static.ids, static.positions, cache.keys, cache.values, shape[1]), self._pool,
                    static.ids.device)
                self.captures += 1
                log.info("captured the decode step for %d rows over %d positions", *shape)
            except Exception as error:  # noqa: BLE001 - any failure: run eagerly from now on
                log.warning("decode step not captured (%s: %s); it runs eagerly", type(error).__name__, error)
                self.usable = False
                self._shapes.clear()
                return self.forward(static.ids[:rows], static.positions[:rows], cache.keys, cache.values, span)
        return static.replay.replay()[:rows]
