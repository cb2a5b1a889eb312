"""Original ChatGLM3 tensor names -> native GLM names, applied while transformers loads.

The renames and the query_key_value split are expressed as transformers' own weight
conversions (``WeightRenaming`` / ``WeightConverter``), so ``from_pretrained`` converts each
tensor as it streams in from its shard: peak memory stays near one copy of the model, and
quantization (bitsandbytes 4-bit/8-bit) and dtype casting apply to the converted layers
exactly as for any native checkpoint.

The mapping is only registered for the duration of one load (``chatglm3_weight_mapping()``),
so native GLM checkpoints and ``save_pretrained`` elsewhere in the process are unaffected.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

log = logging.getLogger(__name__)


class SplitQKV(ConversionOps):
    """Split the fused ``query_key_value`` rows into q (heads*head_dim), k and v (groups*head_dim each).

    Sizes come from the config, not from the model parameters: a bitsandbytes model holds
    packed parameters whose shapes say nothing about the rows.
    """

    def __init__(self, dim: int = 0):
        self.dim = dim

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        (tensors,) = input_dict.values()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        text = config.get_text_config()
        q_rows = text.num_attention_heads * text.head_dim
        kv_rows = text.num_key_value_heads * text.head_dim
        if tensor.shape[self.dim] != q_rows + 2 * kv_rows:
            raise ValueError(
                f"query_key_value has {tensor.shape[self.dim]} rows, expected {q_rows} + 2 x {kv_rows} from the config"
            )
        parts = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=self.dim)
        return {target: part.contiguous() for target, part in zip(target_patterns, parts)}

    @property
    def reverse_op(self) -> ConversionOps:
        from transformers.core_model_loading import Concatenate

        return Concatenate(self.dim)


def conversions() -> list:
    """The ordered list of transforms from original to native names (spec section 2)."""
    layer = r"transformer.encoder.layers.(\d+)."
    return [
        WeightConverter(
            source_patterns="self_attention.query_key_value",
            target_patterns=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            operations=[SplitQKV(dim=0)],
        ),
        WeightRenaming("transformer.embedding.word_embeddings", "model.embed_tokens"),
        WeightRenaming("transformer.encoder.final_layernorm", "model.norm"),
        WeightRenaming("transformer.output_layer", "lm_head"),
        # The rotary inverse frequencies are recomputed from the config (rope_ratio included).
        WeightRenaming("transformer.rotary_pos_emb.inv_freq", "model.rotary_emb.inv_freq"),
        WeightRenaming(layer, r"model.layers.\1."),
        WeightRenaming("self_attention.dense", "self_attn.o_proj"),
        WeightRenaming("mlp.dense_h_to_4h", "mlp.gate_up_proj"),
        WeightRenaming("mlp.dense_4h_to_h", "mlp.down_proj"),
    ]


# transformers has a public register_checkpoint_conversion_mapping() but no way to unregister one. Undoing the
# registration after the load needs two private names of transformers.conversion_mapping, used only here and
# guarded by tests/chatglm3/test_loading.py (a failure there names the one that changed). Should one be gone,
# the load still works; the mapping merely stays registered for the rest of the process (with a warning).
PRIVATE_MAPPING_CACHE = "_checkpoint_conversion_mapping_cache"
PRIVATE_USER_MAPPINGS = "USER_REGISTERED_MAPPINGS"


def private_mapping_state(name: str, kind: type):
    """``transformers.conversion_mapping.<name>`` if it is still a ``kind``, else None and a warning naming it."""
    value = getattr(conversion_mapping, name, None)
    if not isinstance(value, kind):
        log.warning("transformers.conversion_mapping.%s is gone or no longer a %s: the ChatGLM3 weight mapping "
                    "stays registered for this process", name, kind.__name__)
        return None
    return value


@contextmanager
def chatglm3_weight_mapping(model_class_name: str = "GlmForCausalLM"):
    """Register the ChatGLM3 conversions for ``model_class_name`` during one ``from_pretrained``, then restore."""
    previous = conversion_mapping.get_checkpoint_conversion_mapping(model_class_name)  # builds the cache
    user_mappings = private_mapping_state(PRIVATE_USER_MAPPINGS, set)
    was_user_registered = user_mappings is not None and model_class_name in user_mappings
    conversion_mapping.register_checkpoint_conversion_mapping(model_class_name, conversions(), overwrite=True)
    try:
        yield
    finally:
        if previous is not None:
            conversion_mapping.register_checkpoint_conversion_mapping(model_class_name, previous, overwrite=True)
        else:
            cache = private_mapping_state(PRIVATE_MAPPING_CACHE, dict)
            if cache is not None:
                cache.pop(model_class_name, None)
        if user_mappings is not None and not was_user_registered:
            user_mappings.discard(model_class_name)
