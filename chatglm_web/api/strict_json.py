"""JSON as the API takes it from clients: RFC 8259 only and not nested deeper than ``MAX_JSON_DEPTH``.

Python's ``json`` also reads ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON (and no tool call or
sampling option can use them); here they are an error. Nesting is limited so that nothing downstream (pydantic,
``json.dumps`` of tool schemas into the prompt, rendering and ``ast``-parsing tool calls) can run out of
recursion: ``json.loads`` itself raises ``RecursionError`` near 1,000 levels, and that is an error here too.
"""

from __future__ import annotations

import json

MAX_JSON_DEPTH = 64  # levels of arrays/objects in one request body or one tool call's arguments
TOO_DEEP = f"it is nested too deeply (more than {MAX_JSON_DEPTH} levels)"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value (NaN and Infinity are not JSON)")


def loads(text: str | bytes):
    """``text`` as a JSON value; ``ValueError`` with a message a client can act on when it is not one we take."""
    value = parse(text)
    check_depth(value)
    return value


def parse(text: str | bytes):
    """``loads()`` without the depth check (for a caller that checks something cheaper first)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"it is not UTF-8 ({error.reason} at byte {error.start})") from None


def check_depth(value) -> None:
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(TOO_DEEP)


def nested_deeper_than(value, limit: int) -> bool:
    """Whether ``value`` has more than ``limit`` levels of lists/dicts (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
