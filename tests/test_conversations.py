"""Conversations as trees of versions: editing, versions, the JSON form and its strict reading, merging two
tabs' copies, migrating old linear histories, sealing, the browser-kept list, share links and the chat's view."""

from __future__ import annotations

import copy
import html
import json
import re
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatglm_web.conversations import sealed, tree as tree_module
from chatglm_web.conversations.browser_store import BrowserStore, read_import
from chatglm_web.conversations.sealed import Sealer, Unreadable
from chatglm_web.conversations.share import ShareLinks, TooLong, replay_diff, replay_inputs
from chatglm_web.conversations.tree import ROOT, Conversation, InvalidConversation, from_history
from chatglm_web.page.conversation_view import is_nav, navigate, node_at, view
from chatglm_web.page.markers import ending_of, marker
from chatglm_web.conversations.transcript import to_json

SECRET = "a state secret for the tests"


# -- helpers ------------------------------------------------------------------------------------------------------
def reply_to(tree: Conversation, user_id: str, text: str, end=None, error="", generation=None):
    node = tree.add_reply(user_id, generation)
    tree.set_reply(node.id, [{"role": "assistant", "content": text}], end, error)
    return node


def exchange(tree: Conversation, parent: str, message: str, reply: str, **kw):
    user = tree.add_user(parent, message)
    return user, reply_to(tree, user.id, reply, **kw)


def texts(tree: Conversation) -> list:
    return [m["content"] for m in tree.messages()]


def reread(tree: Conversation) -> Conversation:
    """Through JSON text and back, as the browser or a download carries it."""
    return Conversation.from_dict(json.loads(json.dumps(tree.to_dict())))


def sample() -> Conversation:
    """hi → (Hello! | Hi there!*) → and you? → (Fine. [stopped] | Great!*) ; a tool step with metadata; CJK."""
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello!")
    second = reply_to(tree, user.id, "Hi there!", generation={"temperature": 0.8, "seed": 7, "mode": "Chat"})
    question, _ = exchange(tree, second.id, "and you?", "Fine.", end="stopped")
    reply = tree.add_reply(question.id, {"temperature": 0.2, "seed": 11, "mode": "Tools"})
    tree.set_reply(reply.id, [{"role": "assistant", "content": "calc(1+1)", "metadata": {"title": "🛠 calculator"}},
                              {"role": "assistant", "content": "很好！Great!"}])
    return tree


class FakeBrowser:
    """localStorage as ``store.js`` keeps it: it stores what the server sealed and sends it back."""

    def __init__(self):
        self.data, self.meta, self.tab = {}, {}, None

    def apply(self, ops):
        for conversation_id in ops["remove"]:
            self.data.pop(conversation_id, None)
            self.meta.pop(conversation_id, None)
        for conversation_id, tree, meta in ops["put"]:
            self.data[conversation_id], self.meta[conversation_id] = tree, meta
        if ops.get("tab"):
            self.tab = ops["tab"]

    def metas(self):
        return [[i, self.meta[i], len(self.data.get(i, "")) + len(self.meta[i])] for i in self.meta]

    def current(self, conversation_id=None):
        return {"data": self.data.get(conversation_id or self.tab), "metas": self.metas()}

    def all(self):
        return [[i, self.data[i]] for i in self.data]


# -- the tree ---------------------------------------------------------------------------------------------------
def test_regenerate_and_edit_add_a_version_beside_the_old_one():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello!")
    assert tree.versions(first.id) == (1, 1)

    second = tree.add_reply(user.id)          # Regenerate
    assert second.end == "interrupted"        # until it is finished, a kept reply reads as interrupted
    tree.set_reply(second.id, [{"role": "assistant", "content": "Hi there!"}])
    assert tree.versions(first.id) == (1, 2) and tree.versions(second.id) == (2, 2)
    assert texts(tree) == ["hi", "Hi there!"]
    assert tree.nodes[first.id].messages == [{"role": "assistant", "content": "Hello!"}]   # not overwritten

    edited = tree.add_user(ROOT, "hey")       # Edit of the first message
    assert tree.versions(edited.id) == (2, 2) and tree.versions(user.id) == (1, 2)
    assert texts(tree) == ["hey"]
    reply_to(tree, edited.id, "Hey!")
    assert texts(tree) == ["hey", "Hey!"] and tree.size() == 5

    with pytest.raises(ValueError):
        tree.add_user(edited.id, "a message after a message")
    with pytest.raises(ValueError):
        tree.add_reply(second.id)
    with pytest.raises(ValueError):
        tree.set_reply(second.id, [], end="exploded")


def test_show_version_switches_the_branch_and_the_branch_below_keeps_its_own_shown_version():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello!")
    question, _ = exchange(tree, first.id, "and you?", "Fine.")
    reply_to(tree, question.id, "Great!")                         # version 2 of the second reply, shown
    other = reply_to(tree, user.id, "Hi there!")                  # version 2 of the first reply
    assert texts(tree) == ["hi", "Hi there!"]

    assert tree.show_version(other.id, -1) == first.id
    assert texts(tree) == ["hi", "Hello!", "and you?", "Great!"]   # the version last shown below, not the first
    assert tree.show_version(first.id, -1) == first.id            # clamped at the first
    assert tree.show_version(first.id, 5) == other.id             # and at the last
    assert texts(tree) == ["hi", "Hi there!"]
    assert [node.id for node in tree.path()] == [user.id, other.id] and tree.last().id == other.id


def test_messages_are_the_shown_branch_only_and_copies():
    tree = sample()
    shown = tree.messages()
    assert [m["content"] for m in shown] == ["hi", "Hi there!", "and you?", "calc(1+1)", "很好！Great!"]
    assert "Hello!" not in str(shown) and "Fine." not in str(shown)
    shown[0]["content"] = "changed"
    assert texts(tree)[0] == "hi"


