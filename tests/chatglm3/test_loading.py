"""Loading ChatGLM3 checkpoints in the original on-disk format as transformers' native GlmForCausalLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GlmForCausalLM

from chatglm_web.families.chatglm3.config import UnsupportedChatGLMConfig
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.loader import load_glm_model, resolve_checkpoint, set_generation_defaults
from synthetic_checkpoints import TinyChatGLM3, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def original_state(folder: Path) -> dict:
    state = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    if not state:
        from safetensors.torch import load_file

        for shard in sorted(folder.glob("model-*.safetensors")):
            state.update(load_file(shard))
    return state


def load(folder, **kwargs):
    return load_glm_model(folder, ChatGLM3Tokenizer.from_pretrained(folder), dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_original_tensors_land_in_the_native_layers(tmp_path, tokenizer_model, weights_format):
    folder = write_checkpoint(tmp_path / "ckpt", weights_format=weights_format, tokenizer_model=tokenizer_model)
    model = load(folder)
    assert type(model) is GlmForCausalLM and model.config.model_type == "glm"
    state = {k: v.float() for k, v in original_state(folder).items()}
    config = json.loads((folder / "config.json").read_text())
    q_rows = config["num_attention_heads"] * config["kv_channels"]
    kv_rows = config["multi_query_group_num"] * config["kv_channels"]
    for i, layer in enumerate(model.model.layers):
        p = f"transformer.encoder.layers.{i}."
        qkv_w, qkv_b = state[p + "self_attention.query_key_value.weight"], state[p + "self_attention.query_key_value.bias"]
        attn = layer.self_attn
        assert torch.equal(attn.q_proj.weight, qkv_w[:q_rows]) and torch.equal(attn.q_proj.bias, qkv_b[:q_rows])
        assert torch.equal(attn.k_proj.weight, qkv_w[q_rows:q_rows + kv_rows])
        assert torch.equal(attn.v_proj.weight, qkv_w[q_rows + kv_rows:])
        assert torch.equal(attn.v_proj.bias, qkv_b[q_rows + kv_rows:])
        assert torch.equal(attn.o_proj.weight, state[p + "self_attention.dense.weight"])
        assert torch.equal(layer.mlp.gate_up_proj.weight, state[p + "mlp.dense_h_to_4h.weight"])
        assert torch.equal(layer.mlp.down_proj.weight, state[p + "mlp.dense_4h_to_h.weight"])
        assert torch.equal(layer.input_layernorm.weight, state[p + "input_layernorm.weight"])
        assert torch.equal(layer.post_attention_layernorm.weight, state[p + "post_attention_layernorm.weight"])
    assert torch.equal(model.model.embed_tokens.weight, state["transformer.embedding.word_embeddings.weight"])
    assert torch.equal(model.model.norm.weight, state["transformer.encoder.final_layernorm.weight"])
    assert torch.equal(model.lm_head.weight, state["transformer.output_layer.weight"])


def test_config_mapping_and_no_remote_code(chatglm3_checkpoint):
    model = load(chatglm3_checkpoint)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.vocab_size == 416 and c.max_position_embeddings == 8192 and c.attention_bias
    assert c.rope_parameters["rope_theta"] == 10000 and c.rope_parameters["partial_rotary_factor"] == 0.5
    assert c.tie_word_embeddings is False and c.pad_token_id == 0
    # the checkpoint's *.py files raise when imported; none was imported
    assert not {"modeling_chatglm", "configuration_chatglm", "tokenization_chatglm"} & set(sys.modules)
    assert not any("chatglm" in name and "chatglm_web" not in name for name in sys.modules)


def test_generation_defaults_stop_on_eos_user_and_observation(chatglm3_checkpoint):
    tokenizer = ChatGLM3Tokenizer.from_pretrained(chatglm3_checkpoint)
    model = load(chatglm3_checkpoint)
    set_generation_defaults(model, tokenizer)
    special = tokenizer.special_token_ids
    assert model.generation_config.eos_token_id == [2, special["<|user|>"], special["<|observation|>"]]
    assert (model.generation_config.temperature, model.generation_config.top_p) == (0.8, 0.8)


@pytest.mark.parametrize("stop", ["</s>", "<|user|>", "<|observation|>"])
def test_generate_stops_on_each_stop_token(tmp_path, tokenizer_model, stop):
    """A model that strongly prefers one stop token: generate ends there."""
    bias_id = 2 if stop == "</s>" else stop
    folder = write_checkpoint(tmp_path / "c", tokenizer_model=tokenizer_model, token_bias={bias_id: 40.0})
    tokenizer = ChatGLM3Tokenizer.from_pretrained(folder)
    model = load(folder)
    set_generation_defaults(model, tokenizer)
    ids = torch.tensor([tokenizer.build_chat_input([{"role": "user", "content": "hi"}])])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    stop_id = 2 if stop == "</s>" else tokenizer.special_token_ids[stop]
    assert new == [stop_id]


def test_32k_variant_uses_rope_ratio(tmp_path, tokenizer_model):
    folder = write_checkpoint(tmp_path / "c32k", TinyChatGLM3(rope_ratio=50, seq_length=32768),
                              tokenizer_model=tokenizer_model)
    model = load(folder)
    assert model.config.rope_parameters["rope_theta"] == 500000
    assert model.config.max_position_embeddings == 32768
    rot = model.config.head_dim // 2
    expected = 1.0 / (500000 ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)  # not the checkpoint's base-10000 buffer


def test_base_variant_and_multi_head_attention(tmp_path, tokenizer_model):
    # chatglm3-6b-base: same architecture/tokenizer, no rope_ratio; plus a config without grouped heads
    folder = write_checkpoint(tmp_path / "base", TinyChatGLM3(multi_query_attention=False),
                              tokenizer_model=tokenizer_model)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "THUDM/chatglm3-6b-base"
    (folder / "config.json").write_text(json.dumps(config))
    model = load(folder)
    assert model.config.num_key_value_heads == model.config.num_attention_heads == 4
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 64)


def test_native_glm_folder_loads_as_is(tmp_path, chatglm3_checkpoint):
    model = load(chatglm3_checkpoint)
    native = tmp_path / "native"
    model.save_pretrained(native)
    (native / "tokenizer.model").write_bytes((chatglm3_checkpoint / "tokenizer.model").read_bytes())
    saved = json.loads((native / "config.json").read_text())
    assert saved["model_type"] == "glm"
    reloaded = load(native)
    ids = torch.tensor([[64, 65, 66, 67]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# -- guards: the private transformers names the loader relies on (each failure names the one that changed) ------


def test_guard_private_conversion_mapping_registry():
    """weights.py undoes its registration through two private names of ``transformers.conversion_mapping``."""
    from transformers import conversion_mapping

    from chatglm_web.families.chatglm3 import weights

    assert (weights.PRIVATE_MAPPING_CACHE, weights.PRIVATE_USER_MAPPINGS) == (
        "_checkpoint_conversion_mapping_cache", "USER_REGISTERED_MAPPINGS")
    conversion_mapping.get_checkpoint_conversion_mapping("GlmForCausalLM")  # builds the cache
    cache = getattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    users = getattr(conversion_mapping, "USER_REGISTERED_MAPPINGS", None)
    changed = "changed in transformers: chatglm3/weights.py can no longer unregister its mapping after a load"
    assert isinstance(cache, dict), f"transformers.conversion_mapping._checkpoint_conversion_mapping_cache {changed}"
    assert isinstance(users, set), f"transformers.conversion_mapping.USER_REGISTERED_MAPPINGS {changed}"
    with weights.chatglm3_weight_mapping():
        assert "GlmForCausalLM" in cache, f"transformers.conversion_mapping._checkpoint_conversion_mapping_cache {changed}"
        assert "GlmForCausalLM" in users, f"transformers.conversion_mapping.USER_REGISTERED_MAPPINGS {changed}"
    assert conversion_mapping.get_checkpoint_conversion_mapping("GlmForCausalLM") is None, (
        f"transformers.conversion_mapping._checkpoint_conversion_mapping_cache {changed}")
    assert "GlmForCausalLM" not in users, f"transformers.conversion_mapping.USER_REGISTERED_MAPPINGS {changed}"


def test_guard_private_weight_conversions_attribute(tmp_path, chatglm3_checkpoint):
    """loader.py empties ``model._weight_conversions`` (private) so a converted model saves with native names."""
    from safetensors import safe_open

    from chatglm_web.families.chatglm3.config import to_glm_config
    from chatglm_web.families.chatglm3.weights import chatglm3_weight_mapping

    tokenizer = ChatGLM3Tokenizer.from_pretrained(chatglm3_checkpoint)
    raw = json.loads((chatglm3_checkpoint / "config.json").read_text())
    with chatglm3_weight_mapping():
        plain = GlmForCausalLM.from_pretrained(chatglm3_checkpoint, config=to_glm_config(raw, tokenizer.special_token_ids),
                                               dtype=torch.float32)
    assert plain._weight_conversions, (
        "transformers no longer records the load-time conversions in model._weight_conversions: "
        "chatglm3/loader.py must find another way to make save_pretrained write native names")
    load(chatglm3_checkpoint).save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as saved:
        original = [name for name in saved.keys() if name.startswith("transformer.")]
    assert not original, (
        f"save_pretrained wrote original ChatGLM3 names ({original[:2]}...) under a native config: emptying "
        "model._weight_conversions no longer stops transformers from reversing the load-time conversions")


@pytest.mark.parametrize("key,value", [
    ("pre_seq_len", 128), ("quantization_bit", 4), ("rmsnorm", False), ("post_layer_norm", False),
    ("apply_residual_connection_post_layernorm", True), ("add_bias_linear", True),
])
def test_unsupported_config_is_rejected_naming_the_key(tmp_path, chatglm3_checkpoint, key, value):
    folder = tmp_path / "bad"
    folder.mkdir()
    for item in chatglm3_checkpoint.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((chatglm3_checkpoint / "config.json").read_text())
    config[key] = value
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedChatGLMConfig, match=key):
        load(folder)


def test_hub_id_resolves_from_the_hub_cache_offline(tmp_path, chatglm3_checkpoint, monkeypatch):
    """A Hub id goes through huggingface_hub's snapshot layout (here pre-filled, as after a download)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--THUDM--chatglm3-6b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for item in chatglm3_checkpoint.iterdir():
        (snapshot / item.name).symlink_to(item)
    (cache / "models--THUDM--chatglm3-6b" / "refs").mkdir()
    (cache / "models--THUDM--chatglm3-6b" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    folder = resolve_checkpoint("THUDM/chatglm3-6b", local_files_only=True)
    assert folder == snapshot
    assert type(load(folder)) is GlmForCausalLM


@pytest.fixture(scope="module")
def quantizable_checkpoint(tmp_path_factory, tokenizer_model):
    """bitsandbytes' CPU kernels want dims in multiples of 64, as the real model has (4096, 13696)."""
    spec = TinyChatGLM3(hidden_size=128, num_attention_heads=4, kv_channels=32, ffn_hidden_size=256)
    return write_checkpoint(tmp_path_factory.mktemp("q"), spec, tokenizer_model=tokenizer_model)


def test_4bit_nf4_load_on_cpu_generates(quantizable_checkpoint):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    chatglm3_checkpoint = quantizable_checkpoint
    tokenizer = ChatGLM3Tokenizer.from_pretrained(chatglm3_checkpoint)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = load_glm_model(chatglm3_checkpoint, tokenizer, quantization_config=quant, dtype=torch.float32,
                           device_map={"": "cpu"})
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, bnb.nn.Linear4bit)
    reference = load(chatglm3_checkpoint)
    ids = torch.tensor([tokenizer.build_chat_input([{"role": "user", "content": "你好"}])])
    with torch.no_grad():
        quantized, full = model(ids).logits[0, -1], reference(ids).logits[0, -1]
    # NF4 weights are the converted layers: close to, but not equal to, the fp32 logits
    assert not torch.equal(quantized, full)
    assert torch.corrcoef(torch.stack([quantized, full]))[0, 1] > 0.9
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_peak_memory_stays_near_one_copy(tmp_path, tokenizer_model):
    """Load a ~100 MB fp16 checkpoint in a fresh process: peak RSS grows by well under two copies."""
    spec = TinyChatGLM3(hidden_size=512, num_layers=8, num_attention_heads=8, kv_channels=64,
                        multi_query_group_num=2, ffn_hidden_size=1536, padded_vocab_size=32000)
    folder = write_checkpoint(tmp_path / "mid", spec, tokenizer_model=tokenizer_model, num_shards=4)
    size = sum(f.stat().st_size for f in folder.glob("*.bin"))
    script = textwrap.dedent(f"""
        import resource, torch, gc
        from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
        from chatglm_web.families.chatglm3.loader import load_glm_model
        import transformers.models.glm.modeling_glm  # import cost out of the measurement
        tok = ChatGLM3Tokenizer.from_pretrained({str(folder)!r})
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = load_glm_model({str(folder)!r}, tok, dtype=torch.float16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.6 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of weights"


@pytest.mark.parametrize("precision", ["8bit", "fp16", "bf16"])
def test_other_precisions_apply_to_converted_layers(quantizable_checkpoint, precision):
    from chatglm_web.families.loading import from_pretrained_kwargs

    tokenizer = ChatGLM3Tokenizer.from_pretrained(quantizable_checkpoint)
    model = load_glm_model(quantizable_checkpoint, tokenizer, **from_pretrained_kwargs(precision, "cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    if precision == "8bit":
        import bitsandbytes as bnb

        assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
    else:
        assert q_proj.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    ids = torch.tensor([tokenizer.build_chat_input([{"role": "user", "content": "hi, tell me about the sea"}])])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        reference = load(quantizable_checkpoint)(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert_same_model(logits, reference)


def assert_same_model(logits: torch.Tensor, reference: torch.Tensor) -> None:
    """``logits`` ([positions, vocabulary]) come from the weights that gave the fp32 ``reference``, within what
    8-bit, fp16 or bf16 weights change: at every position the two are nearly parallel (cosine similarity > 0.99;
    bitsandbytes' 8-bit CPU path gives about 0.9998 here, bf16 0.99996) and most positions pick the same next
    token (bf16 and 8-bit differ on about one position in 28 here, where the tiny random model's top logits are
    close)."""
    similarity = torch.nn.functional.cosine_similarity(logits, reference, dim=-1)
    assert similarity.min() > 0.99, f"the logits differ from fp32's: cosine similarity {similarity.min():.4f}"
    same = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert same >= 0.75, f"only {same:.0%} of the positions pick fp32's next token"


def test_the_logits_comparison_tells_other_weights_apart(quantizable_checkpoint, tmp_path, tokenizer_model):
    """``assert_same_model`` fails for a model of the same shape with other weights (another seed)."""
    spec = TinyChatGLM3(hidden_size=128, num_attention_heads=4, kv_channels=32, ffn_hidden_size=256)
    other = write_checkpoint(tmp_path / "other", spec, tokenizer_model=tokenizer_model, seed=1)
    tokenizer = ChatGLM3Tokenizer.from_pretrained(quantizable_checkpoint)
    ids = torch.tensor([tokenizer.build_chat_input([{"role": "user", "content": "hi, tell me about the sea"}])])
    with torch.no_grad():
        reference, logits = load(quantizable_checkpoint)(ids).logits[0], load(other)(ids).logits[0]
    with pytest.raises(AssertionError, match="cosine similarity"):
        assert_same_model(logits, reference)
