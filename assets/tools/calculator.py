"""Safe arithmetic: an expression parsed with ``ast`` and evaluated node by node.

Only numbers, + - * / // % ** (``^`` is read as ``**``), unary signs, parentheses and the
functions and constants listed in ``FUNCTIONS`` / ``CONSTANTS`` are accepted; any other name,
attribute, call, string or statement is refused before anything is computed. Integers are exact
and bounded (``MAX_INT_BITS``): a power, product or factorial whose result would be larger is
refused from its size estimate, before it is computed, so ``9**9**9**9`` answers at once.
"""

from __future__ import annotations

import ast
import math
import operator
import unicodedata

NAME = "calculator"
DESCRIPTION = ("Evaluate an arithmetic expression exactly, e.g. \"(3 + 4) * 2**10 / sqrt(2)\". Numbers, "
               "+ - * / // % ** (power), parentheses, the functions sqrt, exp, log (natural; log(x, base)), "
               "log10, log2, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh, tanh, degrees, radians, abs, "
               "round, floor, ceil, factorial, comb, perm, gcd, lcm, hypot, min, max, and the constants pi, e, "
               "tau. Angles are in radians.")
PARAMETERS = {
    "type": "object",
    "properties": {
        "expression": {"type": "string", "minLength": 1, "maxLength": 500,
                       "description": "the arithmetic expression, in Python syntax"},
    },
    "required": ["expression"],
    "additionalProperties": False,
}

MAX_CHARS = 500
MAX_NODES = 300
MAX_INT_BITS = 3400  # about 1000 decimal digits
MAX_ROUND_DIGITS = 100


class CalculatorError(ValueError):
    """An expression that cannot be evaluated; the message says why."""


def _too_large() -> CalculatorError:
    return CalculatorError(f"the result is too large (the limit is about {int(MAX_INT_BITS * math.log10(2))} digits)")


def _checked(value):
    """``value`` if it is a finite real number within the size bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        raise CalculatorError(f"the result is not a number: {value!r}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _too_large()
    if isinstance(value, float) and not math.isfinite(value):
        raise _too_large() if math.isinf(value) else CalculatorError("the result is not a number (NaN)")
    return value


def _integer(value, function: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise CalculatorError(f"{function}() needs whole numbers, got {value!r}")
    return value


def _bits_of_factorial_ratio(n: int, k: int) -> float:
    """log2(n! / k!) from lgamma, to refuse a huge factorial/comb/perm before computing it."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1)) / math.log(2)


def _factorial(x):
    n = _integer(x, "factorial")
    if n < 0:
        raise CalculatorError("factorial() is not defined for negative numbers")
    if _bits_of_factorial_ratio(n, 0) > MAX_INT_BITS:
        raise _too_large()
    return math.factorial(n)


def _comb(n, k):
    n, k = _integer(n, "comb"), _integer(k, "comb")
    if n < 0 or k < 0:
        raise CalculatorError("comb() needs non-negative numbers")
    if k <= n and _bits_of_factorial_ratio(n, max(k, n - k)) > MAX_INT_BITS:
        raise _too_large()
    return math.comb(n, k)


def _perm(n, k=None):
    n = _integer(n, "perm")
    k = n if k is None else _integer(k, "perm")
    if n < 0 or k < 0:
        raise CalculatorError("perm() needs non-negative numbers")
    if k <= n and _bits_of_factorial_ratio(n, n - k) > MAX_INT_BITS:
        raise _too_large()
    return math.perm(n, k)


