"""Documents through the OpenAI-compatible API (``chatglm_web/api/documents.py``): ``file`` content parts sent with
the official ``openai`` client to the real server; what the engine was given, the response's ``documents``
field, and the refusals (400 with a message naming the part) after which the server goes on answering."""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time

import httpx
import openai
import pytest

from chatglm_web.api.documents import MIN_ROOM_TOKENS, frame
from chatglm_web.generation import InvalidRequest, SamplingParams
from server_harness import running_server
from test_documents import MiB, docx_bytes, text_pdf, with_member

KEY = "test-key-123"
PROMPT_TOKENS = 1024   # --max-input-tokens: the prompt's budget, so that a long document needs passages
FACT = "The Zorvath bridge was opened in 1937 by mayor Ellison."
QUESTION = "When was the Zorvath bridge opened?"


@pytest.fixture(scope="module")
def server(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint), api_key=KEY, max_input_tokens=PROMPT_TOKENS) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0)


@pytest.fixture
def prompts(server, monkeypatch) -> list[list[int]]:
    """The prompt ids of every generation the engine is given from now on."""
    seen = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: seen.append(list(ids)) or submit(ids, *rest))
    return seen


def text_of(server, ids: list[int]) -> str:
    """A prompt as text, its special tokens written out."""
    return server.backend.format.tokenizer.decode(ids, skip_special_tokens=False)


def tokens(server, text: str) -> int:
    return len(server.backend.format.tokenizer.encode(text))


def file_part(filename: str | None, data: bytes, media_type: str | None = None) -> dict:
    """An OpenAI ``file`` content part: a data URL when ``media_type`` is given, else plain base64."""
    encoded = base64.b64encode(data).decode()
    file = {"file_data": f"data:{media_type};base64,{encoded}" if media_type else encoded}
    if filename is not None:
        file["filename"] = filename
    return {"type": "file", "file": file}


def ask(question: str, *parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, *parts]}]


