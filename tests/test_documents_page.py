"""Chat with a document on the page (issue 21, ``chatglm_web/page/attachments.py``, ``document_store.py``
and ``document_chips.py``): files attached through the page's real handler chain over HTTP (``PageClient``), the
prompt the engine is given, the chips and the note under the reply, documents dropped when the browser session
closes, the caps, bombs refused with their message; and in Debian's Chromium, the 📎 button, the pending chip and
the chip on the message."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pytest
from browser_harness import browser  # noqa: F401  (the browser test's fixture)
from server_harness import PageClient, running_server
from test_api_documents import FACT, QUESTION, long_text, longest_system_prompt, prompts, text_of  # noqa: F401
from test_documents import MiB, docx_bytes, text_pdf, with_member
from waiting import wait_until

from chatglm_web.conversations.tree import ROOT, Conversation
from chatglm_web.documents.limits import LIMITS, megabytes
from chatglm_web.messages import plain_text
from chatglm_web.page import document_store
from chatglm_web.page.attachments import PageDocuments
from chatglm_web.page.document_store import PAGE_FILE_BYTES, Refusal, SessionDocuments
from chatglm_web.page.conversation_view import view
from chatglm_web.page.strings import STRINGS, text

FERRY = "The Quillon ferry sails to Marrow island every Tuesday."
PROMPT_TOKENS = 3072   # --max-input-tokens: small, so that a long document needs passages (the tiny
#                      test tokenizer makes about a token of each character: a passage is up to ~1,300 tokens)


@pytest.fixture(scope="module")
def server(long_reply_checkpoint):
    # (replies of at most 16 tokens: the browser test sends with the page's default)
    with running_server(model=str(long_reply_checkpoint), max_input_tokens=PROMPT_TOKENS, max_new_tokens=16) as srv:
        yield srv


def documents_of(server) -> PageDocuments:
    """The page's document steps (bound to the store that holds every session's documents)."""
    found = {getattr(block.fn, "__self__", None) for block in server.page.fns.values()}
    [documents] = [item for item in found if isinstance(item, PageDocuments)]
    return documents


def picked(name: str, data: bytes) -> dict:
    """What documents.js hands the server for a picked file."""
    return {"name": name, "size": len(data), "data": base64.b64encode(data).decode()}


def attach(page: PageClient, name: str, data: bytes):
    """Pick the file in the page: the hidden #attach-go step with what the browser read. Returns the step."""
    index = page.handler("attach-go", "click")
    step = page.run(index, {page.dependencies[index]["inputs"][0]: picked(name, data)})[0]   # (then the meter)
    assert step.ok, step.response
    return step


def opened(http, **load) -> PageClient:
    page = PageClient(http)
    page.load(**load)
    return page


def chat_texts(page: PageClient) -> list[str]:
    return [plain_text(m["content"]) for m in page.chat()]


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_a_pdf_and_a_docx_attached_on_the_page_go_into_the_prompt_whole(server, http, prompts):
    page = opened(http)
    attach(page, "report.docx", docx_bytes(["Quarterly report of the harbour office.", "Ships counted in March: 4812."]))
    assert "report.docx" in page.shown("attachments") and "Word document" in page.shown("attachments")
    attach(page, "lighthouse.pdf", text_pdf(["The lighthouse keeper is Ada Marsh.", "It was painted red in 1990."]))
    pending = page.shown("attachments")
    assert "lighthouse.pdf · PDF, 2 pages · " in pending and 'class="chip-remove"' in pending
    # "What the model sees" counts them already, in the message they will go with
    assert "The lighthouse keeper is Ada Marsh." in page.shown("prompt-text")
    assert "Ships counted in March: 4812." in page.shown("prompt-text")
    turn = page.turn("Summarise both documents.", max_new_tokens=4, seed=3)
    assert turn.refused is None, turn.refused
    [ids] = prompts
    prompt = text_of(server, ids)
    for said in ("Quarterly report of the harbour office.", "Ships counted in March: 4812.",
                 "The lighthouse keeper is Ada Marsh.", "It was painted red in 1990.",
                 "Document: report.docx (Word document)", "Document: lighthouse.pdf (PDF, 2 pages)", "[Page 2]"):
        assert said in prompt, said
    user = prompt[prompt.index("<|user|>"):]
    assert user.index("<document>") < user.index("report.docx") < user.index("lighthouse.pdf") \
        < user.index("Summarise both documents.") < user.index("<|assistant|>")
    assert page.shown("attachments") == ""          # the pending chips went with the message
    # with the box empty again, the meter counts the conversation, its documents in their message (no error)
    meter = page.shown("token-meter")
    history = re.search(r"history ([\d,]+)", meter)
    assert history and int(history.group(1).replace(",", "")) > len(ids) // 2, meter
    shown = chat_texts(page)
    assert shown[0] == "Summarise both documents."
    chips = shown[1]                                # the chips: a line of their own under the message
    assert 'class="doc-chips"' in chips and "report.docx · Word document · " in chips
    tokens = re.search(r"lighthouse\.pdf · PDF, 2 pages · ([\d,]+) tokens", chips)
    assert tokens and int(tokens.group(1).replace(",", "")) > 5
    notes = [m for m in shown if 'class="doc-note"' in m]
    assert len(notes) == 1 and "report.docx: the whole document was in the prompt" in notes[0] \
        and "lighthouse.pdf: the whole document was in the prompt" in notes[0]
    # the stored conversation keeps references only: never the text
    stored = page.stored()
    assert stored and "harbour office" not in json.dumps(page.local)


