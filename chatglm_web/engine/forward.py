"""A lean forward for the engine's steps: the model's own weights, a few operators per layer.

transformers' eager forward costs the host about 75 operators per layer (casts, slices, rotary
helpers, mask building, module calls) around its 7 matrix products. That host time is the step on
a GPU (the GPU waits for launches) and a large part of it on small CPU models. ``LeanForward`` runs
the same arithmetic over the same weight tensors with about 20 operators per layer:

    h = embed(ids)
    per layer:  x = rms_norm(h)
                q, k, v = split(qkv(x))                 one product for the three projections
                q, k = rope(q, k)                       one pass for both: x * cos + x[perm] * sin
                keys/values[slot, :, position] = k, v    the step's new entries, in place
                h += o_proj(sdpa(q, keys, values, mask)) query heads folded per KV head, no repeat of K/V
                h += down(silu(gate) * up)              one product for gate and up
    logits = lm_head(rms_norm(h at each row's last position))

It serves prefill (several tokens per row) and decode (one) alike, over ``SlotCache`` slots: each
row writes its tokens at its own positions and reads the first ``span`` positions of its slot
through a boolean mask (a position is visible when it is at or before the query's own). The
same arithmetic, shapes and buffers every step: what CUDA graphs need (``graphs.py``).

Built by :func:`lean_forward_for` for the layouts it knows (Llama, Qwen2, GLM: pre-norm decoder,
RMSNorm, rotary embedding on all or part of each head, gated MLP), after checking that its rotary
step gives what the model's own ``apply_rotary_pos_emb`` gives; any other model gets ``None``
and the engine keeps transformers' forward. Projections are fused by concatenating plain
``nn.Linear`` weights once; the model's own layers then hold views of the fused weight, so no
memory is added and ``model(...)`` / ``generate`` still work on the same tensors. Quantized
layers (bitsandbytes) are called one by one, as they are.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "glm", "qwen2")


class Projections(nn.Module):
    """Several linear layers on one input, as one product when they can be fused (plain ``nn.Linear``
    of the same device and dtype), else one call each and a concatenation."""

    def __init__(self, layers: list[nn.Module], fuse: bool = True):
        super().__init__()
        self.fused = _fuse(layers) if fuse or len(layers) == 1 else None
        self.parts = None if self.fused is not None else nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return torch.cat([layer(x) for layer in self.parts], dim=-1)


#: fused layers already made, by their first part: a second step over the same model reuses them
_FUSED: weakref.WeakKeyDictionary[nn.Module, nn.Linear] = weakref.WeakKeyDictionary()


def _fuse(layers: list[nn.Module]) -> nn.Linear | None:
    """One ``nn.Linear`` whose weight concatenates the layers'; each layer then holds a view of it."""
    if len(layers) == 1:
        return layers[0] if type(layers[0]) is nn.Linear else None
    if any(type(layer) is not nn.Linear for layer in layers):
        return None
    known = _FUSED.get(layers[0])
    if known is not None and all(layer.weight.untyped_storage().data_ptr() == known.weight.untyped_storage().data_ptr()
                                 for layer in layers):
        return known
    weights = [layer.weight for layer in layers]
    if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1:
        return None
    with_bias = [layer.bias is not None for layer in layers]
    if any(with_bias) and not all(with_bias):
        return None
    fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=all(with_bias),
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    if all(with_bias):
        fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    start = 0
    for layer in layers:  # the model's own layers now read the fused tensor: no second copy
        end = start + layer.out_features
        layer.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end
    _FUSED[layers[0]] = fused
    return fused