def long_text(fact: str, paragraphs: int = 60, seed: int = 3) -> str:
    """Filler paragraphs about bridges and towns (thousands of tokens), ``fact`` in the middle."""
    rng = random.Random(seed)
    words = ["river", "town", "council", "built", "road", "traffic", "stone", "steel", "engineer", "year",
             "harbour", "market", "railway", "station", "museum", "people", "winter", "summer", "trade", "water"]
    filler = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))).capitalize() + "."
              for _ in range(paragraphs)]
    filler.insert(paragraphs // 2, fact)
    return "\n\n".join(filler)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def refusal(server, messages: list[dict]) -> dict:
    response = post(server, {"messages": messages, "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def still_answers(client) -> None:
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert "documents" not in reply.model_extra   # only a request with documents gets the field


def test_docx_and_pdf_text_reach_the_prompt_whole(server, client, prompts):
    docx = docx_bytes(["Quarterly report of the harbour office.", "Ships counted in March: 4812."])
    pdf = text_pdf(["The lighthouse keeper is Ada Marsh.", "The lighthouse was painted red in 1990."])
    reply = client.chat.completions.create(model="m", max_tokens=4, messages=ask(
        "Summarise both documents.",
        file_part("report.docx", docx, "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        file_part("lighthouse.pdf", pdf)))   # plain base64, named
    [ids] = prompts
    prompt = text_of(server, ids)
    for text in ("Quarterly report of the harbour office.", "Ships counted in March: 4812.",
                 "The lighthouse keeper is Ada Marsh.", "The lighthouse was painted red in 1990."):
        assert text in prompt
    assert "Document: report.docx (Word document)" in prompt
    assert "Document: lighthouse.pdf (PDF, 2 pages)" in prompt and "[Page 2]" in prompt
    # each block framed, in the order given, before the question, all in the user's message
    user = prompt[prompt.index("<|user|>"):]
    assert user.index("<document>") < user.index("report.docx") < user.index("</document>") \
        < user.index("lighthouse.pdf") < user.rindex("</document>") < user.index("Summarise both documents.") \
        < user.index("<|assistant|>")
    documents = reply.model_extra["documents"]
    assert [(d["filename"], d["mode"], d["suggested_model"]) for d in documents] == [
        ("report.docx", "whole", None), ("lighthouse.pdf", "whole", None)]
    assert all(d["included_tokens"] == d["total_tokens"] > 5 for d in documents)


def test_a_long_document_gives_the_passage_with_the_fact(server, client, prompts):
    text = long_text(FACT)
    assert tokens(server, text) > 5 * PROMPT_TOKENS
    messages = ask(QUESTION, file_part("town.txt", text.encode()),
                   file_part(None, b"# Notes\n\nThe ferry leaves at noon.", "text/markdown"))
    reply = client.chat.completions.create(model="m", max_tokens=4, messages=messages)
    [ids] = prompts
    prompt = text_of(server, ids)
    assert FACT in prompt and "The ferry leaves at noon." in prompt
    assert "town.txt (text file). It is too long to show whole: below are the" in prompt
    assert PROMPT_TOKENS // 2 < len(ids) <= PROMPT_TOKENS   # the room is used, and the budget kept
    long, short = reply.model_extra["documents"]
    assert long["filename"] == "town.txt" and long["mode"] == "passages"
    assert 0 < long["included_tokens"] < long["total_tokens"] == tokens(server, text)
    assert long["suggested_model"] == "THUDM/chatglm3-6b-32k"   # over 4 times what it was given
    assert short == {"filename": "document.md", "mode": "whole", "included_tokens": short["total_tokens"],
                     "total_tokens": short["total_tokens"], "suggested_model": None}
    # streamed: the first chunk says the same
    chunks = list(client.chat.completions.create(model="m", max_tokens=4, messages=messages, stream=True))
    assert chunks[0].model_extra["documents"] == reply.model_extra["documents"]
    assert all("documents" not in (c.model_extra or {}) for c in chunks[1:])
    assert prompts[1] == ids


def test_a_document_whose_later_turns_fill_the_context_is_left_out(server, client, prompts):
    messages = ask("Remember this.", file_part("town.txt", long_text(FACT).encode()))
    messages += [{"role": "assistant", "content": long_text("Nothing to see.", paragraphs=25, seed=5)},
                 {"role": "user", "content": "And now?"}]
    reply = client.chat.completions.create(model="m", max_tokens=4, messages=messages)
    [ids] = prompts
    prompt = text_of(server, ids)
    assert "Zorvath" not in prompt and "And now?" in prompt
    assert reply.model_extra["documents"] == [{"filename": "town.txt", "mode": "left_out", "included_tokens": 0,
                                               "total_tokens": None, "suggested_model": None}]


def test_bombs_and_garbage_are_400_with_the_readers_message_and_the_server_goes_on(server, client, prompts):
    bomb = with_member(docx_bytes(["Hello"]), "word/media/zeros.bin", (bytes(MiB) for _ in range(256)))
    error = refusal(server, ask("Read it.", file_part("bomb.docx", bomb)))
    assert error["message"].startswith("messages[0].content[1]: bomb.docx was not read: ")
    assert "guards against zip and PDF bombs" in error["message"] and error["param"] == "messages.0.content.1"
    garbage = random.Random(1).randbytes(4000)
    error = refusal(server, ask("Read it.", file_part("scan.pdf", garbage)))
    assert "scan.pdf is not a PDF" in error["message"]
    error = refusal(server, ask("Read it.", file_part("run.exe", b"MZ\x90\x00")))
    assert ".exe files cannot be attached" in error["message"]
    assert not prompts, "a refused request reached the engine"
    still_answers(client)
    assert httpx.get(server.url + "healthz").json()["status"] == "ok"


@pytest.mark.parametrize("file, wanted, param", [
    ({"filename": "a.txt", "file_data": "@@not base64@@"}, "(a.txt): file_data is not valid base64", "file_data"),
    ({"filename": "a.txt", "file_data": "aGVsbG8"}, "file_data is not valid base64", "file_data"),   # padding
    ({"filename": "a.txt", "file_data": "data:text/plain,hello"}, "without ';base64,'", "file_data"),
    ({"file_data": "aGVsbG8="}, "filename is missing", "filename"),
    ({"file_data": "data:image/png;base64,aGVsbG8="}, "the media type 'image/png' names none", "filename"),
    ({"file_id": "file-abc123"}, "file_id is not supported", "file_id"),
    ({"filename": "a.txt"}, "file_data must be the file's content in base64", "file_data"),
])
def test_bad_file_parts_are_400_naming_the_part(server, client, file, wanted, param):
    error = refusal(server, ask("Read it.", {"type": "file", "file": file}))
    assert error["message"].startswith("messages[0].content[1]") and wanted in error["message"]
    assert error["param"] == f"messages.0.content.1.file.{param}"
    still_answers(client)


def test_file_parts_only_in_user_messages_and_at_most_four_per_request(server):
    part = file_part("a.txt", b"hello")
    error = refusal(server, [{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}])
    assert error["message"] == "messages[0].content[0]: file parts are only taken in user messages, not in " \
                               "system messages." and error["param"] == "messages.0.content.0"
    answered = {"role": "assistant", "content": [{"type": "text", "text": "ok"}, part]}
    error = refusal(server, [{"role": "user", "content": "hi"}, answered, {"role": "user", "content": "and?"}])
    assert error["message"].startswith("messages[1].content[1]: file parts are only taken in user messages, not "
                                       "in assistant messages.")
    error = refusal(server, ask("Read them.", *[file_part(f"{i}.txt", b"hello") for i in range(5)]))
    assert error["message"].startswith("At most 4 files are taken in one request, got 5")
    assert error["param"] == "messages"


def longest_system_prompt(backend, words: list[str]) -> tuple[int, int]:
    """(n, prompt tokens): the most of ``words`` a system prompt may hold before a framed question ("Read it.")
    with an empty document and still fit the prompt, and the tokens that prompt takes."""
    framed = {"role": "user", "content": frame([""], "Read it.")}

    def total(count: int) -> int | None:   # the prompt without the document's text; None: it does not fit
        system = {"role": "system", "content": " ".join(words[:count])}
        try:
            return backend.preview([system, framed], SamplingParams(max_new_tokens=4)).total
        except InvalidRequest:
            return None

    low, high = 0, len(words)
    assert total(high) is None
    while high - low > 1:   # the most words that still fit
        middle = (low + high) // 2
        low, high = (middle, high) if total(middle) is not None else (low, middle)
    return low, total(low)


def test_no_room_for_a_document_is_400_saying_so(server, client):
    """A system prompt that leaves under MIN_ROOM_TOKENS of the prompt's budget: the document is refused."""
    low, tokens = longest_system_prompt(server.backend, long_text("", paragraphs=12, seed=9).split())
    assert PROMPT_TOKENS - MIN_ROOM_TOKENS < tokens <= PROMPT_TOKENS
    system = {"role": "system", "content": " ".join(long_text("", paragraphs=12, seed=9).split()[:low])}
    error = refusal(server, [system, *ask("Read it.", file_part("a.txt", b"hello"))])
    assert error["message"] == (
        f"messages[1].content[1]: there is no room in the prompt for a.txt: the prompt may use {PROMPT_TOKENS:,} of "
        f"the model's 8,192 tokens and the conversation without the documents takes {tokens:,}. Shorten the "
        "conversation, lower max_tokens or attach fewer documents.")
    # without the document the same conversation is answered
    reply = client.chat.completions.create(model="m", max_tokens=4, messages=[system, *ask("Read it.")])
    assert reply.choices[0].finish_reason == "length"


def test_a_message_made_too_long_by_its_document_is_400_naming_the_limit(server, monkeypatch):
    """--max-input-chars holds for a message with its documents too, with a message that says so."""
    monkeypatch.setattr(server.backend.backend, "max_input_chars", 500)
    error = refusal(server, ask("Read it.", file_part("notes.txt", b"The ferry leaves at noon. " * 30)))
    assert error["message"].startswith("messages[0]: with its documents the message is ")
    assert "over this server's limit of 500 characters for one message (--max-input-chars)" in error["message"]
    assert error["param"] == "messages.0"


def test_healthz_answers_while_a_slow_document_is_read(server, monkeypatch):
    """Reading takes a second or more (html.parser over many tags, in the worker process), then the text is
    tokenized and indexed; the event loop stays free all along: the document is read off the event loop's thread,
    and /healthz answers meanwhile (how fast depends on the machine's load, so that is not asserted)."""
    import chatglm_web.api.documents as api_documents

    read_on_the_loop, extract = [], api_documents.extract

    def spied(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            read_on_the_loop.append(True)
        except RuntimeError:
            read_on_the_loop.append(False)
        return extract(*args, **kwargs)

    monkeypatch.setattr(api_documents, "extract", spied)
    unit = b"<p><b>The</b> <i>capital</i> <b>of</b> <i>France</i> <b>is</b> <i>Paris</i>.</p>"
    slow = b"<html><body>" + unit * 25_000 + b"</body></html>"
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("response", post(
        server, {"messages": ask("Read it.", file_part("slow.html", slow)), "max_tokens": 2})))
    thread.start()
    waits = []
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(server.url + "healthz", timeout=30).status_code == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    thread.join()
    assert read_on_the_loop == [False], "the document was read on the event loop"
    assert waits, "/healthz was not asked while the document was read"
    assert box["response"].status_code == 200, box["response"].text
    assert box["response"].json()["documents"][0]["mode"] == "passages"

