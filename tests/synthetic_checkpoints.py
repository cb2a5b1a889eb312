"""Write random ChatGLM3 checkpoints in the exact on-disk format of THUDM/chatglm3-6b.

The real weights cannot be downloaded here, so tests and benchmarks build small (or, on a
GPU box, full-size) checkpoints with the same files the Hub ships: ``config.json`` with the
original keys, ``tokenizer.model`` (a sentencepiece model trained on the spot, byte fallback,
``<unk>/<s>/</s>`` at 0/1/2), ``tokenizer_config.json``, and weights under the original tensor
names as ``pytorch_model-0000N-of-0000M.bin`` shards + index, or as safetensors shards + index.

Loading such a folder goes through exactly the code path a real download takes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# A small bilingual corpus: enough for sentencepiece to learn a few hundred pieces.
_CORPUS = """\
Hello, how are you today? I am fine, thank you.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea and the sky.
The quick brown fox jumps over the lazy dog.
Machine learning models turn text into tokens and tokens into text.
def add(a, b):
    return a + b
print("hello world")
你好，很高兴认识你。今天天气很好。
请帮我写一首关于春天的诗。
北京是中国的首都。上海是一个大城市。
我们一起学习人工智能和自然语言处理。
Tools can look up the weather in Beijing or Paris for the user.
The assistant answers questions politely and briefly.
Numbers: 1 2 3 42 100 2024 3.14159
"""


@dataclass
class TinyChatGLM3:
    """Sizes of a generated checkpoint. Defaults are tiny; ``chatglm3_6b()`` gives the real ones."""

    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_group_num: int = 2
    multi_query_attention: bool = True
    ffn_hidden_size: int = 96
    seq_length: int = 8192
    rope_ratio: float | None = None
    sp_vocab_size: int = 400
    padded_vocab_size: int | None = None  # default: sp size + 9 specials + a few unused rows
    extra_config: dict = field(default_factory=dict)

    @classmethod
    def chatglm3_6b(cls, **overrides) -> "TinyChatGLM3":
        sizes = dict(hidden_size=4096, num_layers=28, num_attention_heads=32, kv_channels=128,
                     multi_query_group_num=2, ffn_hidden_size=13696, seq_length=8192,
                     padded_vocab_size=65024)
        sizes.update(overrides)
        return cls(**sizes)


def train_tokenizer_model(vocab_size: int = 400) -> bytes:
    """Train a tiny sentencepiece model shaped like ChatGLM3's (returns the serialized model)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return buffer.getvalue()