def test_remove_shows_the_previous_version_and_removes_what_follows():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "one")
    second = reply_to(tree, user.id, "two")
    question, answer = exchange(tree, second.id, "more?", "yes")
    third = reply_to(tree, user.id, "three")

    tree.show_version(third.id, -1)
    tree.remove(second.id)
    assert texts(tree) == ["hi", "one"]                         # the previous version, not the next
    assert question.id not in tree.nodes and answer.id not in tree.nodes
    assert tree.versions(third.id) == (2, 2)
    tree.remove(first.id)                                       # the first version: the next one is shown
    assert texts(tree) == ["hi", "three"]
    tree.remove(third.id)
    assert texts(tree) == ["hi"]
    tree.remove(user.id)
    assert tree.empty and tree.title == "" and texts(tree) == []


def test_automatic_title_and_rename():
    tree = Conversation()
    long = "Explain   the difference between\nprocesses and threads in an operating system, with examples please"
    user, _ = exchange(tree, ROOT, long, "Sure.")
    assert tree.title.startswith("Explain the difference between processes") and "\n" not in tree.title
    assert len(tree.title) <= 60 and tree.title.endswith("…")
    automatic = tree.title

    tree.rename("  My   notes ")
    assert (tree.title, tree.titled_by_user) == ("My notes", True)
    tree.add_user(ROOT, "an edited first message")
    assert tree.title == "My notes"                             # a title the user chose stays

    tree.rename("   ")
    assert (tree.title, tree.titled_by_user) == (automatic, False)
    assert reread(tree).title == automatic

    short = Conversation()
    short.add_user(ROOT, "你好")
    assert short.title == "你好"


def test_to_dict_from_dict_round_trip_is_equal():
    tree = sample()
    back = reread(tree)
    assert back.to_dict() == tree.to_dict()
    assert back.messages() == tree.messages()
    assert [n.id for n in back.path()] == [n.id for n in tree.path()]
    reply = back.last()
    assert reply.generation == {"temperature": 0.2, "seed": 11, "mode": "Tools"}
    assert reply.messages[0]["metadata"] == {"title": "🛠 calculator"}
    stopped = [n for n in back.nodes.values() if n.messages and n.messages[0]["content"] == "Fine."][0]
    assert stopped.end == "stopped"


def valid() -> dict:
    """A small conversation's JSON form with known ids: root → u1 → a1 → u2 → a2."""
    data = {"format": "chatglm-web.conversation", "version": 1, "id": "c1", "title": "t", "titled_by_user": False,
            "created": 1.0, "updated": 2.0, "nodes": [
                {"id": "root", "parent": None, "role": "root", "messages": [], "children": ["u1"], "active": "u1"},
                {"id": "u1", "parent": "root", "role": "user", "messages": [{"role": "user", "content": "hi"}],
                 "children": ["a1"], "active": "a1"},
                {"id": "a1", "parent": "u1", "role": "assistant", "messages": [{"role": "assistant", "content": "yo"}],
                 "children": ["u2"], "active": "u2", "end": None, "error": "", "generation": {"seed": 1}},
                {"id": "u2", "parent": "a1", "role": "user", "messages": [{"role": "user", "content": "more"}],
                 "children": ["a2"], "active": "a2"},
                {"id": "a2", "parent": "u2", "role": "assistant", "messages": [], "children": [], "active": None,
                 "end": "stopped", "error": "", "generation": {}},
            ]}
    Conversation.from_dict(data)   # it is valid as it stands
    return data


def node(data, node_id):
    return next(n for n in data["nodes"] if n["id"] == node_id)


def _cycle(d):
    d["nodes"] += [{"id": "x", "parent": "y", "role": "user", "messages": [{"role": "user", "content": "x"}],
                    "children": ["y"]},
                   {"id": "y", "parent": "x", "role": "assistant", "messages": [], "children": ["x"]}]


def _self_parent(d):
    node(d, "a2")["children"] = ["a2"]
    node(d, "a2")["parent"] = "a2"


def _parent_disagrees(d):
    node(d, "u2")["parent"] = "root"        # a1 names it as its child, it names the root


def _child_of_two(d):
    node(d, "root")["children"].append("u2")


def _stray_child(d):
    node(d, "a2")["children"] = ["nobody"]


def _unlisted_child(d):
    d["nodes"].append({"id": "u3", "parent": "a2", "role": "user", "messages": [{"role": "user", "content": "?"}]})


def _duplicate(d):
    d["nodes"].append(copy.deepcopy(node(d, "a2")))


def _two_messages(d):
    node(d, "u1")["messages"].append({"role": "user", "content": "again"})


def _assistant_in_user(d):
    node(d, "u1")["messages"] = [{"role": "assistant", "content": "hi"}]


def _user_in_reply(d):
    node(d, "a1")["messages"] = [{"role": "user", "content": "yo"}]


def _user_file(d):
    node(d, "u1")["messages"] = [{"role": "user", "content": {"path": "/etc/passwd"}}]


def _too_many(d):
    d["nodes"] += [{"id": f"n{i}", "parent": "a2", "role": "user"} for i in range(tree_module.MAX_NODES)]


def _huge(d):
    node(d, "a1")["messages"] = [{"role": "assistant", "content": "x" * (tree_module.MAX_TEXT + 1)}]


def _huge_parts(d):
    parts = [{"type": "text", "text": "x" * tree_module.MAX_TEXT}]
    node(d, "a1")["messages"] = [{"role": "assistant", "content": parts}]


def _set(path, value):
    def change(d):
        target = d if path[0] is None else node(d, path[0])
        target[path[1]] = value
    return change


