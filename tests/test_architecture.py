"""The layout is the architecture: which folder may import which, no import cycles, and ChatGLM3's
tokens known in one folder only. Read from the source (``ast``), so a lazy import inside a function
counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatglm_web"

#: Each top-level part of the package and the parts it may import (besides itself). The lowest first.
ALLOWED = {
    "generation": set(),
    "messages": set(),
    "process_secrets": set(),
    "settings": {"generation"},
    "spaces_env": {"settings"},
    "browser_secret": {"settings"},
    "branding": set(),
    "documents": {"generation", "messages"},
    "families": {"generation", "messages", "settings", "spaces_env"},
    "engine": {"generation", "messages", "settings", "families", "spaces_env"},
    "conversations": {"generation", "messages"},
    "tools": {"generation", "messages", "settings", "families"},
    "backends": {"generation", "messages", "settings", "families", "engine"},
    "api": {"generation", "messages", "settings", "families", "documents", "tools"},
    "page": {"generation", "messages", "settings", "families", "tools", "conversations", "documents", "branding",
             "browser_secret"},
    "server": {"generation", "messages", "settings", "process_secrets", "spaces_env", "browser_secret", "branding",
               "families", "engine", "backends", "tools", "api", "page", "documents", "conversations"},
}

#: Strings only the ChatGLM3 family may contain.
CHATGLM3_TOKENS = ("<|user|>", "<|assistant|>", "<|observation|>", "<|system|>", "[gMASK]")
FAMILIES = "chatglm_web.families"
CHATGLM3 = "chatglm_web.families.chatglm3"
#: What the ChatGLM3 family may import besides itself: the lowest layers and the families' shared modules
#: (not ``families.loading`` or ``families.registry``, which import the families; nothing above ``families``).
CHATGLM3_MAY_IMPORT = {"chatglm_web.generation", "chatglm_web.messages", "chatglm_web.families.family",
                       "chatglm_web.families.chat_format", "chatglm_web.families.streaming_text"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """``chatglm_web.engine.scheduler`` -> ``engine``."""
    return module.split(".")[1] if module.count(".") else ""


def imports_of(path: Path) -> set[str]:
    """Every ``chatglm_web`` module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use the absolute module name)"
            if node.module and node.module.startswith("chatglm_web"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if (PACKAGE.parent / child.replace(".", "/")).with_suffix(".py").exists()
                              or (PACKAGE.parent / child.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("chatglm_web"))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in SOURCES}


def test_every_part_is_declared():
    parts = {part_of(m) for m in GRAPH} - {""}
    assert parts <= set(ALLOWED), f"parts without import rules: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_follow_the_layers(module):
    part = part_of(module)
    if not part:
        return
    wrong = sorted(i for i in GRAPH[module] if part_of(i) and part_of(i) != part and part_of(i) not in ALLOWED[part])
    assert not wrong, f"{module} ({part}) may not import {wrong}"


def test_no_import_cycles():
    """Between modules, counting a package's ``__init__`` as the package."""
    graph = {m: {i for i in deps if i in GRAPH and i != m} for m, deps in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package's __init__ importing its own modules is not a cycle unless a module imports the package back.
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import cycles: " + "; ".join(" -> ".join(c) for c in real)


def test_only_the_chatglm3_family_knows_its_tokens():
    family = PACKAGE / "families" / "chatglm3"
    leaks = [f"{p.relative_to(PACKAGE)}: {token}" for p in SOURCES if family not in p.parents
             for token in CHATGLM3_TOKENS if token in p.read_text()]
    assert not leaks, f"ChatGLM3's tokens outside families/chatglm3/: {leaks}"


def in_module(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def chatglm3_importers_outside_families(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {i}" for m, deps in graph.items() if not in_module(m, FAMILIES)
                  for i in deps if in_module(i, CHATGLM3))


def chatglm3_imports_above_it(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {i}" for m, deps in graph.items() if in_module(m, CHATGLM3)
                  for i in deps if not in_module(i, CHATGLM3) and i not in CHATGLM3_MAY_IMPORT)


def test_only_the_families_import_the_chatglm3_family():
    """The rest of the app asks a family through ``families.family``'s interfaces and ``families.registry``;
    outside ``families/`` no module imports ``chatglm_web.families.chatglm3`` or even names it."""
    assert not chatglm3_importers_outside_families(GRAPH), chatglm3_importers_outside_families(GRAPH)
    named = [str(p.relative_to(PACKAGE)) for p in SOURCES if PACKAGE / "families" not in p.parents
             and CHATGLM3 in p.read_text()]
    assert not named, f"modules outside families/ that name {CHATGLM3}: {named}"


def test_the_chatglm3_family_imports_nothing_above_it():
    """Not ``families.loading`` / ``registry`` (which load through it), ``settings``, ``engine``, ..."""
    assert any(in_module(m, CHATGLM3) for m in GRAPH)
    wrong = chatglm3_imports_above_it(GRAPH)
    assert not wrong, f"the ChatGLM3 family imports above itself: {wrong}"


def test_every_folder_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init.relative_to(PACKAGE)}: the docstring should say what it may import"


def test_the_rules_can_fail():
    """The checker sees a forbidden import and a cycle when there is one (so the tests above can fail)."""
    assert "chatglm_web.page" not in ALLOWED["engine"]
    fake = {"chatglm_web.a.x": {"chatglm_web.b.y"}, "chatglm_web.b.y": {"chatglm_web.a.x"}}
    assert part_of("chatglm_web.engine.scheduler") == "engine"
    assert any(True for m, deps in fake.items() for d in deps if m in fake.get(d, ()))
    assert chatglm3_importers_outside_families({"chatglm_web.api.x": {"chatglm_web.families.chatglm3.reply"},
                                                "chatglm_web.families.loading": {"chatglm_web.families.chatglm3"}}) \
        == ["chatglm_web.api.x -> chatglm_web.families.chatglm3.reply"]
    assert chatglm3_imports_above_it({"chatglm_web.families.chatglm3.x": {"chatglm_web.families.loading",
                                                                          "chatglm_web.settings",
                                                                          "chatglm_web.families.chatglm3.y",
                                                                          "chatglm_web.generation"}}) \
        == ["chatglm_web.families.chatglm3.x -> chatglm_web.families.loading",
            "chatglm_web.families.chatglm3.x -> chatglm_web.settings"]


def test_building_the_page_writes_nothing_into_the_package():
    """E.g. Gradio writes a ``.pyi`` stub next to the module of any Component subclass it sees defined."""
    import chatglm_web.page.layout  # noqa: F401
    import chatglm_web.server  # noqa: F401

    assert not sorted(PACKAGE.rglob("*.pyi")), "files written into the package"
