"""Next-token choice for one row of logits, with the request's own settings and random generator.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the
same tokens whether it runs alone or batched with others.

Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``. It avoids a
full-vocabulary sort (the costliest part of sampling on a 65k vocabulary) whenever the nucleus
lies within the top 64 tokens, as it does for a trained model's usual peaked distributions; only
flat ones are sorted whole (on a GPU every row is sorted: see ``top_p_probs``). The draw itself is
one uniform number mapped through the cumulative distribution (cheaper than ``torch.multinomial``
over the whole vocabulary). A batch of rows is sampled with one pass of each operation and one
transfer of the chosen ids to the host: nothing else in sampling makes the host wait for the device.
"""

from __future__ import annotations

import random

import torch

from chatglm_web.engine.transfer import to_device
from chatglm_web.generation import SamplingParams

_FAST_K = 64


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers' RepetitionPenaltyLogitsProcessor) on ids already in the sequence."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def top_p_probs(probs: torch.Tensor, top_p, *, sort_all: bool | None = None) -> torch.Tensor:
    """``probs`` ([V] or [B, V]) with everything outside each row's top-p nucleus set to 0 (not renormalized).

    On the CPU, rows whose nucleus lies within the top 64 tokens skip the full sort (checking which do
    costs nothing there). On a GPU every row is sorted whole (``sort_all``): a sort of the vocabulary is
    cheap there, and deciding between the two would make the host wait for the device."""
    rows = probs if probs.dim() == 2 else probs[None]
    if sort_all is None:
        sort_all = rows.device.type != "cpu"
    top_p = torch.as_tensor(top_p, dtype=rows.dtype, device="cpu").reshape(-1, 1).expand(rows.shape[0], 1).contiguous()
    top_p = to_device(top_p, rows.device)
    if sort_all:
        values = torch.sort(rows, dim=-1, descending=True).values
    else:
        values = torch.topk(rows, min(_FAST_K, rows.shape[1]), dim=-1).values
    cumulative = torch.cumsum(values, -1)
    if not sort_all:
        flat = cumulative[:, -1] < top_p[:, 0]
        if bool(flat.any()):  # nucleus beyond the top k: sort those rows whole (one batched sort)
            full = torch.sort(rows[flat], dim=-1, descending=True).values
            values = values.new_zeros(rows.shape[0], full.shape[1])
            values[~flat, :_FAST_K] = torch.topk(rows[~flat], min(_FAST_K, rows.shape[1]), dim=-1).values
            values[flat] = full
            cumulative = torch.cumsum(values, -1)
    position = torch.searchsorted(cumulative, top_p).clamp(max=values.shape[1] - 1)
    threshold = values.gather(1, position)  # the smallest probability inside each nucleus
    kept = torch.where(rows >= threshold, rows, torch.zeros_like(rows))
    return kept if probs.dim() == 2 else kept[0]


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                  seen_ids: list[torch.Tensor | None], *, sort_all: bool | None = None) -> list[int]:
    """Next ids for a [B, V] float32 batch of logits rows, each with its own settings and generator.

    The rows are processed together (one top-k mask, one softmax, one top-p pass, one cumulative sum,
    one search), each row gets exactly what it would get alone. Everything the host sends (each row's
    settings and random number, the penalized ids) goes in asynchronous copies, and the chosen ids come
    back in one transfer at the end: the only time the host waits for the device. ``sort_all``: see
    ``top_p_probs`` (default: by the device).
    """
    device = logits.device
    for i, p in enumerate(params):
        if seen_ids[i] is not None:
            logits[i] = apply_repetition_penalty(logits[i], to_device(seen_ids[i], device), p.repetition_penalty)
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k != 1]
    if sampled:
        index = to_device(torch.tensor(sampled, device="cpu"), device)
        chosen[index] = _sample(logits[index], [params[i] for i in sampled], [generators[i] for i in sampled],
                                sort_all)
    return chosen.tolist()


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
            sort_all: bool | None = None) -> torch.Tensor:
    """One id per row: top-k, temperature, top-p, then one uniform draw from each row's own generator."""
    device, vocab = logits.device, logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    # each row's settings and its uniform number (from its own generator, on the CPU: a seed draws the same
    # on any device), sent in one copy: [rows, 4] = top-k index, has top-k, temperature, uniform
    host = torch.tensor([[max(k, 1) - 1, 1.0 if k else 0.0, p.temperature, 0.0] for k, p in zip(ks, params)],
                        dtype=torch.float64, device="cpu")
    host[:, 3] = torch.stack([torch.rand((), generator=g, dtype=torch.float32, device="cpu") for g in generators])
    settings = to_device(host, device)
    if any(ks):  # outside each row's top k: -inf (rows without a top-k keep everything)
        kth = torch.topk(logits, max(ks), dim=-1).values
        threshold = torch.where(settings[:, 1:2] > 0, kth.gather(1, settings[:, 0:1].long()),
                                torch.full((len(params), 1), float("-inf"), dtype=logits.dtype, device=device))
        logits = torch.where(logits >= threshold, logits, torch.full_like(logits, float("-inf")))
    probs = torch.softmax(logits / settings[:, 2:3].to(logits.dtype), dim=-1)
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        rows = to_device(torch.tensor(nucleus, device="cpu"), device)
        probs[rows] = top_p_probs(probs[rows], [params[j].top_p for j in nucleus], sort_all=sort_all)
    cdf = torch.cumsum(probs, dim=-1)
    target = settings[:, 3:4].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=vocab - 1)


def request_seed(params: SamplingParams) -> int:
    """The request's seed: its own, or a random one when it has none."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def seeded_generator(seed: int) -> torch.Generator:
    """The request's own random generator (on the CPU, so a seed draws the same on any device)."""
    return torch.Generator(device="cpu").manual_seed(seed)


def penalized_ids(params: SamplingParams, seen: list[int], device=None) -> torch.Tensor | None:
    """The ids a repetition penalty applies to, on the host (``choose_tokens`` sends them); None when
    there is no penalty: no tensor built."""
    if params.repetition_penalty == 1.0:
        return None
    return torch.tensor(seen, device="cpu")