HOSTILE = {
    "not a dict": lambda d: d.clear() or d.update(x=1),
    "wrong format": _set((None, "format"), "chatglm-web.conversations"),
    "no format": lambda d: d.pop("format"),
    "version 2": _set((None, "version"), 2),
    "version as text": _set((None, "version"), "1"),
    "no nodes": _set((None, "nodes"), []),
    "nodes not a list": _set((None, "nodes"), {"root": {}}),
    "no root": lambda d: d["nodes"].pop(0),
    "root with a parent": _set(("root", "parent"), "u1"),
    "cycle": _cycle,
    "own parent": _self_parent,
    "parent disagrees": _parent_disagrees,
    "child of two": _child_of_two,
    "unknown child": _stray_child,
    "unlisted child": _unlisted_child,
    "duplicate id": _duplicate,
    "user node with two messages": _two_messages,
    "user node with a reply": _assistant_in_user,
    "reply with a user message": _user_in_reply,
    "user message not text": _user_file,
    "bad end": _set(("a2", "end"), "exploded"),
    "end as list": _set(("a2", "end"), ["stopped"]),
    "too many nodes": _too_many,
    "huge text": _huge,
    "huge content parts": _huge_parts,
    "non-dict message": _set(("a1", "messages"), ["yo"]),
    "message without role": _set(("a1", "messages"), [{"content": "yo"}]),
    "message content a number": _set(("a1", "messages"), [{"role": "assistant", "content": 5}]),
    "messages not a list": _set(("a1", "messages"), "yo"),
    "children not ids": _set(("a1", "children"), [1]),
    "shows a child it lacks": _set(("u1", "active"), "u2"),
    "reply under the root": _set(("u1", "role"), "assistant"),
    "unknown role": _set(("u1", "role"), "system"),
    "node id not text": _set(("u1", "id"), 5),
    "node id too long": _set(("a2", "id"), "z" * 65),
    "error not text": _set(("a2", "error"), ["boom"]),
    "generation not a dict": _set(("a2", "generation"), [1]),
    "node time not a number": _set(("a2", "created"), "yesterday"),
    "node time too large for a float": _set(("a2", "created"), 10 ** 400),
    "node time not finite": _set(("a2", "created"), float("nan")),
    "id missing": lambda d: d.pop("id"),
    "id too long": _set((None, "id"), "c" * 65),
    "title not text": _set((None, "title"), 5),
    "negative time": _set((None, "updated"), -1),
    "time too large for a float": _set((None, "created"), 10 ** 400),
    "time infinite": _set((None, "updated"), float("inf")),
    "time a boolean": _set((None, "created"), True),
    "removed not a list": _set((None, "removed"), "u1"),
    "removed names the root": _set((None, "removed"), ["root"]),
    "removed names a node still there": _set((None, "removed"), ["a2"]),
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_from_dict_refuses_malformed_or_hostile_input(change):
    data = valid()
    change(data)
    with pytest.raises(InvalidConversation):
        Conversation.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "conversation", 1, {"format": "chatglm-web.conversation"}])
def test_from_dict_refuses_what_is_not_an_object_of_the_format(data):
    with pytest.raises(InvalidConversation):
        Conversation.from_dict(data)


def test_from_dict_keeps_only_plain_values_of_metadata_and_generation():
    data = valid()
    node(data, "a1")["messages"] = [{"role": "assistant", "content": "step", "options": [{"value": "x"}],
                                     "metadata": {"title": "🛠 calc", "duration": 0.5, "nested": {"a": 1},
                                                  "list": [1, 2], "none": None}}]
    node(data, "a1")["generation"] = {"seed": 3, "mode": "Tools", "tools": ["calc"], "nested": {"a": 1}}
    back = Conversation.from_dict(data)
    assert back.nodes["a1"].messages == [{"role": "assistant", "content": "step",
                                          "metadata": {"title": "🛠 calc", "duration": 0.5}}]
    assert back.nodes["a1"].generation == {"seed": 3, "mode": "Tools"}
    assert Conversation.from_dict(back.to_dict()).to_dict() == back.to_dict()


OPERATIONS = st.lists(st.tuples(st.sampled_from(["send", "regenerate", "edit", "show", "remove", "rename"]),
                                st.integers(0, 1000), st.integers(-2, 2), st.text(max_size=20)), max_size=30)


def apply_operations(tree: Conversation, operations) -> None:
    for operation, pick, step, words in operations:
        last = tree.last()
        others = [n for n in tree.nodes if n != ROOT]
        if operation == "send" and last.role != "user":
            user = tree.add_user(last.id, words)
            reply = tree.add_reply(user.id, {"seed": pick})
            tree.set_reply(reply.id, [{"role": "assistant", "content": words[::-1]}],
                           tree_module.ENDS[pick % len(tree_module.ENDS)], "boom" if pick % 5 == 3 else "")
        elif operation == "regenerate" and last.role == "assistant":
            reply_to(tree, last.parent, words + "!")
        elif operation == "edit" and last.role == "assistant":
            tree.add_user(tree.nodes[last.parent].parent, words)
        elif operation == "show" and others:
            tree.show_version(others[pick % len(others)], step)
        elif operation == "remove" and others:
            tree.remove(others[pick % len(others)])
        elif operation == "rename":
            tree.rename(words)


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
def test_any_edits_round_trip_through_json_with_the_same_shown_messages(operations):
    tree = Conversation()
    apply_operations(tree, operations)
    back = reread(tree)
    assert back.to_dict() == tree.to_dict()
    assert back.messages() == tree.messages()
    assert [n.id for n in back.path()] == [n.id for n in tree.path()]
    for node_id in tree.nodes:
        if node_id != ROOT:
            number, count = back.versions(node_id)
            assert 1 <= number <= count


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
NODE_KEYS = st.sampled_from(["id", "parent", "role", "messages", "children", "active", "end", "error", "generation",
                             "created"])
