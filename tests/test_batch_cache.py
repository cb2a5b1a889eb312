"""SlotCache: decode steps of several requests in their slots give each request's logits alone (DynamicCache),
through slot and capacity growth and slots freed in the middle."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chatglm_web.engine.kv_slots import FIRST_CAPACITY, SPAN_STEP, SlotCache, prefilled_kv
from chatglm_web.families.loading import load_from_folder
from chatglm_web.settings import Settings


@pytest.fixture(scope="module")
def model(long_reply_checkpoint):
    return load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny").model


class Alone:
    """One request decoded by itself with a DynamicCache: the reference."""

    def __init__(self, model, prompt):
        self.model, self.cache = model, DynamicCache(config=model.config)
        self.logits = model(input_ids=torch.tensor([prompt]), cache=self.cache, use_cache=True).logits[0, -1]
        self.length = len(prompt)

    def step(self, token):
        out = self.model(input_ids=torch.tensor([[token]]), cache=self.cache, use_cache=True)
        self.length += 1
        return out.logits[0, -1]


@torch.inference_mode()
def test_slots_give_each_request_its_own_logits_through_growth_and_frees(model):
    prompts = {"a": list(range(5, 15)), "b": list(range(20, 20 + FIRST_CAPACITY - 3)), "c": list(range(7, 47)),
               "d": [9, 8, 7]}
    batch, order, alone, last = SlotCache(), [], {}, {}

    def join(name):
        prefilled = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompts[name]]), cache=prefilled, use_cache=True)
        batch.add(prefilled_kv(prefilled))
        order.append(name)
        alone[name] = Alone(model, prompts[name])
        last[name] = int(alone[name].logits.argmax())

    def step():
        inputs = batch.step_inputs([alone[n].length for n in order])
        logits = model(input_ids=torch.tensor([[last[n]] for n in order]), use_cache=True, **inputs).logits[:, -1]
        for row, name in enumerate(order):
            expected = alone[name].step(last[name])
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
            last[name] = int(expected.argmax())

    join("a")
    for _ in range(3):
        step()
    join("b")  # longer than the first capacity minus the steps to come: the capacity doubles
    join("c")  # a third slot: the slots double
    for _ in range(6):
        step()
    assert batch.capacity >= FIRST_CAPACITY * 2 and batch.slots >= 3
    batch.keep([0, 2])  # "b" ends
    order.remove("b")
    join("d")
    for _ in range(SPAN_STEP + 2):  # across a span boundary
        step()
    assert batch.rows == 3


def test_step_shapes_change_only_per_span_block(model):
    batch = SlotCache()
    prefilled = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=prefilled, use_cache=True)
    batch.add(prefilled_kv(prefilled))
    spans = {batch.step_inputs([n])["attention_mask"].shape[-1] for n in range(3, SPAN_STEP - 1)}
    assert spans == {SPAN_STEP}
    assert batch.step_inputs([SPAN_STEP])["attention_mask"].shape[-1] == 2 * SPAN_STEP


def test_a_decode_step_makes_no_host_decision_on_data_so_cuda_graphs_can_capture_it(long_reply_checkpoint):
    """The whole model step over the slots runs on the meta device (shapes only, no data): nothing in it
    reads a value back to the host (``.item()``, a tensor in an ``if``), which CUDA graph capture forbids.
    Its shapes follow from the batch size and the span block alone."""
    model = load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny").model
    cache = SlotCache()
    with torch.inference_mode():
        for length in (5, 70):
            prefill = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([list(range(3, 3 + length))]), cache=prefill, use_cache=True)
            cache.add([(keys.to("meta"), values.to("meta")) for keys, values in prefilled_kv(prefill)])
        model.to("meta")
        for lengths in ([5, 70], [6, 71], [9, 100]):  # 71 + 1 and 100 + 1 positions: the same span block
            inputs = cache.step_inputs(lengths)
            assert inputs["attention_mask"].shape == (2, 1, 1, 2 * SPAN_STEP)
            out = model(input_ids=torch.tensor([[7], [8]], device="meta"), use_cache=True, logits_to_keep=1,
                        **inputs)
            assert out.logits.device.type == "meta" and out.logits.shape[:2] == (2, 1)
