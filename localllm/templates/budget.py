"""What a chat template may spend on one render, and the meter that counts it.

The meter is plain Python reached through a ContextVar, so it works in any thread (serve
renders in worker threads, where signals do not reach) and two renders never share counters.
Sizes count characters of strings and items of containers *through* shared references
(``[s, s]`` costs twice ``s``): that is what printing or serialising the value would cost,
and it is what stops a template doubling a value in a loop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.utils import Namespace

__all__ = [
    "COST_BINOP",
    "COST_CALL",
    "COST_FILTER",
    "COST_ITEM",
    "METER",
    "Meter",
    "OverBudget",
    "RenderBudget",
    "RenderCost",
    "binop_estimate",
    "filter_estimate",
    "str_method_estimate",
]

# Operation costs in template nodes: measured so one operation is about 150 ns of CPU on a
# 2-core EPYC whatever its kind (a node in a loop body ~40 ns, a sandboxed method call ~7 us),
# which makes max_operations a bound on time. tests/test_template_guard.py times each kind.
COST_BINOP = 10
COST_FILTER = 20
COST_ITEM = 16  # one item pulled through a lazy filter (map, select, ...)
COST_CALL = 50

# Python refuses to print ints longer than this (sys.int_info.default_max_str_digits).
MAX_INT_DIGITS = 4300
# Deeper values than this are refused: real chat data nests a handful of levels.
MAX_NESTING = 100
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


@dataclass(frozen=True)
class RenderBudget:
    """What one render may spend. Most limits grow with the conversation (see ``Meter``).

    The defaults are far above what real templates use (llama.cpp's 70 reference templates,
    a 401-message conversation: at most 81k loop iterations, 3M operations, depth 8), and far
    below what hangs: a template over any limit is refused with a one-line TemplateError.
    """

    max_source_chars: int = 256 * 1024  # template text; bounds compile time
    max_loop_iterations: int = 100_000  # for-loop items, recursion and lazy filters included
    max_operations: int = 4_000_000  # loop items weighted by body size, calls, filters
    max_value_size: int = 1_000_000  # chars+items of any one value a template builds
    max_work: int = 16_000_000  # chars+items of all the values built, summed
    max_recursion_depth: int = 32  # nested macro, block and recursive-loop calls
    max_output_chars: int = 4_000_000  # the rendered prompt
    # A backstop behind the limits above, scaled with the conversation as max_operations
    # is: enforced by a timer signal, so only in the main thread (the CLI; deadline.py).
    max_wall_seconds: float | None = 10.0


@dataclass(frozen=True)
class RenderCost:
    """What one render spent, on the counters the budget limits."""

    text: str
    loop_iterations: int
    operations: int
    work: int
    max_depth: int
    output_chars: int


class OverBudget(Exception):
    """A render stopped by its budget (not a Lookup/Type error, so Jinja never swallows it)."""


class Meter:
    """The counters of one render, with caps scaled to the conversation it renders.

    Templates legitimately loop over the history inside a loop over the history (gemma-4's
    template: n²/2 iterations) and grow a string message by message (Reka's), so loops and
    operations may grow with n² and work with n times the input; the template cannot
    choose n or the input, the caller can.
    """

    def __init__(self, budget: RenderBudget, input_size: int = 0, n_messages: int = 0):
        allowance = 64 * n_messages + n_messages * n_messages
        self.iteration_cap = budget.max_loop_iterations + allowance
        self.operation_cap = budget.max_operations + 64 * allowance
        self.value_cap = budget.max_value_size + 2 * input_size
        self.work_cap = budget.max_work + (16 + 4 * n_messages) * input_size
        self.output_cap = budget.max_output_chars + 2 * input_size
        self.depth_cap = budget.max_recursion_depth
        wall = budget.max_wall_seconds
        scale = self.operation_cap / max(budget.max_operations, 1)
        self.wall_cap = wall * scale if wall is not None and wall > 0 else None
        self.iterations = self.operations = self.work = self.output = 0
        self.depth = self.max_depth = 0
        self._cache: dict[int, tuple[Any, int, int]] = {}

    def step(self, cost: int) -> None:
        self.operations += max(cost, 0)
        if self.operations > self.operation_cap:
            raise OverBudget(f"more than {self.operation_cap} template operations")

    def iterate(self, cost: int) -> None:
        self.iterations += 1
        if self.iterations > self.iteration_cap:
            raise OverBudget(f"more than {self.iteration_cap} loop iterations")
        self.step(cost)

    def enter(self) -> None:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        if self.depth > self.depth_cap:
            raise OverBudget(f"macro or loop recursion deeper than {self.depth_cap}")

    def charge(self, size: int) -> None:
        """Refuse one value over the value cap; add its size to the work done."""
        if size > self.value_cap:
            raise OverBudget(f"a value of more than {self.value_cap} characters or items")
        self.work += max(size, 0)  # a negative width must not buy back budget
        if self.work > self.work_cap:
            raise OverBudget(f"more than {self.work_cap} characters or items built in total")

    def account(self, value: Any) -> Any:
        """Charge what ``value`` costs and hand it back."""
        self.charge(self.size(value))
        return value

    def emit(self, piece: str) -> None:
        self.output += len(piece)
        if self.output > self.output_cap:
            raise OverBudget(f"a prompt of more than {self.output_cap} characters")

    def size(self, obj: Any) -> int:
        if type(obj) is str:
            return len(obj)
        return self._measure(obj, 0)[0]

    def materialize(self, iterable: Any) -> Any:
        """A list of what a lazy iterable yields, so an operation over it can be sized first."""
        if isinstance(iterable, (str, bytes, list, tuple, dict, range)):
            return iterable
        try:
            return list(iterable)
        except TypeError:
            return iterable  # not iterable: let the operation raise its own error

    def nesting(self, obj: Any) -> int:
        return self._measure(obj, 0)[1]

    def _measure(self, obj: Any, level: int) -> tuple[int, int]:
        """(size, nesting) of ``obj``: chars of strings, items of containers, digits of ints."""
        if isinstance(obj, (str, bytes)):
            return len(obj), 0
        if isinstance(obj, int):
            return obj.bit_length() // 3 + 1, 0
        if isinstance(obj, range):
            return len(obj), 0
        if not isinstance(obj, (list, tuple, dict, Namespace, *_VIEWS)):
            return 1, 0
        hit = self._cache.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1], hit[2]
        if level > MAX_NESTING:
            raise OverBudget(f"a value nested more than {MAX_NESTING} levels deep")
        children, stable = _children(obj)
        total, deep = 1 + len(children), 0
        for child in children:
            if total > self.value_cap:
                break
            size, nested = self._measure(child, level + 1)
            total, deep = total + size, max(deep, nested + 1)
            stable = stable and not isinstance(child, (Namespace, *_VIEWS))
        if total > self.value_cap:
            raise OverBudget(f"a value of more than {self.value_cap} characters or items")
        if stable:
            # A namespace can change after it is measured: only values without one are cached.
            self._cache[id(obj)] = (obj, total, deep)
        return total, deep


def _children(obj: Any) -> tuple[list[Any], bool]:
    """The items of a container, and whether the container itself is immutable here."""
    if isinstance(obj, Namespace):
        attrs = object.__getattribute__(obj, "_Namespace__attrs")
        return [*attrs.keys(), *attrs.values()], False
    if isinstance(obj, _VIEWS):
        return [obj.mapping], False  # type: ignore[union-attr]
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()], True
    return list(obj), True


METER: ContextVar[Meter | None] = ContextVar("localllm_template_meter", default=None)


# -- upper bounds of what an operation would build, checked before it runs


def _format_estimate(meter: Meter, fmt: str, args: Any, style: str) -> int:
    """Upper bound of ``fmt % args`` (style "%") or ``fmt.format(*args)`` (style "{")."""
    values = list(args.values()) if isinstance(args, Mapping) else args
    if not isinstance(values, (list, tuple)):
        values = [values]
    widths = [int(run) for run in re.findall(r"\d+", fmt)]
    nested = "*" in fmt if style == "%" else re.search(r"\{[^{}]*\{", fmt) is not None
    if nested:  # a width taken from the arguments
        widths += [v for v in values if isinstance(v, int)]
    biggest = max((meter.size(v) for v in values), default=0)
    return len(fmt) + (fmt.count(style) + 1) * (biggest + max(widths, default=0))


def binop_estimate(meter: Meter, op: str, left: Any, right: Any) -> int:
    """Upper bound of the size of ``left op right`` for the intercepted operators."""
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(times, int) and isinstance(seq, (str, bytes, list, tuple)):
                return meter.size(seq) * max(times, 0)
    if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        return max(right, 0) * abs(left).bit_length() // 3 + 1
    if op == "%" and isinstance(left, (str, bytes)):
        return _format_estimate(meter, str(left), right, "%")
    if op in ("*", "+"):
        return meter.size(left) + meter.size(right)
    return 1


def str_method_estimate(meter: Meter, text: str | bytes, name: str, args: tuple[Any, ...]) -> int:
    """Upper bound of ``text.name(*args)`` for the str (and bytes) methods that can amplify."""
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        return max(len(text), first)
    if name == "expandtabs":
        tabs = text.count("\t" if isinstance(text, str) else b"\t")
        return len(text) + tabs * (first if isinstance(first, int) else 8)
    if name == "replace" and len(args) >= 2 and isinstance(first, type(text)):
        return len(text) + (text.count(first) + 1) * meter.size(args[1])
    if name == "join" and isinstance(first, (list, tuple)):
        return meter.size(first) + len(text) * len(first)
    if name == "translate" and isinstance(first, Mapping):
        return len(text) * max((meter.size(v) for v in first.values()), default=1)
    if name in ("format", "format_map") and isinstance(text, str):
        return _format_estimate(meter, text, list(args), "{")
    return len(text)


def filter_estimate(meter: Meter, name: str, args: list[Any], kwargs: dict[str, Any]) -> int:
    """Upper bound of the result of the filters that can build more than they are given."""
    value, rest = args[0], args[1:]
    size = meter.size(value)
    if name == "center":
        return max(size, *(a for a in rest if isinstance(a, int)), 0)
    if name == "indent":
        width = kwargs.get("width", rest[0] if rest else 4)
        lines = str(value).count("\n") + 1
        return size + lines * (width if isinstance(width, int) else meter.size(width))
    if name == "replace" and len(args) >= 3:
        text, old, new = (str(a) for a in args[:3])
        return len(text) + (text.count(old) + 1) * len(new)
    if name in ("wordwrap", "urlize"):
        inserted = sum(meter.size(a) for a in [*rest, *kwargs.values()] if isinstance(a, str))
        return size * (1 + inserted)
    if name == "format":
        return _format_estimate(meter, str(value), kwargs or tuple(rest), "%")
    if name == "join":
        separator = kwargs.get("d", rest[0] if rest else "")
        return size + meter.size(separator) * size
    if name in ("tojson", "pprint"):
        indent = kwargs.get("indent", rest[0] if rest else 1)
        width = indent if isinstance(indent, int) else meter.size(indent)
        return size * (2 + max(width, 1) * meter.nesting(value))
    if name == "sum" and not isinstance(kwargs.get("start", 0), (int, float)):
        return size * len(value) if isinstance(value, (list, tuple)) else size
    return 1