TOP_KEYS = st.sampled_from(["format", "version", "id", "title", "titled_by_user", "created", "updated", "nodes",
                            "removed"])
CHANGES = st.lists(st.one_of(
    st.tuples(st.just("node"), st.integers(0, 4), NODE_KEYS, JSON | st.sampled_from(["root", "u1", "a1", "u2", "a2"])),
    st.tuples(st.just("top"), st.just(0), TOP_KEYS, JSON),
    st.tuples(st.just("message"), st.integers(0, 4), st.sampled_from(["role", "content", "metadata"]), JSON),
    st.tuples(st.just("drop"), st.integers(0, 4), NODE_KEYS, st.none()),
), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CHANGES)
def test_damaged_conversation_json_is_refused_with_invalid_conversation_or_read_consistently(changes):
    data = valid()
    nodes = data["nodes"]   # the nodes as they were (a change may replace the list)
    for kind, index, key, value in changes:
        item = nodes[index]
        if kind == "node":
            item[key] = value
        elif kind == "top":
            data[key] = value
        elif kind == "message" and isinstance(item.get("messages"), list) and item["messages"] \
                and isinstance(item["messages"][0], dict):
            item["messages"][0][key] = value
        elif kind == "drop":
            item.pop(key, None)
    text = json.dumps(data)
    try:
        tree = Conversation.from_dict(json.loads(text))
    except InvalidConversation:
        return
    # what was accepted is a usable conversation that can be stored and read again
    tree.messages()
    for node_id in tree.nodes:
        tree.versions(node_id)
    assert reread(tree).to_dict() == tree.to_dict()


# -- merging two tabs' copies --------------------------------------------------------------------------------------
def test_merge_keeps_the_versions_both_tabs_added():
    base = Conversation()
    user, first = exchange(base, ROOT, "hi", "Hello!")
    left, right = reread(base), reread(base)
    regenerated = reply_to(left, user.id, "Hi there!")               # one tab regenerates
    question, answer = exchange(right, first.id, "and you?", "Fine.")  # the other goes on

    merged = reread(left)
    merged.merge(right)
    assert set(merged.nodes) == set(left.nodes) | set(right.nodes)
    assert merged.nodes[answer.id].messages == [{"role": "assistant", "content": "Fine."}]
    assert merged.versions(regenerated.id) == (2, 2)
    assert texts(merged) == ["hi", "Hi there!"]                       # this tab's choice stays shown
    merged.show_version(regenerated.id, -1)
    assert texts(merged) == ["hi", "Hello!", "and you?", "Fine."]
    assert reread(merged).to_dict() == merged.to_dict()               # a valid tree

    other_way = reread(right)
    other_way.merge(left)
    assert set(other_way.nodes) == set(merged.nodes)

    with pytest.raises(ValueError):
        merged.merge(Conversation())


def test_merge_keeps_the_finished_reply_over_the_interrupted_copy():
    tree = Conversation()
    user = tree.add_user(ROOT, "hi")
    reply = tree.add_reply(user.id)
    tree.set_reply(reply.id, [{"role": "assistant", "content": "Hel"}], "interrupted")
    interrupted = reread(tree)          # saved mid-reply
    tree.set_reply(reply.id, [{"role": "assistant", "content": "Hello there!"}])
    finished = reread(tree)

    stale = reread(interrupted)
    interrupted.merge(finished)
    assert interrupted.nodes[reply.id].end is None
    assert texts(interrupted) == ["hi", "Hello there!"]
    finished.merge(stale)
    assert finished.nodes[reply.id].end is None and texts(finished) == ["hi", "Hello there!"]


def test_merge_does_not_bring_back_what_was_taken_back():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello!")
    question, answer = exchange(tree, first.id, "and you?", "Fine.")
    stored = reread(tree)               # saved before the Undo
    other_tab = reread(tree)
    reply_to(other_tab, question.id, "Great!")   # another tab regenerates the reply that is taken back here

    tree.remove(question.id)            # Undo
    tree.merge(stored)
    assert texts(tree) == ["hi", "Hello!"] and question.id not in tree.nodes
    tree.merge(other_tab)
    assert texts(tree) == ["hi", "Hello!"] and question.id not in tree.nodes
    assert reread(tree).to_dict() == tree.to_dict()   # nothing left hanging from a node taken back

    other_tab.merge(reread(tree))       # and the other tab, merging what this one stored, takes it back too
    assert question.id not in other_tab.nodes and texts(other_tab) == ["hi", "Hello!"]
    assert reread(other_tab).to_dict() == other_tab.to_dict()


# -- migrating linear histories ---------------------------------------------------------------------------------------
def test_from_history_markers_become_how_replies_ended():
    history = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "calc(1)", "metadata": {"title": "🛠 calculator"}},
        {"role": "assistant", "content": "It is 1."},
        marker("stopped", "en"),
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "cut"},
        marker("length", "zh-CN"),
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "part"},
        marker("failed", "en", error="the GPU ran out of memory"),
        {"role": "user", "content": "four"},
        {"role": "assistant", "content": "half"},
        marker("interrupted", "zh-CN"),
        {"role": "user", "content": "five"},
        marker("failed", "zh-CN", error="超时"),
        {"role": "user", "content": "six"},
        {"role": "assistant", "content": "done"},
    ]
    tree = from_history(history, ending_of=ending_of)
    path = tree.path()
    assert [n.role for n in path] == ["user", "assistant"] * 6
    replies = path[1::2]
    assert [r.end for r in replies] == ["stopped", "length", "failed", "interrupted", "failed", None]
    assert [r.error for r in replies if r.end == "failed"] == ["the GPU ran out of memory", "超时"]
    assert [m["content"] for m in replies[0].messages] == ["calc(1)", "It is 1."]   # one reply
    assert texts(tree) == ["one", "calc(1)", "It is 1.", "two", "cut", "three", "part", "four", "half", "five",
                           "six", "done"]                                    # no markers
    assert tree.title == "one"

    # shown again, each reply has its one marker, in the words it had
    shown, _ = view(tree, "en")
    assert shown.count(marker("failed", "en", error="the GPU ran out of memory")) == 1
    assert [m for m in shown if "Failed" in str(m["content"])] == [marker("failed", "en", "the GPU ran out of memory"),
                                                                   marker("failed", "en", "超时")]
    assert reread(tree).to_dict() == tree.to_dict()