def test_a_long_document_gives_the_passage_for_each_question(server, http, prompts):
    paragraphs = long_text(FACT).split("\n\n")
    paragraphs.insert(8, FERRY)
    page = opened(http)
    attach(page, "town.docx", docx_bytes(paragraphs))
    page.turn(QUESTION, max_new_tokens=4, seed=3)
    [ids] = prompts
    prompt = text_of(server, ids)
    assert FACT in prompt and "town.docx (Word document). It is too long to show whole: below are the" in prompt
    assert PROMPT_TOKENS // 2 < len(ids) <= PROMPT_TOKENS
    [note] = [m for m in chat_texts(page) if 'class="doc-note"' in m]
    found = re.search(r"town\.docx: too long to read whole; the (\d+) passages most relevant to the question were "
                      r"in the prompt \(([\d,]+) of ([\d,]+) tokens, (\d+)%\)", note)
    assert found, note
    assert 0 < int(found.group(2).replace(",", "")) < int(found.group(3).replace(",", ""))
    assert "use a longer-context model such as THUDM/chatglm3-6b-32k" in note   # over 4 times the room
    # a later question about the same document gets the passage for that question
    page.turn("Where does the Quillon ferry sail to?", max_new_tokens=4, seed=3)
    later = text_of(server, prompts[1])
    assert FERRY in later and later.index(FERRY) < later.index("Where does the Quillon ferry sail to?")


def test_documents_are_dropped_when_the_session_closes(server, http, prompts):
    documents = documents_of(server)
    page = opened(http)
    attach(page, "notes.txt", b"The ferry leaves at noon from pier 7.")
    page.turn("When does the ferry leave?", max_new_tokens=4, seed=3)
    assert "pier 7" in text_of(server, prompts[0])
    assert documents.store.held_chars(page.session) > 0
    # the tab goes away: its heartbeat closes, and Gradio runs the page's unload steps
    with http.stream("GET", f"gradio_api/heartbeat/{page.session}") as beat:
        next(beat.iter_lines())
    wait_until(lambda: documents.store.held_chars(page.session) == 0, 30, "the session's documents to be dropped")
    assert not any(store.held_chars(page.session) for store in document_store._STORES)
    # the same conversation in a new tab: the chip stays, and says the document must be attached again
    again = PageClient(http, local=page.local)
    again.tab = page.tab
    again.load()
    chips = chat_texts(again)[1]
    assert "notes.txt · text file · " in chips and text("doc_attach_again", "en") in chips
    again.turn("And on Sundays?", max_new_tokens=4, seed=3)
    assert "pier 7" not in text_of(server, prompts[1])
    notes = [m for m in chat_texts(again) if 'class="doc-note"' in m]
    assert "notes.txt: not in the prompt; documents are kept only while the page is open" in notes[-1]


