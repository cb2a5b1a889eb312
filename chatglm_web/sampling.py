"""Next-token choice for one row of logits, with the request's own settings and random generator.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the
same tokens whether it runs alone or batched with others.

Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``. It avoids a
full-vocabulary sort (the costliest part of sampling on a 65k vocabulary) whenever the nucleus
lies within the top 64 tokens, as it does for a trained model's usual peaked distributions; only
flat ones are sorted whole. The draw itself is one uniform number mapped through the cumulative
distribution (cheaper than ``torch.multinomial`` over the whole vocabulary).
"""

from __future__ import annotations

import torch

from .generation import SamplingParams

_FAST_K = 64


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers' RepetitionPenaltyLogitsProcessor) on ids already in the sequence."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def top_p_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with everything outside the top-p nucleus set to 0 (not renormalized)."""
    k = min(_FAST_K, probs.numel())
    values = torch.topk(probs, k).values
    cumulative = torch.cumsum(values, 0)
    if float(cumulative[-1]) >= top_p:  # nucleus within the top k: its smallest member is the threshold
        threshold = values[int(torch.searchsorted(cumulative, torch.tensor(top_p, dtype=cumulative.dtype)))]
    else:  # flat distribution: sort it all
        values = torch.sort(probs, descending=True).values
        cumulative = torch.cumsum(values, 0)
        position = int(torch.searchsorted(cumulative, torch.tensor(top_p, dtype=cumulative.dtype)))
        threshold = values[min(position, values.numel() - 1)]
    return torch.where(probs >= threshold, probs, torch.zeros_like(probs))


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn with probability proportional to ``weights`` (non-negative)."""
    cdf = torch.cumsum(weights, 0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), weights.numel() - 1)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 seen_ids: torch.Tensor | None = None) -> int:
    """Pick the next id from a 1-D float32 logits row."""
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.temperature <= 0 or params.top_k == 1:
        return int(torch.argmax(logits))
    indices = None
    if 0 < params.top_k < logits.numel():
        logits, indices = torch.topk(logits, params.top_k)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = top_p_probs(probs, params.top_p)
    choice = draw(probs, generator)
    return int(indices[choice]) if indices is not None else choice