def config_dict(spec: TinyChatGLM3, sp_size: int) -> dict:
    """config.json with the keys of THUDM/chatglm3-6b (section 1 of the spec)."""
    padded = spec.padded_vocab_size or (sp_size + 9 + 7)
    config = {
        "_name_or_path": "THUDM/chatglm3-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": spec.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": spec.hidden_size,
        "kv_channels": spec.kv_channels,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": spec.multi_query_attention,
        "multi_query_group_num": spec.multi_query_group_num,
        "num_attention_heads": spec.num_attention_heads,
        "num_layers": spec.num_layers,
        "original_rope": True,
        "padded_vocab_size": padded,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": spec.seq_length,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if spec.rope_ratio is not None:
        config["rope_ratio"] = spec.rope_ratio
    config.update(spec.extra_config)
    return config


TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm3-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def random_state_dict(config: dict, *, seed: int = 0, dtype=torch.float16, std: float = 0.02,
                      token_bias: dict[int, float] | None = None, device="cpu") -> dict:
    """Random weights under the original ChatGLM3 tensor names.

    ``token_bias`` ({token id: logit shift}) makes a test model favour or avoid tokens, e.g. never
    stop (-20 on the stop ids) for tests that need long replies. It works through a constant
    channel: hidden dim 0 of every embedding is set high, so the final normalized hidden state
    has a large positive dim 0, and the output-layer rows of the biased ids get a weight there.

    The random numbers are drawn on ``device`` (a GPU draws ChatGLM3-6B's 6.2 B weights in a second, a CPU
    takes a minute or more: ``bench/gpu.py``); the tensors are returned on the CPU.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = config["hidden_size"]
    heads, head_dim = config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv_rows = (heads + 2 * groups) * head_dim
    ffn = config["ffn_hidden_size"]
    vocab = config["padded_vocab_size"]

    def normal(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype).cpu()

    def norm_weight():
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype).cpu()

    rotary_dim = head_dim // 2
    state = {
        "transformer.embedding.word_embeddings.weight": normal(vocab, hidden),
        "transformer.rotary_pos_emb.inv_freq": (
            1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        ).to(dtype),
    }
    if token_bias:
        state["transformer.embedding.word_embeddings.weight"][:, 0] = 4.0
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "self_attention.query_key_value.weight"] = normal(qkv_rows, hidden)
        state[p + "self_attention.query_key_value.bias"] = normal(qkv_rows)
        state[p + "self_attention.dense.weight"] = normal(hidden, heads * head_dim)
        state[p + "post_attention_layernorm.weight"] = norm_weight()
        state[p + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, hidden)
        state[p + "mlp.dense_4h_to_h.weight"] = normal(hidden, ffn)
    state["transformer.encoder.final_layernorm.weight"] = norm_weight()
    state["transformer.output_layer.weight"] = normal(vocab, hidden)
    if token_bias:
        # dim 0 of the normalized final hidden state is about sqrt(hidden) * 4 / |h|, i.e. close to sqrt(hidden)
        for token_id, shift in token_bias.items():
            state["transformer.output_layer.weight"][token_id, 0] = shift / hidden ** 0.5
    return state


def _shard(state: dict, num_shards: int) -> list[dict]:
    keys = list(state)
    per = -(-len(keys) // num_shards)
    return [{k: state[k] for k in keys[i * per:(i + 1) * per]} for i in range(num_shards)]


def save_weights(state: dict, folder: Path, *, weights_format: str = "bin", num_shards: int = 2) -> None:
    """Save as the Hub does: ``pytorch_model-0000N-of-0000M.bin`` + index, or safetensors shards + index."""
    shards = [s for s in _shard(state, num_shards) if s]
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        if weights_format == "bin":
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(shard, folder / name)
        elif weights_format == "safetensors":
            from safetensors.torch import save_file

            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, folder / name, metadata={"format": "pt"})
        else:
            raise ValueError(f"unknown weights_format {weights_format!r}")
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index_name = "pytorch_model.bin.index.json" if weights_format == "bin" else "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint(
    folder: str | Path,
    spec: TinyChatGLM3 | None = None,
    *,
    weights_format: str = "bin",
    num_shards: int = 2,
    seed: int = 0,
    dtype=torch.float16,
    std: float = 0.02,
    tokenizer_model: bytes | None = None,
    token_bias: dict[str | int, float] | None = None,
    device="cpu",
) -> Path:
    """Create a ChatGLM3 checkpoint folder; returns its path. ``device``: where the random weights are drawn."""
    spec = spec or TinyChatGLM3()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = tokenizer_model or train_tokenizer_model(spec.sp_vocab_size)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    import sentencepiece as spm

    sp_size = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    config = config_dict(spec, sp_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    # The real repository ships its remote code next to the weights; loading must never import it.
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (folder / name).write_text(
            "raise RuntimeError('remote code from the checkpoint was executed; chatglm_web must never do this')\n"
        )
    if token_bias:  # special tokens may be given by name
        from chatglm_web.families.chatglm3.tokenizer import SPECIAL_TOKENS

        token_bias = {(sp_size + SPECIAL_TOKENS.index(k) if isinstance(k, str) else k): v for k, v in token_bias.items()}
    weights = random_state_dict(config, seed=seed, dtype=dtype, std=std, token_bias=token_bias, device=device)
    save_weights(weights, folder, weights_format=weights_format, num_shards=num_shards)
    return folder