def _round(x, digits=None):
    if digits is None:
        return round(x)
    digits = _integer(digits, "round")
    if abs(digits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round() takes at most {MAX_ROUND_DIGITS} digits")
    return round(x, digits)


def _log(x, base=None):
    return math.log(x) if base is None else math.log(x, base)


def _gcd(*values):
    return math.gcd(*(_integer(v, "gcd") for v in values))


def _lcm(*values):
    values = [_integer(v, "lcm") for v in values]
    if sum(v.bit_length() for v in values) > MAX_INT_BITS:
        raise _too_large()
    return math.lcm(*values)


# name -> (function, least and most arguments; None = any number)
FUNCTIONS = {
    "sqrt": (math.sqrt, 1, 1), "exp": (math.exp, 1, 1), "log": (_log, 1, 2), "ln": (math.log, 1, 1),
    "log10": (math.log10, 1, 1), "log2": (math.log2, 1, 1),
    "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1), "acos": (math.acos, 1, 1), "atan": (math.atan, 1, 1), "atan2": (math.atan2, 2, 2),
    "sinh": (math.sinh, 1, 1), "cosh": (math.cosh, 1, 1), "tanh": (math.tanh, 1, 1),
    "degrees": (math.degrees, 1, 1), "radians": (math.radians, 1, 1),
    "abs": (abs, 1, 1), "round": (_round, 1, 2), "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1),
    "factorial": (_factorial, 1, 1), "comb": (_comb, 2, 2), "perm": (_perm, 1, 2),
    "gcd": (_gcd, 1, None), "lcm": (_lcm, 1, None), "hypot": (math.hypot, 1, None),
    "min": (min, 1, None), "max": (max, 1, None),
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent > MAX_INT_BITS or exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise _too_large()
    return base ** exponent


def _multiply(a, b):
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise _too_large()
    return a * b


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _multiply, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
SYMBOLS = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
           ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}


def normalize(expression: str) -> str:
    """Full-width digits and operators (NFKC), × ÷ − and ^ written the Python way."""
    text = unicodedata.normalize("NFKC", expression)
    return text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")


def parse(expression: str) -> ast.Expression:
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(normalize(expression).strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not a valid expression: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalculatorError("the expression is too deeply nested or too large") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"the expression has more than {MAX_NODES} parts")
    return tree


def evaluate(node: ast.AST):
    """The value of a parsed expression node; CalculatorError for anything not whitelisted."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.BinOp):
        operation = BINARY.get(type(node.op))
        if operation is None:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            symbol = SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise CalculatorError(f"the operator {symbol} is not allowed{hint}")
        left, right = evaluate(node.left), evaluate(node.right)
        return _checked(_apply(operation, left, right))
    if isinstance(node, ast.UnaryOp):
        operation = UNARY.get(type(node.op))
        if operation is None:
            raise CalculatorError(f"the operator {SYMBOLS.get(type(node.op), type(node.op).__name__)} is not allowed")
        return _checked(operation(evaluate(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        hint = " (a function: call it with parentheses)" if node.id in FUNCTIONS else ""
        raise CalculatorError(f"unknown name {node.id!r}{hint}; constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _checked(_call(node))
    if isinstance(node, ast.Attribute):
        raise CalculatorError("attribute access (.) is not allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _call(node: ast.Call):
    if isinstance(node.func, ast.Attribute):
        raise CalculatorError("attribute access (.) is not allowed")
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise CalculatorError(f"unknown function {name!r}; functions: {', '.join(FUNCTIONS)}")
    name = node.func.id
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise CalculatorError(f"{name}() takes plain arguments only")
    function, least, most = FUNCTIONS[name]
    if len(node.args) < least or (most is not None and len(node.args) > most):
        expected = str(least) if least == most else f"{least} to {most}" if most else f"at least {least}"
        raise CalculatorError(f"{name}() takes {expected} argument{'s' if most != 1 else ''}, got {len(node.args)}")
    arguments = [evaluate(a) for a in node.args]
    try:
        return _apply(function, *arguments)
    except CalculatorError:
        raise
    except ValueError as e:
        raise CalculatorError(f"{name}() is not defined there: {e}") from None


def _apply(function, *arguments):
    try:
        return function(*arguments)
    except ZeroDivisionError:
        raise ZeroDivisionError("division by zero") from None
    except OverflowError:
        raise _too_large() from None
    except TypeError as e:
        raise CalculatorError(str(e)) from None


def calculate(expression: str) -> int | float:
    return evaluate(parse(expression))


def run(expression: str) -> dict:
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    return {"expression": expression, "result": calculate(expression)}
