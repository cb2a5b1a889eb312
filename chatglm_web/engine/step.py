"""The model's forward passes, as the scheduler runs them: prefill and the decode step.

``new_cache``         an empty cache for one prompt's prefill
``prefill_chunk``     the next piece of one prompt into that cache
``prefill_together``  several whole prompts in one forward
``prefilled_kv``      a prefilled row's keys and values, to join the running batch's slots
``decode``            one token for every running request, over the batch's KV slots (``kv_slots.py``)

Each returns only the last position's logits: nothing else is sampled from.

Two ways to run them. A model whose layout ``forward.py`` knows (Llama, Qwen2, GLM: ChatGLM3 and the
offline demo model) runs its lean forward: fused projections and a few operators per layer, for
prefill and decode alike, over ``SlotCache`` buffers; on CUDA its decode step is replayed as CUDA
graphs (``graphs.py``). Any other model runs transformers' own forward (prefill into a
``DynamicCache``, left-padded when batched; decode through ``SlotCache.update``). Attention is SDPA
in both (transformers' default implementation, and ``scaled_dot_product_attention`` in the lean one).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import DynamicCache

from chatglm_web.engine.cpu_linear import prepack_linear_layers
from chatglm_web.engine.forward import LeanForward, lean_forward_for
from chatglm_web.engine.graphs import DecodeGraphs
from chatglm_web.engine.kv_slots import SlotCache, prefilled_kv
from chatglm_web.engine.transfer import to_device

log = logging.getLogger(__name__)


class ModelStep:
    def __init__(self, model, *, lean: bool = True, fuse: bool = True, graphs: bool | None = None):
        """``lean=False`` keeps transformers' forward; ``fuse=False`` leaves the weights as they are (the
        lean forward then calls the projections one by one); ``graphs`` (default: on CUDA) replays the
        lean decode step as CUDA graphs."""
        self.model = model
        self.device = next(model.parameters()).device
        self.lean: LeanForward | None = lean_forward_for(model, fuse=fuse) if lean else None
        if graphs is None:
            graphs = self.device.type == "cuda"
        self.graphs = DecodeGraphs(self.lean) if graphs and self.lean is not None else None
        log.info("decode step: %s", self.describe())

    def describe(self) -> str:
        if self.lean is None:
            return "transformers' forward"
        return "lean forward" + (", CUDA graphs" if self.graphs is not None else "")

    # -- prefill --------------------------------------------------------------------------------------
    def new_cache(self, length: int) -> DynamicCache | SlotCache:
        """An empty cache for the prefill of one prompt of ``length`` tokens."""
        if self.lean is None:
            return DynamicCache(config=self.model.config)
        return self._slots(1, length)

    def prefill_chunk(self, ids: list[int], cache: DynamicCache | SlotCache, start: int) -> torch.Tensor:
        """Run ``ids``, the prompt's tokens from position ``start`` on, into ``cache``; the last position's
        logits, [1, vocab]."""
        tokens = torch.tensor([ids], device=self.device)
        if self.lean is None:
            return self.model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        return self.lean(tokens, positions, cache.keys, cache.values, cache.span_for(start + len(ids)))

    def prefill_together(self, prompts: list[list[int]]) -> tuple[DynamicCache | SlotCache, torch.Tensor,
                                                                   list[tuple[int, int]]]:
        """One forward for several whole prompts: (their cache, each prompt's last logits [n, vocab], where
        each prompt's keys and values lie in its row: (start, end))."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        if self.lean is not None:  # right-padded: each row at positions 0 .. n-1; padding is never read
            for i, prompt in enumerate(prompts):
                ids[i, :lengths[i]] = torch.tensor(prompt, device=self.device)
            cache = self._slots(len(prompts), width)
            positions = torch.arange(width, device=self.device).expand(len(prompts), width)
            last = torch.tensor([n - 1 for n in lengths], device=self.device)
            logits = self.lean(ids, positions, cache.keys, cache.values, cache.span_for(width), last=last)
            return cache, logits, [(0, n) for n in lengths]
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, width - lengths[i]:] = torch.tensor(prompt, device=self.device)
            mask[i, width - lengths[i]:] = 1
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1], [(width - n, width) for n in lengths]

    @staticmethod
    def prefilled_kv(cache: DynamicCache | SlotCache, row: int, span: tuple[int, int]) -> list:
        """Per layer, (keys, values) of one prefilled prompt: ``row`` of ``cache``, positions ``span``."""
        return prefilled_kv(cache, row, *span)

    # -- decode ---------------------------------------------------------------------------------------
    def decode(self, last_tokens: list[int], cache: SlotCache, cached: list[int]) -> torch.Tensor:
        """Each running request's next-token logits, [batch, vocab] float32: ``last_tokens`` (not cached yet)
        at positions ``cached`` (the tokens each row already has in ``cache``)."""
        if self.lean is None:
            input_ids = torch.tensor([[token] for token in last_tokens], device=self.device)
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache.step_inputs(cached))
            return out.logits[:, -1].float()
        span = cache.prepare(cached)
        if self.graphs is not None and self.graphs.usable:
            return self.graphs.decode(last_tokens, cached, cache, span).float()
        inputs = to_device(torch.tensor([last_tokens, cached], device="cpu"), self.device)  # one asynchronous copy
        return self.lean(inputs[0, :, None], inputs[1, :, None], cache.keys, cache.values, span).float()

    # -- memory ---------------------------------------------------------------------------------------
    def pack_for_cpu(self) -> int:
        """Store fp32 CPU weights in oneDNN's layout (``cpu_linear.py``); how many layers were packed.

        With the lean forward, its layers are packed (fused ones included) and the model's own linear
        layers are emptied: their plain weights would otherwise stay in memory beside the packed
        copies. After this, only this step runs the model (the engine process's case)."""
        if self.device.type != "cpu":
            return 0
        if self.lean is None:
            return prepack_linear_layers(self.model)
        packed = prepack_linear_layers(self.lean)
        in_use = {id(module) for module in self.lean.modules()}
        for module in self.model.modules():
            if type(module) is nn.Linear and id(module) not in in_use:
                module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
                module.bias = None
        return packed

    @property
    def keeps_slots(self) -> bool:
        """Whether the engine should keep its KV slots when it goes idle: the captured graphs read them."""
        return self.graphs is not None and self.graphs.usable

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _slots(self, rows: int, length: int) -> SlotCache:
        weight = self.lean.embed.weight
        return SlotCache.empty(len(self.lean.layers), slots=rows, capacity=length, kv_heads=self.lean.kv_heads,
                               head_dim=self.lean.head_dim, dtype=weight.dtype, device=self.device)
