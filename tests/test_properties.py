"""Properties checked on generated inputs (hypothesis), where a few hand-picked examples prove little:

* a ChatGLM3 reply (a metadata line, a tool call or free text) shows the same text whether it is parsed whole
  (``parse_reply``) or streamed through ``ReplyTextFilter`` cut at any points, with tools or without; neither
  raises on arbitrary text (with tools, only ``ToolCallError`` for a call that cannot be read);
* a tool call written as the model writes it (``api.tool_calls.call_message``, ``render_arguments``) reads back
  (``parse_reply``) as the same tool name and arguments;
* the calculator tool gives Python's value of an arithmetic expression, or a clear error for a division by zero
  or a result over its size limit, and never anything else for arbitrary text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import operator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatglm_web.api.tool_calls import call_message
from chatglm_web.tools.registry import default_tools_folder

try:  # the family's reply parser, from the package when it exports it there
    from chatglm_web.families.chatglm3 import MAX_METADATA_CHARS, ReplyTextFilter, ToolCallError, parse_reply
except ImportError:
    from chatglm_web.families.chatglm3.reply import MAX_METADATA_CHARS, ReplyTextFilter, ToolCallError, parse_reply
try:
    from chatglm_web.families.chatglm3 import render_arguments
except ImportError:
    from chatglm_web.families.chatglm3.tool_calls import render_arguments

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any text: every unicode category (lone surrogates included), whitespace and newlines often
ANY_TEXT = st.text(st.characters(exclude_categories=()) | st.sampled_from(" \n\t\r\u3000`"), max_size=80)
# what a model writes as a tool's name: a short line (the metadata line is at most MAX_METADATA_CHARS long)
TOOL_NAMES = st.text(st.characters(exclude_categories=()).filter(lambda c: c != "\n"), min_size=1,
                     max_size=MAX_METADATA_CHARS).filter(lambda name: name.strip() == name and name)
JSON_TEXT = st.text(st.characters(exclude_categories=()), max_size=10)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT | st.integers(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(JSON_TEXT, children, max_size=3),
    max_leaves=8)
ARGUMENTS = st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=4)


# -- the reply parser, whole and streamed -----------------------------------------------------------------------

@st.composite
def replies(draw) -> str:
    """A reply as ChatGLM3 may write it: a metadata line (empty, a tool name, whitespace, or a line too long to be
    one) or none, then a tool call, free text, or both."""
    metadata = draw(st.one_of(st.just(""), TOOL_NAMES, st.sampled_from([" ", "\t", "interpreter"]),
                              st.text(min_size=MAX_METADATA_CHARS + 1, max_size=MAX_METADATA_CHARS + 5)))
    newline = draw(st.sampled_from(["\n", "\n", ""]))   # without one, the line is content
    call = f"```python\ntool_call({render_arguments(draw(ARGUMENTS))})\n```"
    body = draw(st.one_of(st.just(call), ANY_TEXT, st.tuples(ANY_TEXT, st.just(call)).map("".join)))
    return metadata + newline + body


def streamed(text: str, cuts: list[int]) -> tuple[str, str | None]:
    """(the visible text, the metadata line) of ``text`` fed to a ``ReplyTextFilter`` in pieces cut at ``cuts``."""
    stream = ReplyTextFilter()
    bounds = [0, *sorted(cuts), len(text)]
    visible = "".join(stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + stream.finish()
    return visible, stream.metadata


@PROPERTY
@given(st.one_of(replies(), ANY_TEXT), st.data())
@example("get_weather\n```python\ntool_call(city='Paris')\n```", None)
@example("x" * (MAX_METADATA_CHARS + 1) + "\nlong first line", None)
@example("  \n  hello  \n", None)
def test_a_reply_streamed_in_any_pieces_shows_what_parsing_it_whole_shows(text, data):
    cuts = [] if data is None else data.draw(st.lists(st.integers(0, len(text)), max_size=8), label="cuts")
    visible, metadata = streamed(text, cuts)
    whole = parse_reply(text, tools_available=False)   # never raises
    assert visible == whole.content
    assert metadata == whole.metadata
    assert streamed(text, [])[0] == visible == streamed(text, list(range(len(text) + 1)))[0]

    # with tools: a call is read (its text, shown while it streams, is the content stripped), or refused
    # with a ToolCallError that keeps the message as written; nothing else is raised
    try:
        parsed = parse_reply(text, tools_available=True)
    except ToolCallError as error:
        assert error.metadata == whole.metadata and error.metadata.strip()
        assert error.content.strip() == visible
        return
    assert parsed.metadata == whole.metadata
    if parsed.tool_call is None:
        assert parsed.content == visible and not parsed.metadata.strip()
    else:
        assert parsed.tool_call.name == parsed.metadata.strip() and parsed.content.strip() == visible


# -- tool calls: written as the model writes them, read back ----------------------------------------------------

@PROPERTY
@given(TOOL_NAMES, ARGUMENTS)
@example("get_weather", {"city": "Paris", "x=1, y": 2, "class": None})
@example("变量 tool", {"": [], "a b": {"c": 1.5}})
def test_a_tool_call_written_as_the_model_writes_it_reads_back_equal(name, arguments):
    received = json.loads(json.dumps(arguments))   # as the API receives it
    message = call_message({"id": "c", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}})
    parsed = parse_reply(f"{message['metadata']}\n{message['content']}", tools_available=True)
    assert parsed.tool_call is not None, message
    assert parsed.tool_call.name == name
    assert parsed.tool_call.arguments == received
    # the same arguments through render_arguments alone
    again = parse_reply(f"{name}\n```python\ntool_call({render_arguments(received)})\n```", tools_available=True)
    assert again.tool_call.arguments == received


# -- the calculator tool ----------------------------------------------------------------------------------------

def load_calculator():
    spec = importlib.util.spec_from_file_location("calculator_tool", default_tools_folder() / "calculator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


calculator = load_calculator()

TOO_LARGE = "too large"
MAX_BITS = calculator.MAX_INT_BITS
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
             "//": operator.floordiv, "%": operator.mod}
NUMBERS = st.one_of(st.integers(-10**6, 10**6), st.integers(-10**30, 10**30),
                    st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, -1, 0.0]))


def leaf(value):
    return (repr(value), value)


@st.composite
def expressions(draw, depth: int = 0):
    """(the expression as text, fully parenthesized; its tree: a number, or (op, left, right), or ("neg", x))."""
    if depth >= 4 or draw(st.integers(0, 2)) == 0:
        value = draw(NUMBERS)
        return f"({value!r})", value
    kind = draw(st.sampled_from([*OPERATORS, "**", "neg"]))
    left_text, left = draw(expressions(depth + 1))
    if kind == "neg":
        return f"(-{left_text})", ("neg", left)
    if kind == "**":   # a whole exponent, as people write them: small, sometimes negative
        exponent = draw(st.integers(-3, 40))
        return f"({left_text} ** ({exponent}))", ("**", left, exponent)
    right_text, right = draw(expressions(depth + 1))
    return f"({left_text} {kind} {right_text})", (kind, left, right)


class Refused(Exception):
    pass


def python_value(tree):
    """The tree's value as Python computes it, checked node by node against the calculator's documented limits:
    ``ZeroDivisionError`` as Python raises it, ``Refused(TOO_LARGE)`` for an integer over ``MAX_INT_BITS`` bits
    or a float that overflows."""
    if not isinstance(tree, tuple):
        return tree
    if tree[0] == "neg":
        return operator.neg(python_value(tree[1]))
    kind, left, right = tree
    a = python_value(left)
    b = right if kind == "**" else python_value(right)
    if kind == "**" and isinstance(a, int) and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > 2 * MAX_BITS:
        raise Refused(TOO_LARGE)   # far over the limit: not computed here either
    try:
        value = (operator.pow if kind == "**" else OPERATORS[kind])(a, b)
    except OverflowError:
        raise Refused(TOO_LARGE) from None
    if isinstance(value, int) and value.bit_length() > calculator.MAX_INT_BITS:
        raise Refused(TOO_LARGE)
    if isinstance(value, float) and math.isinf(value):
        raise Refused(TOO_LARGE)
    return value


@PROPERTY
@given(expressions())
@example(("((7) / (0))", ("/", 7, 0)))
@example(("((2) ** (40))", ("**", 2, 40)))
@example(("((((10) ** (40)) ** (40)) ** (40))", ("**", ("**", ("**", 10, 40), 40), 40)))
def test_the_calculator_gives_pythons_value_or_a_clear_error(expression):
    text, tree = expression
    try:
        expected = python_value(tree)
    except ZeroDivisionError:
        with pytest.raises(ZeroDivisionError, match="division by zero"):
            calculator.run(text)
        return
    except Refused:
        with pytest.raises(calculator.CalculatorError, match=TOO_LARGE):
            calculator.run(text)
        return
    answer = calculator.run(text)
    assert answer == {"expression": text, "result": expected}
    assert type(answer["result"]) is type(expected)


@PROPERTY
@given(st.one_of(ANY_TEXT, st.lists(st.sampled_from(
    ["1", "9", "0", "0.5", "1e308", "-", "+", "*", "**", "/", "//", "%", "^", "(", ")", ",", " ", "pi", "e",
     "factorial(", "comb(", "perm(", "round(", "log(", "sqrt(", "exp(", "gcd(", "lcm(", "hypot(", "max(", "x",
     "__import__('os')", ".real", "'a'", "[1]", "lambda: 1", "×", "÷", "−", "９"]), max_size=20).map("".join)))
@example("9**9**9**9")
@example("factorial(10**10)")
@example("1" * 600)
def test_the_calculator_answers_any_text_with_a_value_or_a_clear_error(text):
    try:
        answer = calculator.run(text)
    except calculator.CalculatorError as error:
        assert str(error).strip(), "an error without a message"
        return
    except ZeroDivisionError as error:
        assert str(error) == "division by zero"
        return
    result = answer["result"]
    assert type(result) in (int, float) and (isinstance(result, int) or math.isfinite(result))
    assert not isinstance(result, int) or result.bit_length() <= calculator.MAX_INT_BITS
