"""Logit parity: the native GlmForCausalLM loaded by chatglm_web vs an independent reference.

The reference below is written from the ChatGLM3 math (modeling_chatglm.py of THUDM/chatglm3-6b)
and runs directly on the ORIGINAL state dict read from the generated checkpoint folder (original
tensor names, fused query_key_value, fused dense_h_to_4h). It shares no code with transformers' GLM
implementation nor with chatglm_web's conversion, so agreement checks the whole load path:
config mapping (rope_ratio, groups, eps), the qkv split, the renames, and the rotary layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.loader import load_glm_model
from synthetic_checkpoints import TinyChatGLM3, write_checkpoint

TOL = 1e-4
STD = 0.2  # large enough weights that logits are far from 0 (the comparison is not vacuous)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]  # ~25 ids


# ----------------------------------------------------------------- reference (original ChatGLM3) --
def read_original(folder: Path) -> tuple[dict, dict]:
    """config.json and the original state dict (fp32) from .bin or safetensors shards."""
    state = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    for shard in sorted(folder.glob("model-*.safetensors")):
        from safetensors.torch import load_file

        state.update(load_file(shard))
    assert state, f"no weights in {folder}"
    return json.loads((folder / "config.json").read_text()), {k: v.float() for k, v in state.items()}


def rope_cache(seq_len: int, rot_dim: int, base: float) -> torch.Tensor:
    """[seq, rot_dim // 2, 2] of (cos, sin), as RotaryEmbedding.forward_impl builds it."""
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float), theta)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x: [seq, heads, head_dim]; rotate the first 2 * cache.shape[1] dims as interleaved pairs."""
    rot_dim = cache.shape[1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot_dim // 2, 2)  # (x[0::2], x[1::2]) pairs
    cos, sin = cache[:, None, :, 0], cache[:, None, :, 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                       pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1).flatten(-2)
    return torch.cat([out, x_pass], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def reference_logits(config: dict, sd: dict, ids: list[int], *, rope_base: float | None = None) -> torch.Tensor:
    """[seq, vocab] logits of the original ChatGLM3 forward for one unpadded sequence."""
    heads, head_dim, eps = config["num_attention_heads"], config["kv_channels"], config["layernorm_epsilon"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    if rope_base is None:
        rope_base = 10000 * (config.get("rope_ratio") or 1)
    n = len(ids)
    cache = rope_cache(n, head_dim // 2, rope_base)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    h = sd["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]  # [seq, hidden]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(x, sd[p + "self_attention.query_key_value.weight"], sd[p + "self_attention.query_key_value.bias"])
        q, k, v = qkv.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=-1)
        q = apply_rope(q.view(n, heads, head_dim), cache)
        k = apply_rope(k.view(n, groups, head_dim), cache)
        v = v.view(n, groups, head_dim)
        # each group of heads // groups consecutive query heads shares one k/v head
        k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).float().softmax(-1)
        context = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * head_dim)
        h = h + F.linear(context, sd[p + "self_attention.dense.weight"])
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = F.linear(x, sd[p + "mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, sd[p + "mlp.dense_4h_to_h.weight"])
    h = rms_norm(h, sd["transformer.encoder.final_layernorm.weight"], eps)
    return F.linear(h, sd["transformer.output_layer.weight"])


def reference_greedy(config: dict, sd: dict, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):  # no kv cache: recompute the full forward each step
        ids.append(int(reference_logits(config, sd, ids)[-1].argmax()))
    return ids


# ------------------------------------------------------------------------------------- helpers --
def make(tmp_path, tokenizer_model, spec: TinyChatGLM3, weights_format: str = "bin", seed: int = 0):
    folder = write_checkpoint(tmp_path / f"ckpt-{weights_format}", spec, weights_format=weights_format,
                              seed=seed, dtype=torch.float32, std=STD, tokenizer_model=tokenizer_model)
    tokenizer = ChatGLM3Tokenizer.from_pretrained(folder)
    model = load_glm_model(folder, tokenizer, dtype=torch.float32).eval()
    ids = tokenizer.build_chat_input(MESSAGES)
    config, sd = read_original(folder)
    return model, tokenizer, ids, config, sd


@torch.no_grad()
def native_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


SPECS = {
    "6b": TinyChatGLM3(),
    "32k-rope_ratio50": TinyChatGLM3(rope_ratio=50, seq_length=32768),
    "no-mqa": TinyChatGLM3(multi_query_attention=False),
}


# --------------------------------------------------------------------------------------- tests --
@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", list(SPECS))
def test_native_logits_match_original_reference(tmp_path, tokenizer_model, variant, weights_format):
    model, _, ids, config, sd = make(tmp_path, tokenizer_model, SPECS[variant], weights_format)
    assert 15 <= len(ids) <= 40
    if variant == "no-mqa":
        assert model.config.num_key_value_heads == model.config.num_attention_heads
    expected = reference_logits(config, sd, ids)
    got = native_logits(model, ids)
    assert got.shape == expected.shape
    assert expected.std() > 0.5, "logits too small: the parity check would be vacuous"
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"{variant}/{weights_format}: max abs logit diff {diff:.3g}"


def test_wrong_rope_base_is_detected(tmp_path, tokenizer_model):
    """Negative control: a 32k checkpoint run with base 10000 (rope_ratio ignored) must not pass."""
    model, _, ids, config, sd = make(tmp_path, tokenizer_model, SPECS["32k-rope_ratio50"])
    got = native_logits(model, ids)
    right = (got - reference_logits(config, sd, ids)).abs().max().item()
    wrong = (got - reference_logits(config, sd, ids, rope_base=10000.0)).abs().max().item()
    assert right < TOL
    assert wrong > 1000 * TOL, f"wrong rope base only moves logits by {wrong:.3g}"


@pytest.mark.parametrize("variant", ["6b", "32k-rope_ratio50"])
def test_greedy_generation_matches_reference(tmp_path, tokenizer_model, variant):
    model, _, ids, config, sd = make(tmp_path, tokenizer_model, SPECS[variant])
    steps = 8
    expected = reference_greedy(config, sd, ids, steps)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    assert out[0].tolist() == expected