def test_a_bomb_is_refused_with_its_message_and_the_page_goes_on(server, http, prompts):
    page = opened(http)
    bomb = with_member(docx_bytes(["Hello"]), "word/media/zeros.bin", (bytes(MiB) for _ in range(256)))
    attach(page, "bomb.docx", bomb)
    stats = page.shown("reply-stats")
    assert stats.startswith("⚠️ bomb.docx was not read: ") and "guards against zip and PDF bombs" in stats
    assert page.shown("attachments") == ""
    attach(page, "scan.pdf", b"%PDF-1.7 nothing else")
    assert "scan.pdf" in page.shown("reply-stats")
    attach(page, "run.exe", b"MZ\x90\x00")
    assert ".exe files cannot be attached" in page.shown("reply-stats")
    turn = page.turn("hello", max_new_tokens=3, seed=3)
    assert turn.refused is None and len(prompts) == 1 and "bomb" not in text_of(server, prompts[0])
    # in Chinese
    page.run(page.handler("language-switch", "click"))
    attach(page, "bomb.docx", bomb)
    assert page.shown("reply-stats") == "⚠️ " + document_store.REASONS_ZH["bomb"].format(name="bomb.docx")


def test_a_file_over_the_page_limit_is_refused_in_the_browser_and_on_the_server(server, http):
    page = opened(http)
    index = page.handler("attach-go", "click")
    too_large = {"name": "big.pdf", "size": PAGE_FILE_BYTES + 1, "error": "too_large"}   # documents.js did not read it
    page.run(index, {page.dependencies[index]["inputs"][0]: too_large})
    assert page.shown("reply-stats") == "⚠️ " + text("doc_file_too_large", "en", name="big.pdf",
                                                     size=megabytes(PAGE_FILE_BYTES + 1),
                                                     limit=megabytes(PAGE_FILE_BYTES))
    sent = {"name": "big.txt", "data": "A" * (PAGE_FILE_BYTES * 4 // 3 + 100)}             # sent anyway
    page.run(index, {page.dependencies[index]["inputs"][0]: sent})
    assert "big.txt" in page.shown("reply-stats") and megabytes(PAGE_FILE_BYTES) in page.shown("reply-stats")
    assert page.shown("attachments") == ""
    # a file just under the limit travels through the HTTP guard's body limit and reaches the reader
    attach(page, "near.txt", b"word " * (PAGE_FILE_BYTES // 5 - 1000))
    assert page.shown("reply-stats") == f"⚠️ near.txt has more than {LIMITS.chars:,} characters of text; documents " \
                                        f"are limited to {LIMITS.chars:,} characters."


def test_a_pending_chip_can_be_removed(server, http, prompts):
    documents = documents_of(server)
    page = opened(http)
    attach(page, "a.md", b"# Alpha\n\nThe alpha code is 1234.")
    attach(page, "b.md", b"# Beta\n\nThe beta code is 5678.")
    first, _ = documents.store.pending(page.session)
    index = page.handler("detach-go", "click")
    page.run(index, {page.dependencies[index]["inputs"][0]: first["id"]})
    assert "a.md" not in page.shown("attachments") and "b.md" in page.shown("attachments")
    page.turn("What is the code?", max_new_tokens=3, seed=3)
    prompt = text_of(server, prompts[0])
    assert "5678" in prompt and "1234" not in prompt


def test_no_room_for_a_document_gives_the_message_and_its_documents_back(server, http, prompts):
    """A system prompt that leaves under MIN_ROOM_TOKENS of the prompt: the turn is refused, saying why; the
    message returns to the box and its document to the pending chips."""
    from chatglm_web.documents.prompt import MIN_ROOM_TOKENS

    words = long_text("", paragraphs=40, seed=9).split()
    low, tokens = longest_system_prompt(server.backend, words)
    assert PROMPT_TOKENS - MIN_ROOM_TOKENS < tokens <= PROMPT_TOKENS
    page = opened(http)
    attach(page, "notes.txt", b"The ferry leaves at noon from pier 7.")
    page.set("system-prompt", " ".join(words[:low]))
    turn = page.turn("Read it.", max_new_tokens=4, seed=3)
    assert not prompts and turn.stats.startswith("⚠️ There is no room in the prompt for notes.txt: the prompt may "
                                                 f"use {PROMPT_TOKENS:,} of the model's 8,192 tokens")
    assert page.shown("chat-input") == "Read it." and page.chat() == []
    assert "notes.txt · text file" in page.shown("attachments")   # pending again


def test_undo_gives_the_documents_back_to_the_pending_chips():
    from types import SimpleNamespace

    from chatglm_web.page import turns

    documents = PageDocuments(SimpleNamespace(info=None))
    request = SimpleNamespace(session_hash="s1", client=SimpleNamespace(host="10.0.0.1"))
    documents.store.attach("s1", "10.0.0.1", "notes.txt", b"The ferry leaves at noon.", "en")
    tree = Conversation()
    user = tree.add_user(ROOT, "When?", documents.take(request))
    tree.set_reply(tree.add_reply(user.id).id, [{"role": "assistant", "content": "At noon."}])
    assert documents.store.pending("s1") == []
    _, shown = turns.chat_update(tree, "en", False)
    chat, shown, box, pending = turns.undo(tree, shown, False, False, "en", SimpleNamespace(index=len(shown) - 1),
                                           documents=documents, request=request)
    assert tree.empty and box.value == "When?" and "notes.txt · text file" in pending
    assert [ref["name"] for ref in documents.store.pending("s1")] == ["notes.txt"]


def test_an_edited_message_keeps_its_documents():
    from types import SimpleNamespace

    from chatglm_web.page import turns

    refs = [{"id": "dx", "name": "a.pdf", "kind": "pdf", "pages": 2, "chars": 90, "tokens": 30}]
    tree = Conversation()
    user = tree.add_user(ROOT, "When?", refs)
    tree.set_reply(tree.add_reply(user.id).id, [{"role": "assistant", "content": "At noon."}])
    _, shown = turns.chat_update(tree, "en", False)
    request = SimpleNamespace(session_hash="s")
    plan = turns.Begin(turns.Refusals()).edit(tree, shown, False, False, "en",
                                               SimpleNamespace(index=0, value="Where?"), request)
    assert plan["documents"] == refs
    out = turns.show(plan, tree, "en", "", 0.8, 0.8, 4, 0, 1.0, 3, "Chat")
    edited = tree.nodes[out[4]["user_node"]]
    assert edited.id != user.id and edited.messages[0] == {"role": "user", "content": "Where?", "documents": refs}


def test_the_markdown_download_says_the_documents_in_words_not_html():
    from chatglm_web.conversations.transcript import to_markdown

    refs = [{"id": "dx", "name": "a<b>.pdf", "kind": "pdf", "pages": 2, "chars": 90, "tokens": 30}]
    tree = Conversation()
    user = tree.add_user(ROOT, "When?", refs)
    reply = tree.add_reply(user.id)
    tree.set_reply(reply.id, [{"role": "assistant", "content": "At noon."}])
    reply.generation["documents"] = json.dumps([{"name": "a<b>.pdf", "mode": "whole", "included_tokens": 30,
                                                 "total_tokens": 30, "suggested_model": None}])
    shown, _ = view(tree, "en")
    assert any("<span" in plain_text(m["content"]) for m in shown)  # the page shows chips
    markdown = to_markdown(view(tree, "en", plain=True)[0])
    assert "<span" not in markdown and "&lt;" not in markdown
    assert "📄 a<b>.pdf" in markdown and "At noon." in markdown
    assert "whole document" in markdown


def test_junk_from_a_hostile_browser_is_answered_and_names_are_escaped(server, http):
    page = opened(http)
    attach_index, detach_index = page.handler("attach-go", "click"), page.handler("detach-go", "click")
    for junk in (None, [], "x", {"data": 123}, {"name": 5, "data": "@@@"}, {"error": "unreadable", "name": "a.pdf"},
                 {"name": "x.txt", "data": "aGVsbG8"}):   # (the last: bad padding)
        [step, *_] = page.run(attach_index, {page.dependencies[attach_index]["inputs"][0]: junk})
        assert step.ok, junk
    for junk in (None, "d" * 10_000, "<script>"):
        [step, *_] = page.run(detach_index, {page.dependencies[detach_index]["inputs"][0]: junk})
        assert step.ok, junk
    attach(page, '../../<img src=x onerror=alert(1)>.txt', b"hello")
    pending = page.shown("attachments")
    assert "<img" not in pending and "&lt;img src=x onerror=alert(1)&gt;.txt" in pending


# -- the caps ------------------------------------------------------------------------------------------------------

def test_uploads_are_counted_per_session_and_per_client(monkeypatch):
    store = SessionDocuments(len)
    monkeypatch.setattr(document_store, "MAX_PENDING", 2)
    monkeypatch.setattr(document_store, "MAX_SESSION_DOCUMENTS", 3)
    monkeypatch.setattr(document_store, "MAX_CLIENT_DOCUMENTS", 4)
    def read(session, client, lang="en"):
        return store.attach(session, client, "a.txt", b"some text", lang)

    read("s1", "10.0.0.1")
    read("s1", "10.0.0.1")
    with pytest.raises(Refusal, match="At most 2 documents go with one message"):
        read("s1", "10.0.0.1")
    store.take_pending("s1")                       # sent with a message: still held by the session
    read("s1", "10.0.0.1")
    store.take_pending("s1")
    with pytest.raises(Refusal, match="This page already holds 3 documents"):
        read("s1", "10.0.0.1")
    read("s2", "10.0.0.1")                         # another tab of the same address
    with pytest.raises(Refusal) as refused:
        read("s3", "10.0.0.1", "zh-CN")
    assert str(refused.value) == text("doc_too_many_client", "zh-CN", count=4)
    read("s3", "10.0.0.2")                         # another address is not held back
    assert store.end_session("s1") == 3 and store.sessions() == 2
    read("s3", "10.0.0.1")                         # what the address held went with the session


def test_characters_and_reads_are_capped(monkeypatch):
    now = [1000.0]
    store = SessionDocuments(len, clock=lambda: now[0])
    monkeypatch.setattr(document_store, "MAX_SESSION_CHARS", 25)
    monkeypatch.setattr(document_store, "MAX_CLIENT_READS", 4)
    store.attach("s", "c", "a.txt", b"x" * 20, "en")
    with pytest.raises(Refusal, match="b.txt was not kept: this page's documents may hold 25 characters"):
        store.attach("s", "c", "b.txt", b"y" * 6, "en")
    store.attach("s", "c", "c.txt", b"z" * 5, "en")
    store.attach("t", "c", "d.txt", b"w", "en")     # the fourth read (a refused one counts too)
    with pytest.raises(Refusal, match="at most 4 every 10 minutes"):
        store.attach("t", "c", "e.txt", b"w", "en")
    now[0] += document_store.READ_WINDOW_SECONDS
    store.attach("t", "c", "e.txt", b"w", "en")
    now[0] += document_store.IDLE_SECONDS + 1          # no unload came: idle sessions go at the next attach
    store.attach("u", "other", "f.txt", b"v", "en")
    assert store.sessions() == 1 and store.held_chars() == 1


def test_the_limits_the_readme_states_are_the_ones_in_force():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Documents on the page"):readme.index("## Tools and code interpreter")]
    section = " ".join(section.split())
    body = PAGE_FILE_BYTES * 4 // 3
    assert body < 8 * MiB - 64 * 1024                # base64 of the largest file fits the body limit with room
    for said in (f"at most {megabytes(PAGE_FILE_BYTES)}", f"{LIMITS.pages} pages",
                 f"{LIMITS.chars:,} characters of text", f"{LIMITS.seconds:g} s", f"{document_store.MAX_PENDING} documents",
                 f"{document_store.MAX_SESSION_DOCUMENTS} documents and {document_store.MAX_SESSION_CHARS:,} characters",
                 f"{document_store.MAX_CLIENT_DOCUMENTS} documents and {document_store.MAX_CLIENT_CHARS:,} characters",
                 f"{document_store.MAX_CLIENT_READS} files every {document_store.READ_WINDOW_SECONDS // 60} minutes",
                 f"{document_store.MAX_TOTAL_CHARS:,} characters", f"{document_store.IDLE_SECONDS // 3600} hours"):
        assert said in section, said
    assert (document_store.MAX_PENDING, document_store.MAX_SESSION_DOCUMENTS, document_store.MAX_SESSION_CHARS,
            document_store.MAX_CLIENT_DOCUMENTS, document_store.MAX_CLIENT_CHARS, document_store.MAX_CLIENT_READS,
            document_store.MAX_TOTAL_CHARS) == (4, 8, 4_000_000, 16, 8_000_000, 30, 64_000_000)


# -- the conversation keeps references only ------------------------------------------------------------------------

def test_the_tree_keeps_document_references_and_refuses_nothing_for_bad_ones():
    tree = Conversation()
    ref = {"id": "dabc", "name": "a.pdf", "kind": "pdf", "pages": 3, "chars": 1200, "tokens": 300, "text": "secret"}
    user = tree.add_user(ROOT, "Read it.", [ref, {"name": "no id"}, "junk"])
    assert user.messages[0]["documents"] == [{k: v for k, v in ref.items() if k != "text"}]
    data = tree.to_dict()
    data["nodes"][1]["messages"][0]["documents"].append({"id": "d2", "name": "b.txt", "pages": "many", "chars": True})
    again = Conversation.from_dict(json.loads(json.dumps(data)))
    assert again.nodes[user.id].messages[0]["documents"] == [
        {k: v for k, v in ref.items() if k != "text"},
        {"id": "d2", "name": "b.txt", "kind": "", "pages": None, "chars": 0, "tokens": 0}]
    messages, shown = view(again, "zh-CN")
    assert messages[0] == {"role": "user", "content": "Read it."} and shown == [user.id, user.id]
    assert "a.pdf · PDF，3 页 · 300 tokens" in messages[1]["content"]
    assert text("doc_attach_again", "zh-CN") in messages[1]["content"]   # no session holds it


def test_every_document_string_is_in_both_languages():
    keys = [key for key in STRINGS if key.startswith("doc_")]
    assert len(keys) > 20
    for reason in ("bomb", "pages", "chars", "time", "memory", "too_large", "unsupported", "busy"):
        assert reason in document_store.REASONS_ZH


# -- in the browser ------------------------------------------------------------------------------------------------

@pytest.mark.browser
def test_the_page_attaches_a_file_shows_its_chip_and_refuses_a_bomb(browser, server, tmp_path):
    from browser_harness import STATS, Session, expect_idle, send
    from playwright.sync_api import expect

    pdf = tmp_path / "lighthouse.pdf"
    pdf.write_bytes(text_pdf(["The lighthouse keeper is Ada Marsh.", "It was painted red in 1990."]))
    bomb = tmp_path / "bomb.docx"
    bomb.write_bytes(with_member(docx_bytes(["Hello"]), "word/media/zeros.bin", (bytes(MiB) for _ in range(256))))
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe ferry leaves at noon.")
    session = Session(browser, server).open()
    page = session.page
    button = page.get_by_role("button", name=re.compile(r"^Attach a document \(\.txt, \.md, \.pdf, \.docx or \.html"))
    expect(button).to_be_visible()

    def pick(path):
        with page.expect_file_chooser() as chooser:
            button.click()
        chooser.value.set_files(str(path))

    pick(pdf)
    pending = page.locator("#attachments .doc-chip")
    expect(pending).to_contain_text(re.compile(r"lighthouse\.pdf · PDF, 2 pages · [\d,]+ tokens"))
    send(page, "Who keeps the lighthouse?")
    expect(page.locator("#chatbot .doc-chips .doc-chip")).to_contain_text("lighthouse.pdf · PDF, 2 pages")
    expect(pending).to_have_count(0)
    expect(page.locator("#chatbot .doc-note")).to_contain_text(
        "lighthouse.pdf: the whole document was in the prompt")
    expect_idle(page)
    # a bomb is refused with its message, in the line under the message box
    pick(bomb)
    expect(page.locator(STATS)).to_contain_text("bomb.docx was not read")
    expect(pending).to_have_count(0)
    # a pending chip goes with its ✕
    pick(notes)
    expect(pending).to_contain_text("notes.md · Markdown file")
    page.get_by_role("button", name="Remove notes.md").click()
    expect(pending).to_have_count(0)
    assert session.outside_requests() == [] and session.page_errors == []
    session.context.close()