class Rotary:
    """The rotary embedding as ``x * cos + x[..., perm] * sin`` over whole heads: ``perm`` and the
    signs folded into ``sin`` give either layout (rotated halves, as Llama; interleaved pairs, as GLM),
    and a partial rotary leaves the other dimensions as they are (cos 1, sin 0)."""

    def __init__(self, rotary_emb: nn.Module, head_dim: int, interleaved: bool):
        self.rotary_emb = rotary_emb
        self.head_dim = head_dim
        self.interleaved = interleaved
        self._cached: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, perm) for ``positions`` [B, T]: cos and sin [B, T, 1, head_dim], perm [head_dim].
        Only device work once the sign and permutation of this shape are cached (a CUDA graph captures it)."""
        cos, sin = self.rotary_emb(like, positions)  # [B, T, R]: the model's own frequencies and scaling
        rotary = cos.shape[-1]
        if self.interleaved:  # pairs (2i, 2i+1): the first half of the table, each value twice
            cos = cos[..., :rotary // 2].repeat_interleave(2, dim=-1)
            sin = sin[..., :rotary // 2].repeat_interleave(2, dim=-1)
        sign, perm = self._constants(rotary, sin.dtype, sin.device)
        rest = self.head_dim - rotary
        if rest:
            cos = torch.cat([cos, cos.new_ones(*cos.shape[:-1], rest)], dim=-1)
            sin = torch.cat([sin * sign, sin.new_zeros(*sin.shape[:-1], rest)], dim=-1)
        else:
            sin = sin * sign
        return cos[:, :, None], sin[:, :, None], perm

    def _constants(self, rotary: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The signs folded into sin and the permutation that pairs each dimension with its partner."""
        key = (rotary, dtype, device)
        if key not in self._cached:
            half = rotary // 2
            if self.interleaved:  # rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i]
                sign = torch.tensor([-1.0, 1.0]).repeat(half)
                perm = torch.arange(rotary).view(-1, 2).flip(-1).reshape(-1)
            else:  # rotate(x) = cat(-x[half:], x[:half])
                sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)])
                perm = torch.arange(rotary).roll(half)
            perm = torch.cat([perm, torch.arange(rotary, self.head_dim)])
            self._cached[key] = (sign.to(device=device, dtype=dtype), perm.to(device))
        return self._cached[key]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, x.index_select(-1, perm), sin)


class Layer(nn.Module):
    def __init__(self, decoder_layer: nn.Module, fuse: bool):
        super().__init__()
        attention, mlp = decoder_layer.self_attn, decoder_layer.mlp
        self.input_norm = decoder_layer.input_layernorm
        self.post_norm = decoder_layer.post_attention_layernorm
        self.qkv = Projections([attention.q_proj, attention.k_proj, attention.v_proj], fuse)
        self.o_proj = attention.o_proj
        gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
        self.gate_up = Projections(gate_up, fuse)
        self.down_proj = mlp.down_proj
        self.scaling = attention.scaling


