"""IncrementalDecoder: streamed deltas + finish() must equal the full decode, exactly."""

import random

import pytest

from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.streaming_text import IncrementalDecoder

TEXTS = [
    "Hello, how are you today?",
    "你好，很高兴认识你。今天天气很好。",
    "emoji 😀👍🏽 and flags 🇫🇷 mixed with 中文",
    "  leading spaces, multiple   spaces, trailing  ",
    "tabs\tand\nnew\n\nlines\r\nwindows",
    "def add(a, b):\n    return a + b\nprint(\"hello world\")\n",
    "\n",
    " ",
    "",
    "数字 3.14159 and 2024年",
    "Ω≈ç√∫˜µ≤≥÷ ÄÖÜ ß 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def stream(tokenizer, ids, skip_special_tokens=True):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.finish())
    return deltas


def assert_streams_exactly(tokenizer, ids, skip_special_tokens=True):
    deltas = stream(tokenizer, ids, skip_special_tokens)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected, (ids, deltas)
    return deltas


@pytest.fixture(scope="module")
def glm(tokenizer_model):
    return ChatGLM3Tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def llama_like(tokenizer_model, tmp_path_factory):
    """A Hugging Face (tokenizers-backed) llama tokenizer converted offline from the same model."""
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("llama_tok")
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    return LlamaTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def gpt2_like():
    """A byte-level BPE tokenizer trained offline and wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    backend.train_from_iterator(TEXTS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_chatglm3_real_texts(glm, text):
    ids = glm.encode(text)
    assert "".join(stream(glm, ids)) == glm.decode(ids) == text


def test_chatglm3_chat_prompt_with_specials(glm):
    ids = glm.build_chat_input([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好 😀"},
        {"role": "assistant", "metadata": "tool", "content": "  x  y"},
    ])
    assert_streams_exactly(glm, ids, skip_special_tokens=True)
    assert_streams_exactly(glm, ids, skip_special_tokens=False)


@pytest.mark.parametrize("skip", [True, False])
def test_chatglm3_random_ids(glm, skip):
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(0, 40)
        # mostly ordinary pieces and raw bytes, sometimes specials, control ids and unused rows
        ids = [rng.choice([rng.randrange(glm.sp_size), rng.randrange(3, 259),
                           rng.randrange(glm.sp_size, glm.vocab_size + 5), rng.randrange(3)])
               for _ in range(n)]
        assert_streams_exactly(glm, ids, skip_special_tokens=skip)


def test_emoji_split_across_byte_tokens_is_held_back(glm):
    ids = glm.encode("a😀")
    deltas = stream(glm, ids)
    assert "".join(deltas) == "a😀"
    assert not any("\ufffd" in d for d in deltas)
    assert "😀" in deltas  # emitted whole, once its last byte arrived


def test_leading_space_pieces_after_specials(glm):
    the = glm.sp.piece_to_id("▁the")
    space = glm.sp.piece_to_id("▁")
    user = glm.special_token_ids["<|user|>"]
    for ids in ([the, user, the, the], [user, the, space, user, the], [space, space, the, 2, the],
                [the, space, user, user, space, the]):
        assert_streams_exactly(glm, ids, skip_special_tokens=True)
        assert_streams_exactly(glm, ids, skip_special_tokens=False)


def test_undecodable_bytes_are_flushed_by_finish(glm):
    ids = glm.encode("ok") + [3 + 0xE4, 3 + 0xB8]  # an incomplete UTF-8 sequence at the very end
    decoder = IncrementalDecoder(glm)
    streamed = "".join(decoder.push(i) for i in ids)
    assert streamed == "ok"
    assert decoder.finish() == "\ufffd\ufffd"


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_window_stays_short(glm):
    ids = glm.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(glm)
    assert "".join(stream(counting, ids)) == glm.decode(ids)
    assert len(ids) > 1000
    assert counting.longest <= 16  # per-token work does not grow with the reply


@pytest.mark.parametrize("text", TEXTS)
def test_hf_llama_like_real_texts(llama_like, text):
    ids = llama_like.encode(text, add_special_tokens=False)
    assert_streams_exactly(llama_like, ids)
    assert_streams_exactly(llama_like, [llama_like.bos_token_id] + ids, skip_special_tokens=True)
    assert_streams_exactly(llama_like, [llama_like.bos_token_id] + ids, skip_special_tokens=False)


def test_hf_llama_like_random_pieces(llama_like):
    # ByteFallback re-renders a whole byte run as U+FFFDs when it is invalid, so random raw bytes are
    # not append-only there; use ordinary pieces and specials.
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(259, 400), rng.randrange(3)]) for _ in range(rng.randint(0, 30))]
        assert_streams_exactly(llama_like, ids)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_byte_level_real_texts(gpt2_like, text):
    ids = gpt2_like.encode(text)
    assert_streams_exactly(gpt2_like, ids)


@pytest.mark.parametrize("skip", [True, False])
def test_hf_byte_level_random_ids(gpt2_like, skip):
    rng = random.Random(99)
    size = len(gpt2_like)
    for _ in range(200):
        ids = [rng.randrange(size) for _ in range(rng.randint(0, 30))]
        assert_streams_exactly(gpt2_like, ids, skip_special_tokens=skip)


class LstripTokenizer:
    """Toy decoder that drops *all* leading spaces of its output (as some decoders do)."""

    pieces = ["a", " ", "b", "  ", "<eos>"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 4))
        return text.lstrip(" ")


def test_window_never_starts_at_text_that_renders_empty():
    toy = LstripTokenizer()
    assert_streams_exactly(toy, [0, 1, 1, 2])  # "a  b", not "a b"
    rng = random.Random(5)
    for _ in range(300):
        ids = [rng.randrange(5) for _ in range(rng.randint(0, 12))]
        assert_streams_exactly(toy, ids)
        assert_streams_exactly(toy, ids, skip_special_tokens=False)
