"""The model's forward passes, as the scheduler runs them: prefill and the decode step.

``prefill_chunk``     the next piece of one prompt into that request's own cache
``prefill_together``  several whole prompts in one left-padded forward
``decode``            one token for every running request, over the batch's KV slots (``kv_slots.py``)

Each returns only the last position's logits (``logits_to_keep=1``): nothing else is sampled from.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from chatglm_web.engine.kv_slots import SlotCache


class ModelStep:
    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def prefill_chunk(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """Run ``ids`` (the next tokens of one prompt) into ``cache``; the last position's logits, [1, vocab]."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def prefill_together(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, list[int]]:
        """One forward for several whole prompts, left-padded to the longest: (their cache, each prompt's
        last logits [n, vocab], each prompt's padding)."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, width - lengths[i]:] = torch.tensor(prompt, device=self.device)
            mask[i, width - lengths[i]:] = 1
        cache = self.new_cache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1], [width - n for n in lengths]

    def decode(self, last_tokens: list[int], cache: SlotCache, cached: list[int]) -> torch.Tensor:
        """Each running request's next-token logits, [batch, vocab] float32: ``last_tokens`` (not cached yet)
        at positions ``cached`` (the tokens each row already has in ``cache``)."""
        input_ids = torch.tensor([[token] for token in last_tokens], device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache.step_inputs(cached))
        return out.logits[:, -1].float()

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
