"""Next-token choice for one row of logits, with the request's own settings and random generator.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the
same tokens whether it runs alone or batched with others.
"""

from __future__ import annotations

import torch

from .generation import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers' RepetitionPenaltyLogitsProcessor) on ids already in the sequence."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 seen_ids: torch.Tensor | None = None) -> int:
    """Pick the next id from a 1-D float32 logits row."""
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.temperature <= 0 or params.top_k == 1:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        k = min(params.top_k, logits.numel()) if params.top_k > 0 else logits.numel()
        values, indices = torch.topk(logits, k)  # sorted, largest first
        if params.top_p < 1.0:
            probs = torch.softmax(values, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = (torch.cumsum(probs, dim=-1) - probs) < params.top_p
            values, indices = values[keep], indices[keep]
        probs = torch.softmax(values, dim=-1)
        return int(indices[torch.multinomial(probs, 1, generator=generator)])
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
