"""Sampling: the top-p nucleus equals the sorted-prefix definition; draws follow the distribution; seeds repeat."""

import pytest
import torch

from chatglm_web.generation import SamplingParams
from chatglm_web.engine.sampling import choose_tokens, top_p_probs


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn with probability proportional to ``weights`` (non-negative): the reference the engine's
    batched draw is compared with."""
    cdf = torch.cumsum(weights, 0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype, device=generator.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)


def choose_token(logits: torch.Tensor, params, generator: torch.Generator, seen_ids: torch.Tensor | None = None) -> int:
    """The engine's choice for one 1-D float32 logits row."""
    return choose_tokens(logits[None].clone(), [params], [generator], [seen_ids])[0]


def nucleus_by_sorting(probs, top_p):
    values, order = torch.sort(probs, descending=True)
    keep = (torch.cumsum(values, 0) - values) < top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # flat, medium, peaked
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_keeps_the_same_tokens_as_a_full_sort(scale, top_p):
    gen = torch.Generator().manual_seed(int(scale * 100 + top_p * 10))
    for _ in range(5):
        probs = torch.softmax(torch.randn(5000, generator=gen) * scale, 0)
        kept = set(torch.nonzero(top_p_probs(probs, top_p)).flatten().tolist())
        assert kept == nucleus_by_sorting(probs, top_p)


def test_draw_follows_the_weights_and_never_picks_zero_weight():
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(weights, gen) for _ in range(4000)]), minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0
    assert 0.2 < counts[1] / 4000 < 0.3


def test_seeded_choice_repeats_and_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    first = [choose_token(logits, params, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(first)) == 1 and first[0] in torch.topk(logits, 50).indices.tolist()
    assert choose_token(logits, SamplingParams(temperature=0), torch.Generator()) == int(logits.argmax())


def test_a_batch_of_rows_gets_what_each_row_gets_alone():
    from chatglm_web.engine.sampling import choose_tokens

    gen = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(3, 3000, generator=gen) * 0.05, torch.randn(3, 3000, generator=gen) * 6])
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r)
              for t, p, k, r in [(0.8, 0.8, 0, 1.0), (1.0, 1.0, 0, 1.0), (0.0, 1.0, 0, 1.0),
                                 (0.7, 0.9, 0, 1.3), (1.2, 0.5, 40, 1.0), (0.8, 0.8, 0, 1.0)]]
    seen = [None, None, None, torch.tensor([1, 2, 3]), None, None]
    together = choose_tokens(logits.clone(), params, [torch.Generator().manual_seed(i) for i in range(6)], seen)
    alone = [choose_token(logits[i].clone(), params[i], torch.Generator().manual_seed(i), seen[i]) for i in range(6)]
    assert together == alone


def test_sampling_creates_every_tensor_on_the_logits_device():
    """On a GPU, a helper tensor made on the default device (the CPU) fails every request. Here the default
    device is made "meta", so any tensor created without an explicit device cannot meet the CPU logits."""
    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r)
              for t, p, k, r in [(0.8, 0.8, 0, 1.0), (1.0, 1.0, 0, 1.3), (0.7, 0.5, 20, 1.0), (0.0, 1.0, 0, 1.0)]]
    generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(4)]
    seen = [None, torch.tensor([1, 2, 3]), None, None]
    expected = choose_tokens(logits.clone(), params, [torch.Generator().manual_seed(i) for i in range(4)], seen)
    with torch.device("meta"):
        chosen = choose_tokens(logits.clone(), params, generators, seen)
    assert chosen == expected
