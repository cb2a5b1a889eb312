"""oneDNN-prepacked linear layers (cpu_linear.PackedLinear) for fp32 CPU models: same logits, same replies."""

from __future__ import annotations

import torch
from torch import nn

from chatglm_web.families.chatglm3.loader import load_glm_model
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.engine import cpu_linear
from chatglm_web.engine.cpu_linear import PackedLinear, packing, prepack_linear_layers
from chatglm_web.families.loading import load_from_folder
from chatglm_web.settings import Settings


def test_prepacking_replaces_every_linear_layer_and_keeps_the_logits(chatglm3_checkpoint):
    loaded = load_from_folder(chatglm3_checkpoint, Settings(precision="fp32", device="cpu"), "tiny")
    assert prepack_linear_layers(loaded.model) > 0
    dense = load_glm_model(chatglm3_checkpoint, ChatGLM3Tokenizer.from_pretrained(chatglm3_checkpoint),
                           dtype=torch.float32).eval()
    linears = [m for m in loaded.model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert not any(type(m) is PackedLinear for m in dense.modules())
    ids = torch.tensor([loaded.chat_format.prompt_ids([{"role": "user", "content": "你好, prepacked weights"}])])
    with torch.inference_mode():
        got, expected = loaded.model(input_ids=ids).logits, dense(input_ids=ids).logits
        generated = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
        reference = dense.generate(ids, max_new_tokens=8, do_sample=False)
    assert expected.std() > 0.01
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert generated.tolist() == reference.tolist()


def test_16_bit_weights_stay_plain(chatglm3_checkpoint):
    loaded = load_from_folder(chatglm3_checkpoint, Settings(precision="bf16", device="cpu"), "tiny")
    assert prepack_linear_layers(loaded.model) == 0
    assert not any(type(m) is PackedLinear for m in loaded.model.modules())


def test_only_plain_linear_layers_are_replaced():
    class Subclass(nn.Linear):  # e.g. bitsandbytes' Linear4bit
        pass

    model = nn.Sequential(nn.Linear(8, 8), Subclass(8, 8), nn.Sequential(nn.Linear(8, 4)))
    assert prepack_linear_layers(model) == 2
    assert [type(m).__name__ for m in model.modules()][1:] == ["PackedLinear", "Subclass", "Sequential", "PackedLinear"]


def test_the_private_onednn_ops_exist_in_this_torch_and_are_used():
    """PackedLinear calls torch.ops.mkldnn._reorder_linear_weight and _linear_pointwise (what inductor emits);
    without them prepack_linear_layers falls back to the public, slower MkldnnLinear."""
    assert hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert packing() is PackedLinear


def test_a_build_whose_ops_fail_keeps_plain_weights(monkeypatch):
    """Where neither packing works (an op missing, a CPU oneDNN does not support), the model stays as it was."""
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    monkeypatch.setattr(cpu_linear, "MkldnnLinear", broken)
    packing.cache_clear()  # tried again with the broken ops
    try:
        model = nn.Sequential(nn.Linear(8, 8))
        assert prepack_linear_layers(model) == 0
        assert type(model[0]) is nn.Linear
    finally:
        packing.cache_clear()  # the next caller tries the real ops


def test_a_packed_layer_equals_the_plain_one_for_rows_and_prompts():
    plain = nn.Linear(64, 48)
    packed = PackedLinear(plain)
    with torch.inference_mode():
        for shape in [(1, 1, 64), (8, 1, 64), (3, 17, 64), (5, 64)]:
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    no_bias = nn.Linear(64, 8, bias=False)
    x = torch.randn(2, 64)
    torch.testing.assert_close(PackedLinear(no_bias)(x), no_bias(x).detach(), rtol=1e-5, atol=1e-5)
