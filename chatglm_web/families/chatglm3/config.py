"""ChatGLM3 ``config.json`` (model_type ``chatglm``) -> transformers' native ``GlmConfig``.

The mapping is section 2 of the format spec. Options the native GLM architecture cannot
express are rejected with an error naming the offending key instead of loading a model that
would silently compute something else.
"""

from __future__ import annotations

from transformers import GlmConfig

# key -> (value that the native model can express, why the other value is unsupported)
_MUST_EQUAL = {
    "apply_residual_connection_post_layernorm": (False, "residual taken after the layernorm"),
    "post_layer_norm": (True, "no final layernorm"),
    "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
    "add_bias_linear": (False, "biases on the dense/MLP projections"),
}
# keys whose mere presence (with a non-empty value) cannot be expressed natively
_MUST_BE_ABSENT = {
    "pre_seq_len": "a P-tuning v2 prefix (pre_seq_len); merge or drop the prefix encoder first",
    "quantization_bit": "weights quantized with the original int4/int8 kernels (quantization_bit); "
                        "use the fp16 checkpoint and --precision 4bit/8bit instead",
}


class UnsupportedChatGLMConfig(ValueError):
    """The checkpoint uses a ChatGLM option that transformers' GlmForCausalLM cannot express."""


def check_supported(config: dict) -> None:
    for key, reason in _MUST_BE_ABSENT.items():
        if config.get(key):
            raise UnsupportedChatGLMConfig(
                f"config.json sets {key}={config[key]!r}: {reason}. This cannot be loaded natively."
            )
    for key, (expected, reason) in _MUST_EQUAL.items():
        if key in config and bool(config[key]) != expected:
            raise UnsupportedChatGLMConfig(
                f"config.json sets {key}={config[key]!r} ({reason}); the native GLM model needs {key}={expected}."
            )


def rope_theta(config: dict) -> float:
    """ChatGLM scales the rotary base by ``rope_ratio`` (50 for the 32k model, 500 for 128k)."""
    return 10000.0 * float(config.get("rope_ratio") or 1.0)


def to_glm_config(config: dict, special_ids: dict[str, int], dtype: str | None = None) -> GlmConfig:
    """Build the GlmConfig for a chatglm ``config.json`` dict. ``special_ids`` are the tokenizer's."""
    check_supported(config)
    heads = config["num_attention_heads"]
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    glm = GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config.get("kv_channels", config["hidden_size"] // heads),
        hidden_act="silu",
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        max_position_embeddings=config["seq_length"],
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(config.get("add_qkv_bias", True)),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta(config), "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
        pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=[config.get("eos_token_id", 2), special_ids["<|user|>"], special_ids["<|observation|>"]],
        bos_token_id=None,
        use_cache=True,
    )
    glm.architectures = ["GlmForCausalLM"]
    if dtype:
        glm.dtype = dtype
    return glm
