"""The running batch's KV cache: one preallocated slot per running request. The only code that touches
the batch's KV tensors (the engine schedules; this stores).

    cache = SlotCache()
    cache.add(prefilled_kv(prefill_cache))       # a request's prefilled keys/values -> the next slot
    inputs = cache.step_inputs(cached_lengths)   # one decode step: cache, 4-D mask, position ids
    model(input_ids=last_tokens, use_cache=True, **inputs)   # the model calls cache.update() per layer
    cache.keep([0, 2])                           # slots that go on, in order; the others are freed

Layout: per layer, keys and values of shape [rows, kv heads, capacity, head dim], allocated when the
first request joins and grown (by doubling) when a slot or a position does not fit. Slot i holds its
request's tokens at positions 0 .. n_i - 1 and writes each new token at its own position n_i: no left
padding, and no copy of the whole cache per step (a ``DynamicCache`` concatenates every layer's keys and
values with the new token at every step). A step reads the first ``span`` positions of the running
slots (views, no copy), ``span`` being the longest slot rounded up to a multiple of ``SPAN_STEP``; a
boolean mask hides each slot's positions past its own length. So a step's shapes change only when
the batch size changes or the longest request crosses a multiple of ``SPAN_STEP``: a fixed set of
shapes, as CUDA graphs need (``graphs.py`` captures one per batch-size and span bucket). A cache's
tensors change only when it grows: ``version`` numbers each set of tensors (unique in the process), so a
captured graph knows when its buffers are gone.
"""

from __future__ import annotations

import itertools

import torch
from transformers import DynamicCache

SPAN_STEP = 64  # attention reads whole blocks of this many positions
FIRST_CAPACITY = 256  # positions per slot allocated at first; doubled when a request needs more
_buffer_sets = itertools.count(1)  # every set of KV tensors made, in this process, gets its own number


def prefilled_kv(cache: DynamicCache | SlotCache, row: int = 0, start: int = 0,
                 end: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys, values) of one row of a prefill's cache, positions ``start`` to ``end`` (default:
    all after ``start``, a left padding)."""
    if isinstance(cache, SlotCache):
        return [(keys[row, :, start:end], values[row, :, start:end]) for keys, values in zip(cache.keys, cache.values)]
    return [(layer.keys[row, :, start:end], layer.values[row, :, start:end]) for layer in cache.layers]


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class SlotCache:
    """KV tensors of the running batch, a slot per request (see the module doc)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # slots in use: 0 .. rows - 1
        self._write = self._index = None  # set by step_inputs for the model's update() calls
        self._span = 0  # positions the last step read: every slot's data lies before it
        self.version = 0  # which tensors these are: a new number, unique in the process, whenever they are replaced

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled request's keys and values (per layer, each [kv heads, length, head dim]) into
        the next slot. If growing the buffers fails (out of memory), the running slots are left as they were."""
        length = kv[0][0].shape[1]
        if not self.keys:
            self._allocate(kv, slots=1, capacity=max(FIRST_CAPACITY, _round_up(length + 1, SPAN_STEP)))
        else:
            self._grow(slots=self.rows + 1, capacity=length + 1)
        for keys, values, (new_keys, new_values) in zip(self.keys, self.values, kv):
            keys[self.rows, :, :length] = new_keys
            values[self.rows, :, :length] = new_values
        self.rows += 1
        self._span = max(self._span, _round_up(length, SPAN_STEP))

    @classmethod
    def empty(cls, layers: int, *, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype, device) -> SlotCache:
        """A cache of ``slots`` slots (all in use, none filled) of at least ``capacity`` positions: a prefill's."""
        cache = cls()
        shape = (slots, kv_heads, _round_up(capacity, SPAN_STEP), head_dim)
        cache.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cache.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cache.rows = slots
        cache.version = next(_buffer_sets)
        return cache

    def span_for(self, positions: int) -> int:
        """How many positions a step reads when its rows hold up to ``positions`` tokens (new ones included)."""
        return min(self.capacity, _round_up(positions, SPAN_STEP))

    def prepare(self, lengths: list[int]) -> int:
        """Make room for one new token in each running slot (``lengths``: the tokens each holds, in order);
        the span the step reads (every slot's data, its new token included, lies before it)."""
        assert len(lengths) == self.rows
        self._grow(slots=self.rows, capacity=max(lengths) + 1)
        self._span = self.span_for(max(lengths) + 1)
        return self._span

    def step_inputs(self, lengths: list[int]) -> dict:
        """transformers' keyword arguments for one decode step of the running slots, in order (the
        model then calls ``update`` per layer); ``lengths``: how many tokens each slot holds."""
        span = self.prepare(lengths)
        device = self.keys[0].device
        self._write = torch.tensor(lengths, device=device)
        self._index = torch.arange(self.rows, device=device)
        visible = torch.arange(span, device=device)[None, :] <= self._write[:, None]  # [rows, span]
        return {"cache": self, "attention_mask": visible[:, None, None, :],
                "position_ids": self._write[:, None]}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer with the step's new keys/values ([rows, kv heads, 1, head dim]):
        store them at each slot's own position, return the slots' first ``span`` positions."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._index, :, self._write] = key_states[:, :, 0]
        values[self._index, :, self._write] = value_states[:, :, 0]
        return keys[:self.rows, :, :self._span], values[:self.rows, :, :self._span]

    def keep(self, rows: list[int]) -> None:
        """Keep these slots (ascending), moved to the front in this order; the others are freed."""
        for target, source in enumerate(rows):
            if source != target:  # source >= target: a slot is read before anything overwrites it
                for keys, values in zip(self.keys, self.values):
                    keys[target, :, :self._span] = keys[source, :, :self._span]
                    values[target, :, :self._span] = values[source, :, :self._span]
        self.rows = len(rows)

    # -- buffers ------------------------------------------------------------------------------------
    def _allocate(self, kv, *, slots: int, capacity: int) -> None:
        def buffer(like: torch.Tensor) -> torch.Tensor:
            return like.new_zeros(slots, like.shape[0], capacity, like.shape[2])

        self.keys = [buffer(keys) for keys, _ in kv]
        self.values = [buffer(values) for _, values in kv]
        self.version = next(_buffer_sets)

    def _grow(self, *, slots: int, capacity: int) -> None:
        """Make room for ``slots`` slots of ``capacity`` positions (doubling what is short), keeping the data."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots, new_capacity = self.slots, self.capacity
        while new_slots < slots:
            new_slots *= 2
        while new_capacity < capacity:
            new_capacity *= 2
        grown = []
        for tensors in (self.keys, self.values):  # build all first: a failure leaves the old buffers in use
            grown.append([])
            for old in tensors:
                new = old.new_zeros(new_slots, old.shape[1], new_capacity, old.shape[3])
                new[:self.rows, :, :self._span] = old[:self.rows, :, :self._span]
                grown[-1].append(new)
        self.keys, self.values = grown
        self.version = next(_buffer_sets)