def test_from_history_fills_gaps_and_skips_what_is_not_a_message():
    tree = from_history([{"role": "assistant", "content": "a reply before any message"}, "junk", None,
                         {"role": "system", "content": "x"}, {"role": "user", "content": "a"},
                         {"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}], title="Old chat")
    assert texts(tree) == ["a", "b", "B"]
    assert [n.role for n in tree.path()] == ["user", "assistant", "user", "assistant"]
    assert (tree.title, tree.titled_by_user) == ("Old chat", True)
    assert from_history([]).empty and from_history(None).empty


# -- sealing --------------------------------------------------------------------------------------------------------
def test_sealed_round_trip():
    sealer = Sealer(SECRET, "storage")
    value = {"title": "你好 <b>", "n": [1, 2.5, None, True], "text": "x" * 10_000}
    text = sealer.seal(value)
    assert text.startswith("1.") and re.fullmatch(r"1\.[A-Za-z0-9_-]+", text)
    assert len(text) < 1000                          # compressed
    assert sealer.open(text) == value
    assert Sealer(SECRET, "storage").open(text) == value   # another replica with the same secret
    assert sealer.seal(value) != text                # a fresh nonce each time
    with pytest.raises(ValueError):
        Sealer("", "storage")


def test_sealed_refuses_another_secret_or_purpose():
    text = Sealer(SECRET, "storage").seal({"a": 1})
    with pytest.raises(Unreadable):
        Sealer("another secret", "storage").open(text)
    with pytest.raises(Unreadable):
        Sealer(SECRET, "share").open(text)


def test_sealed_refuses_any_change_of_one_character():
    sealer = Sealer(SECRET, "storage")
    text = sealer.seal({"title": "hi"})
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # every character but the last (whose low bits base64 may leave unused) carries data
    for position in range(2, len(text) - 1):
        replacement = alphabet[(alphabet.index(text[position]) + 1) % len(alphabet)]
        with pytest.raises(Unreadable):
            sealer.open(text[:position] + replacement + text[position + 1:])
    for damaged in (text[:-5], text[:20], "2" + text[1:], text[2:], "1.", "1.!!!!", None, 5, {"a": 1}):
        with pytest.raises(Unreadable):
            sealer.open(damaged)


def test_sealed_max_chars():
    sealer = Sealer(SECRET, "storage")
    text = sealer.seal(secrets.token_hex(200))
    assert sealer.open(text, max_chars=len(text)) is not None
    with pytest.raises(Unreadable, match="limit"):
        sealer.open(text, max_chars=len(text) - 1)


def test_sealed_refuses_what_opens_to_too_much(monkeypatch):
    sealer = Sealer(SECRET, "storage")
    bomb = sealer.seal("a" * 100_000)
    small = sealer.seal("a" * 500)
    monkeypatch.setattr(sealed, "MAX_OPENED_BYTES", 1000)
    assert len(bomb) < 1000                          # a short text ...
    with pytest.raises(Unreadable, match="more than"):
        sealer.open(bomb)                            # ... that would unpack into far more
    assert sealer.open(small) == "a" * 500


# -- the browser-kept list ---------------------------------------------------------------------------------------------
def conversation(title: str, updated: float, reply_chars: int = 0) -> Conversation:
    tree = Conversation()
    exchange(tree, ROOT, title, secrets.token_hex(reply_chars // 2) if reply_chars else "ok")
    tree.updated = updated
    return tree


def test_save_puts_the_conversation_and_returns_the_list():
    store, browser = BrowserStore(SECRET), FakeBrowser()
    older = conversation("older", 100.0)
    browser.apply(store.save(older, browser.current(older.id)).ops)
    tree = conversation("newer", 200.0)
    saved = store.save(tree, browser.current(tree.id))
    browser.apply(saved.ops)
    assert saved.ops["tab"] == tree.id and not saved.dropped and not saved.too_large
    assert [(row.id, row.title) for row in saved.rows] == [(tree.id, "newer"), (older.id, "older")]
    assert store.open(browser.data[tree.id]).to_dict() == tree.to_dict()
    assert [(row.id, row.title) for row in store.rows(browser.metas())] == [(tree.id, "newer"), (older.id, "older")]
    assert saved.rows[0].chars == len(browser.data[tree.id]) + len(browser.meta[tree.id])


def test_save_over_the_count_drops_the_least_recently_updated_others():
    store, browser = BrowserStore(SECRET, max_conversations=3), FakeBrowser()
    trees = [conversation(f"chat {n}", 100.0 * n) for n in (3, 1, 2)]
    for tree in trees:
        browser.apply(store.save(tree, browser.current(tree.id)).ops)
    oldest_saved = conversation("older than all", 1.0)     # the one being saved is never dropped
    saved = store.save(oldest_saved, browser.current(oldest_saved.id))
    browser.apply(saved.ops)
    assert saved.dropped == ["chat 1"]
    assert sorted(browser.data) == sorted([trees[0].id, trees[2].id, oldest_saved.id])
    assert [row.title for row in saved.rows] == ["chat 3", "chat 2", "older than all"]


def test_save_over_the_characters_drops_the_least_recently_updated_others():
    probe_store, probe = BrowserStore(SECRET), FakeBrowser()
    trees = [conversation(f"chat {n}", 100.0 * n, reply_chars=3000) for n in (1, 2, 3, 4)]
    for tree in trees:
        probe.apply(probe_store.save(tree, probe.current(tree.id)).ops)
    sizes = {row.id: row.chars for row in probe_store.rows(probe.metas())}
    limit = sum(sizes.values()) - min(sizes.values()) // 2          # all four do not fit; three do
    store, browser = BrowserStore(SECRET, max_chars=limit), FakeBrowser()
    for tree in trees[:3]:
        saved = store.save(tree, browser.current(tree.id))
        browser.apply(saved.ops)
        assert not saved.dropped
    saved = store.save(trees[3], browser.current(trees[3].id))
    browser.apply(saved.ops)
    assert saved.dropped == ["chat 1"]
    assert trees[0].id not in browser.data and trees[3].id in browser.data
    assert sum(row.chars for row in store.rows(browser.metas())) <= limit

    # the one being saved stays even when it is older than every other one
    old = conversation("ancient", 1.0, reply_chars=3000)
    saved = store.save(old, browser.current(old.id))
    browser.apply(saved.ops)
    assert saved.dropped == ["chat 2"] and old.id in browser.data


def test_a_conversation_over_its_own_limit_is_not_put():
    store, browser = BrowserStore(SECRET, max_conversation_chars=2000), FakeBrowser()
    small = conversation("small", 1.0)
    browser.apply(store.save(small, browser.current(small.id)).ops)
    big = conversation("big", 2.0, reply_chars=5000)
    saved = store.save(big, browser.current(big.id))
    browser.apply(saved.ops)
    assert saved.too_large and saved.ops["put"] == [] and saved.ops["remove"] == []
    assert big.id not in browser.data and small.id in browser.data
    assert [row.title for row in saved.rows] == ["small"]


def test_save_merges_with_what_another_tab_stored():
    store, browser = BrowserStore(SECRET), FakeBrowser()
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello!")
    browser.apply(store.save(tree, browser.current(tree.id)).ops)
    tab_one, tab_two = store.open(browser.data[tree.id]), store.open(browser.data[tree.id])

    regenerated = reply_to(tab_two, user.id, "Hi there!")
    browser.apply(store.save(tab_two, browser.current(tree.id)).ops)
    question, answer = exchange(tab_one, first.id, "and you?", "Fine.")   # the first tab knows nothing of it
    browser.apply(store.save(tab_one, browser.current(tree.id)).ops)

    kept = store.open(browser.data[tree.id])
    assert {regenerated.id, question.id, answer.id} <= set(kept.nodes)
    assert kept.versions(regenerated.id) == (2, 2)
    assert texts(kept) == ["hi", "Hello!", "and you?", "Fine."]          # what the saving tab shows


def test_rows_leave_out_unreadable_and_forged_entries():
    store, browser = BrowserStore(SECRET), FakeBrowser()
    tree, other = conversation("mine", 2.0), conversation("other", 1.0)
    for t in (tree, other):
        browser.apply(store.save(t, browser.current(t.id)).ops)
    good = browser.metas()
    foreign = BrowserStore("another secret").seal(conversation("foreign", 3.0))[1]
    entries = good + [
        ["forged", browser.meta[tree.id], 10],            # a meta copied under another id
        ["x", foreign, 10],                                # sealed with another secret
        [tree.id, browser.data[tree.id], 10],              # a tree where a meta belongs (another purpose)
        ["y", "1.garbage", 10], ["z", None, 10], "junk", [1, "a", 2], ["short"],
    ]
    rows = store.rows(entries)
    assert [(row.id, row.title) for row in rows] == [(tree.id, "mine"), (other.id, "other")]
    assert store.rows([[tree.id, browser.meta[tree.id], -5]])[0].chars == 0
    assert store.rows(None) == [] and store.rows("junk") == []


def test_export_and_import_round_trip():
    store, browser = BrowserStore(SECRET), FakeBrowser()
    first, second = sample(), conversation("second", 1.0)
    first.updated = 5.0
    for t in (first, second):
        browser.apply(store.save(t, browser.current(t.id)).ops)
    entries = browser.all() + [["broken", "1.garbage"], "junk"]
    exported = json.loads(json.dumps(store.export(entries)))
    imported = read_import(exported)
    assert [c.to_dict() for c in imported] == [first.to_dict(), second.to_dict()]   # newest first

    # into an empty browser they are stored as they were
    fresh_store, fresh = BrowserStore(SECRET), FakeBrowser()
    saved = fresh_store.put_many(imported, fresh.metas())
    fresh.apply(saved.ops)
    assert sorted(fresh.data) == sorted([first.id, second.id])
    assert fresh_store.open(fresh.data[first.id]).messages() == first.messages()


def test_read_import_accepts_one_conversation_and_an_old_download():
    tree = sample()
    assert [c.to_dict() for c in read_import(json.loads(json.dumps(tree.to_dict())))] == [tree.to_dict()]

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
               marker("stopped", "en"), {"role": "user", "content": "again"}, {"role": "assistant", "content": "Yes"}]
    [old] = read_import(json.loads(to_json(history)), ending_of)
    assert texts(old) == ["hi", "Hello!", "again", "Yes"]
    assert old.path()[1].end == "stopped"
    assert Conversation.from_dict(old.to_dict()).to_dict() == old.to_dict()


@pytest.mark.parametrize("data", [
    "hello", None, [], {}, {"messages": []}, {"messages": "hi"},
    {"messages": [{"role": "assistant", "content": "no question"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},   # would not open again
    {"format": "chatglm-web.conversations", "version": 1},
    {"format": "chatglm-web.conversations", "version": 1, "conversations": [{"format": "x"}]},
    {"format": "chatglm-web.conversations", "version": 1, "conversations": [{}] * 101},
    {"format": "chatglm-web.conversation", "version": 1, "nodes": []},
])
def test_read_import_refuses_garbage(data):
    with pytest.raises(InvalidConversation):
        read_import(data)


def test_put_many_gives_a_new_id_to_a_conversation_already_stored():
    store, browser = BrowserStore(SECRET), FakeBrowser()
    tree = sample()
    browser.apply(store.save(tree, browser.current(tree.id)).ops)
    original = browser.data[tree.id]

    again = read_import(store.export(browser.all())) + read_import(store.export(browser.all()))
    saved = store.put_many(again, browser.metas())
    browser.apply(saved.ops)
    assert len(browser.data) == 3 and browser.data[tree.id] == original       # the stored one untouched
    copies = [store.open(browser.data[i]) for i in browser.data if i != tree.id]
    assert all(c.messages() == tree.messages() for c in copies)
    assert not saved.dropped and len(saved.rows) == 3


# -- share links ------------------------------------------------------------------------------------------------------
def test_share_token_carries_the_shown_branch_and_how_it_was_generated():
    tree = sample()
    hidden = [n for n in tree.nodes.values() if n.messages and n.messages[0]["content"] in ("Hello!", "Fine.")]
    assert len(hidden) == 2
    links = ShareLinks(SECRET)
    token = links.token(tree, model="THUDM/chatglm3-6b", precision="bf16")
    assert re.fullmatch(r"1\.[A-Za-z0-9_-]+", token)      # fits in a URL fragment as it is

    shared, about = ShareLinks(SECRET).open(token)
    assert shared.messages() == tree.messages()
    assert all(len(n.children) <= 1 for n in shared.nodes.values())
    assert shared.size() == len(tree.path())
    assert "Hello!" not in json.dumps(shared.to_dict()) and "Fine." not in json.dumps(shared.to_dict())
    assert about == {"model": "THUDM/chatglm3-6b", "precision": "bf16",
                     "generation": {"temperature": 0.2, "seed": 11, "mode": "Tools"}}
    assert shared.id == tree.id and shared.title == tree.title


def test_share_token_too_long_says_the_limit():
    tree = conversation("long", 1.0, reply_chars=60_000)
    with pytest.raises(TooLong, match="32,000") as raised:
        ShareLinks(SECRET).token(tree, model="m", precision="bf16")
    assert raised.value.limit == 32_000 and raised.value.chars > 32_000
    with pytest.raises(TooLong, match="500"):
        ShareLinks(SECRET, max_chars=500).token(conversation("a", 1.0, reply_chars=2000), model="m", precision="p")


def test_share_token_from_another_secret_or_purpose_is_refused():
    tree = sample()
    token = ShareLinks("another secret").token(tree, model="m", precision="p")
    with pytest.raises(Unreadable):
        ShareLinks(SECRET).open(token)
    stored_tree, stored_meta = BrowserStore(SECRET).seal(tree)     # what the browser keeps is no share link
    for text in (stored_tree, stored_meta, token[:-10], "", None):
        with pytest.raises(ValueError):
            ShareLinks(SECRET).open(text)
    with pytest.raises(ValueError):
        ShareLinks(SECRET).open(Sealer(SECRET, "share").seal({"format": "chatglm-web.share", "version": 2}))


def test_replay_inputs_give_history_last_message_and_last_reply():
    tree = sample()
    history, message, reply = replay_inputs(tree)
    assert [m["content"] for m in history] == ["hi", "Hi there!"]
    assert message == "and you?"
    assert reply is tree.last() and reply.generation["seed"] == 11

    unanswered = Conversation()
    unanswered.add_user(ROOT, "hi")
    with pytest.raises(InvalidConversation):
        replay_inputs(unanswered)


def test_replay_diff_marks_the_changed_words():
    assert replay_diff("a < b & c", "a < b & c") == (True, "a &lt; b &amp; c")
    same, marked = replay_diff("The cat sat on the mat.", "The dog sat on the mat.")
    assert not same and marked == "The <del>cat</del><ins>dog</ins> sat on the mat."
    same, marked = replay_diff("Use <b>bold</b> here", "Use <i>bold</i> here")
    assert "<b>" not in marked and "<i>" not in marked
    assert "<del>b</del><ins>i</ins>" in marked and "&lt;" in marked
    same, marked = replay_diff("我喜欢猫和狗", "我喜欢鱼和狗")
    assert marked == "我喜欢<del>猫</del><ins>鱼</ins>和狗"
    assert replay_diff("", "new") == (False, "<ins>new</ins>")


def _side(marked: str, keep: str, drop: str) -> str:
    marked = re.sub(rf"<{drop}>.*?</{drop}>", "", marked, flags=re.S)
    return html.unescape(marked.replace(f"<{keep}>", "").replace(f"</{keep}>", ""))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab <>&\n猫狗.x", max_size=30), st.text(alphabet="ab <>&\n猫狗.x", max_size=30))
def test_replay_diff_gives_back_both_texts(shared, replayed):
    same, marked = replay_diff(shared, replayed)
    assert same == (shared == replayed)
    assert _side(marked, "ins", "del") == replayed
    assert _side(marked, "del", "ins") == shared


# -- the chat's view of a tree ----------------------------------------------------------------------------------------
def test_view_shows_markers_after_replies_that_ended_early_and_version_links():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "Hello", end="stopped")
    second = reply_to(tree, user.id, "Hi there", end="failed", error="out of memory")
    messages, shown = view(tree, "en")
    assert messages[:3] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hi there"},
                            marker("failed", "en", "out of memory")]
    assert len(messages) == 4 and is_nav(messages[3]) and not any(is_nav(m) for m in messages[:3])
    nav = messages[3]["content"]
    assert "2 / 2" in nav and f"#version:{second.id}:-1" in nav and f"#version:{second.id}:1" not in nav
    assert shown == [user.id, second.id, second.id, second.id]

    tree.show_version(second.id, -1)
    messages, shown = view(tree, "zh-CN")
    assert messages[1:3] == [{"role": "assistant", "content": "Hello"}, marker("stopped", "zh-CN")]
    assert "1 / 2" in messages[3]["content"] and f"#version:{first.id}:1" in messages[3]["content"]
    assert f"#version:{first.id}:-1" not in messages[3]["content"]

    edited = tree.add_user(ROOT, "hey")              # a message with versions gets its links after it
    messages, shown = view(tree, "en")
    assert messages[0] == {"role": "user", "content": "hey"} and is_nav(messages[1])
    assert "2 / 2" in messages[1]["content"] and shown == [edited.id, edited.id]
    assert view(None, "en") == ([], [])


def test_view_of_a_streaming_reply_has_no_marker_until_it_is_kept():
    tree = Conversation()
    user = tree.add_user(ROOT, "hi")
    reply = tree.add_reply(user.id)
    assert view(tree, "en", streaming=reply.id)[0] == [{"role": "user", "content": "hi"}]
    tree.set_reply(reply.id, [{"role": "assistant", "content": "Hel"}], "interrupted")
    assert view(tree, "en", streaming=reply.id)[0][1:] == [{"role": "assistant", "content": "Hel"}]
    assert view(tree, "en")[0][1:] == [{"role": "assistant", "content": "Hel"}, marker("interrupted", "en")]
    tree.set_reply(reply.id, [{"role": "assistant", "content": "Hello"}])
    assert view(tree, "en")[0][1:] == [{"role": "assistant", "content": "Hello"}]   # finished: no marker


def test_navigate_follows_version_links_and_refuses_malformed_requests():
    tree = Conversation()
    user, first = exchange(tree, ROOT, "hi", "one")
    second = reply_to(tree, user.id, "two")
    messages, _ = view(tree, "en")
    link = re.search(r'href="#version:([^"]+)"', messages[-1]["content"]).group(1)
    assert link == f"{second.id}:-1"
    assert navigate(tree, link) and texts(tree) == ["hi", "one"]
    assert not navigate(tree, f"{first.id}:-1") and texts(tree) == ["hi", "one"]   # already the first
    assert navigate(tree, f"{first.id}:1") and texts(tree) == ["hi", "two"]

    before = tree.to_dict()
    for request in [f"{second.id}:2", f"{second.id}:+1", f"{second.id}:0", f"{second.id}", f" {second.id}:-1",
                    f"{second.id}:-1\n", "nobody:1", "root:1", "root:-1", "../x:1", "", None, 5, [second.id, -1]]:
        assert not navigate(tree, request), request
    assert tree.to_dict() == before
    assert not navigate(None, f"{second.id}:-1")


def test_node_at_finds_the_node_of_a_chat_message():
    tree = sample()
    messages, shown = view(tree, "en")
    assert [node_at(tree, shown, i) for i in range(len(messages))] == shown
    for message, node_id in zip(messages, shown):
        found = tree.nodes[node_id]
        if is_nav(message):
            assert tree.versions(node_id)[1] > 1
        else:
            assert message in found.messages or message == marker(found.end, "en", found.error)
    assert [n.id for n in tree.path()] == list(dict.fromkeys(shown))
    assert node_at(tree, shown, len(shown)) is None and node_at(tree, shown, -1) is None
    assert node_at(tree, shown, "0") is None and node_at(None, shown, 0) is None
    tree.remove(tree.path()[2].id)
    assert node_at(tree, shown, len(shown) - 1) is None        # the chat shows what the tree no longer has


def test_the_limits_the_readme_states_are_the_ones_in_force():
    """README "Conversations" names the bounds a visitor meets; they are the defaults the page runs with."""
    from pathlib import Path

    from chatglm_web.conversations import browser_store, share
    from chatglm_web.page.conversation_list import MAX_IMPORT_BYTES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Conversations"):readme.index("## Security model")]
    store = BrowserStore("secret")
    assert f"At most {store.max_conversations} conversations" in section
    assert f"{store.max_chars / 1_000_000:.1f} MB of sealed text per browser" in section
    assert f"one\nconversation at most {store.max_conversation_chars / 1_000_000:.1f} MB" in section
    assert f"would pass {ShareLinks('secret').max_chars:,} characters" in section
    assert (store.max_conversations, store.max_chars) == (browser_store.MAX_CONVERSATIONS,
                                                         browser_store.MAX_STORED_CHARS)
    assert share.MAX_TOKEN_CHARS == 32_000 and MAX_IMPORT_BYTES == 8 * 1024 * 1024


def test_a_conversation_at_the_default_per_conversation_bound_is_refused_and_the_list_is_kept():
    """With the page's own bounds: a conversation whose sealed text passes 1.5 MB is not put (nothing stored is
    dropped for it), while a normal one beside it is stored."""
    store = BrowserStore("secret")
    big = Conversation()
    reply = big.add_reply(big.add_user(ROOT, "dump").id)
    big.set_reply(reply.id, [{"role": "assistant", "content": secrets.token_urlsafe(1_200_000)}])   # hardly compressible
    small = Conversation()
    small.add_user(ROOT, "hello")
    kept = store.save(small, {})
    saved = store.save(big, {"metas": kept.ops["put"] and [[small.id, kept.ops["put"][0][2], 100]]})
    assert saved.too_large and saved.ops["put"] == [] and saved.ops["remove"] == []
    assert [row.id for row in saved.rows] == [small.id]