class LeanForward(nn.Module):
    """The model's forward over slot KV caches (see the module doc)."""

    def __init__(self, model: nn.Module, rotary: Rotary, fuse: bool = True):
        super().__init__()
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = rotary.head_dim
        self.embed = model.get_input_embeddings()
        self.layers = nn.ModuleList(Layer(layer, fuse) for layer in model.model.layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = rotary
        self.eps = [(layer.input_norm.variance_epsilon, layer.post_norm.variance_epsilon) for layer in self.layers]
        self.final_eps = model.model.norm.variance_epsilon

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                span: int, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] at each row's position ``last`` [B] (default: its last one).

        ``ids``, ``positions``: [B, T], the new tokens and where they go in rows 0 .. B-1 of the cache;
        ``keys``/``values``: per layer [slots, kv heads, capacity, head dim], written at (row, position)
        and read over their first ``span`` positions.
        """
        batch, width = ids.shape
        h = self.embed(ids)
        cos, sin, perm = self.rotary.tables(h, positions)
        mask = (torch.arange(span, device=ids.device) <= positions[..., None])[:, None]  # [B, 1, T, span]
        rows = torch.arange(batch, device=ids.device)[:, None]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, layer_keys, layer_values, (eps1, eps2) in zip(self.layers, keys, values, self.eps):
            x = F.rms_norm(h, (h.shape[-1],), layer.input_norm.weight, eps1)
            qkv = layer.qkv(x)
            qk = qkv[..., :q_size + kv_size].view(batch, width, self.heads + self.kv_heads, self.head_dim)
            qk = Rotary.apply(qk, cos, sin, perm)
            layer_keys[rows, :, positions] = qk[:, :, self.heads:]
            layer_values[rows, :, positions] = qkv[..., q_size + kv_size:].view(batch, width, self.kv_heads,
                                                                                   self.head_dim)
            attended = self._attend(qk[:, :, :self.heads], layer_keys[:batch, :, :span],
                                    layer_values[:batch, :, :span], mask, layer.scaling)
            h = h + layer.o_proj(attended)
            x = F.rms_norm(h, (h.shape[-1],), layer.post_norm.weight, eps2)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down_proj(F.silu(gate) * up)
        h = h[:, -1] if last is None else h[rows[:, 0], last]
        return self.lm_head(F.rms_norm(h, (h.shape[-1],), self.norm.weight, self.final_eps))


    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Attention of ``q`` [B, T, heads, D] over ``keys``/``values`` [B, kv heads, span, D] under ``mask``
        [B, 1, T, span]; [B, T, heads * D].

        Grouped-query heads are folded into the query length: the ``group`` query heads that share a KV
        head are ``group * T`` queries of that head, so SDPA sees plain multi-head attention with a mask
        (on a GPU its memory-efficient kernel takes that; with ``enable_gqa`` and a mask it would fall
        back to the math one, which copies K and V per query head). At decode (T = 1) the fold is a view.
        """
        batch, width = q.shape[:2]
        group = self.heads // self.kv_heads
        if width == 1:
            folded = q.view(batch, self.kv_heads, group, self.head_dim)
        else:  # [B, T, kv, group, D] -> [B, kv, group * T, D]; the mask repeats for each head of a group
            folded = q.view(batch, width, self.kv_heads, group, self.head_dim).permute(0, 2, 3, 1, 4)
            folded = folded.reshape(batch, self.kv_heads, group * width, self.head_dim)
            mask = mask.repeat(1, 1, group, 1) if group > 1 else mask
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
        if width == 1:
            return out.reshape(batch, 1, self.heads * self.head_dim)
        out = out.view(batch, self.kv_heads, group, width, self.head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(batch, width, self.heads * self.head_dim)


def lean_forward_for(model: nn.Module, fuse: bool = True) -> LeanForward | None:
    """The lean forward of ``model``, or None when its layout is not one this module knows. ``fuse``:
    concatenate the projections' weights (the model's layers then hold views of them)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED or getattr(config, "use_sliding_window", False):
        return None
    try:
        layer = model.model.layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish") or not hasattr(model.model, "rotary_emb"):
            return None
        if not all(hasattr(norm, "variance_epsilon") for norm in (layer.input_layernorm, layer.post_attention_layernorm,
                                                                 model.model.norm)):
            return None
        head_dim = attention.head_dim
        if not (hasattr(mlp, "gate_up_proj") or hasattr(mlp, "gate_proj")):
            return None
        rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    except (AttributeError, IndexError, KeyError):
        return None
    for interleaved in (False, True):
        rotary = Rotary(model.model.rotary_emb, head_dim, interleaved)
        if _same_rotation(rotary, rope, model):
            return LeanForward(model, rotary, fuse)
    return None


def _same_rotation(rotary: Rotary, rope, model) -> bool:
    """Does ``rotary`` turn random queries and keys as the model's ``apply_rotary_pos_emb`` does?"""
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, rotary.head_dim, generator=generator).to(weight)  # [B, heads, T, D]
    k = torch.randn(2, 1, 4, rotary.head_dim, generator=generator).to(weight)
    positions = torch.tensor([[0, 1, 2, 3], [7, 30, 31, 500]], device=weight.device)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(q, positions)
        expected_q, expected_k = rope(q, k, cos, sin)
        table_cos, table_sin, perm = rotary.tables(q, positions)
        got_q = Rotary.apply(q.transpose(1, 2), table_cos, table_sin, perm).transpose(1, 2)
        got_k = Rotary.apply(k.transpose(1, 2), table_cos, table_sin, perm).transpose(1, 2)
    tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return torch.allclose(got_q, expected_q, atol=tolerance) and torch.allclose(got_k, expected_k, atol=tolerance)
