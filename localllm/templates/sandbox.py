"""The one guarded renderer for chat templates: sandboxed, budgeted, one-line errors.

A chat template is untrusted input (a GGUF from anyone's hub repo, a ``--template`` file).
It renders here exactly as llama-cpp-python's ``Jinja2ChatFormatter`` renders it (the same
immutable sandbox, options, extensions, ``tojson`` and variables), while everything that
spends time or memory is metered against a :class:`RenderBudget` (see ``budget.py``).

How the meter sees everything: the parsed template is rewritten before it is compiled so
that every ``for`` iterates through a counting filter and every ``~``, list, tuple and dict
literal goes through a size check; binary operators and calls are intercepted by the sandbox;
every filter is wrapped; ``finalize`` sees every printed value. Behind the meter, renders in
the main thread (the CLI's) also have a wall-time backstop (``deadline.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import update_wrapper
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import BlockReference, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from localllm.errors import TemplateError
from localllm.templates.budget import (
    COST_BINOP,
    COST_CALL,
    COST_FILTER,
    COST_ITEM,
    MAX_INT_DIGITS,
    MAX_NESTING,
    METER,
    Meter,
    OverBudget,
    RenderBudget,
    RenderCost,
    binop_estimate,
    filter_estimate,
    str_method_estimate,
)
from localllm.templates.deadline import wall_time_backstop
from localllm.text import escape_untrusted

__all__ = ["DEFAULT_HINT", "GuardedTemplate"]

DEFAULT_HINT = "pass --template NAME (localllm chat --template list)"

_LAZY_FILTERS = frozenset({"map", "select", "reject", "selectattr", "rejectattr", "unique"})
# Filters whose output can outgrow their input: sized before they run (budget.filter_estimate).
_AMPLIFYING_FILTERS = frozenset(
    {"center", "format", "indent", "join", "pprint", "replace", "sum", "tojson", "urlize"}
    | {"wordwrap"}
)
# Filters that do not walk their input: charging its size on each call would make a
# ``messages|length`` inside the message loop look quadratic.
_CHEAP_FILTERS = frozenset(
    {"abs", "attr", "count", "d", "default", "first", "float", "int", "last", "length"}
    | {"random", "round", "safe"}
)


class _Raised(Exception):
    """``raise_exception(message)`` called by the template itself."""


def _current_meter(budget: RenderBudget) -> Meter:
    """The render's meter; outside a render (compile-time constant folding) a fresh one."""
    meter = METER.get()
    return meter if meter is not None else Meter(budget)


# -- the template's source, instrumented


def _weight(node: nodes.Node) -> int:
    return 1 + sum(1 for _ in node.find_all(nodes.Node))


def _guard_name(kind: str) -> str:
    # A space cannot appear in a filter name a template writes: only this module reaches these.
    return f"localllm guard {kind}"


def _guard(kind: str, value: nodes.Expr, *args: nodes.Expr) -> nodes.Filter:
    """``value|<guard kind>(*args)``: a direct call, never constant-folded."""
    node = nodes.Filter(value, _guard_name(kind), list(args), [], None, None)
    return node.set_lineno(value.lineno or 1)


class _Instrument(NodeTransformer):
    """Route loops and value-building expressions of a parsed template through the meter."""

    def __init__(self) -> None:
        self.weights: dict[str, int] = {}  # macro/block name -> weight of its body
        self.recursive_weight = 1

    def visit_For(self, node: nodes.For) -> nodes.Node:
        weight = _weight(node)
        if node.recursive:
            self.recursive_weight = max(self.recursive_weight, weight)
        self.generic_visit(node)
        node.iter = _guard("iter", node.iter, nodes.Const(weight))
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        self.weights[node.name] = max(self.weights.get(node.name, 0), _weight(node))
        return self.generic_visit(node)

    def visit_Block(self, node: nodes.Block) -> nodes.Node:
        self.weights[node.name] = max(self.weights.get(node.name, 0), _weight(node))
        return self.generic_visit(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        self.weights["caller"] = max(self.weights.get("caller", 0), _weight(node))
        return self.generic_visit(node)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _guard("concat", nodes.Tuple(list(node.nodes), "load"))

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._literal(node, "list", list(node.items))

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":
            return self.generic_visit(node)
        return self._literal(node, "tuple", list(node.items))

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._literal(
            node, "dict", [p for pair in node.items for p in (pair.key, pair.value)]
        )

    def _literal(self, node: nodes.Expr, kind: str, items: list[nodes.Expr]) -> nodes.Node:
        self.generic_visit(node)
        if all(isinstance(item, nodes.Const) for item in items):
            return node  # bounded by the source; keeps Jinja's constant folding
        items = [self.visit(item) for item in items]
        return _guard(kind, nodes.Tuple(items, "load").set_lineno(node.lineno or 1))


# -- the environment


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """HuggingFace's ``{% generation %}`` tag, passed through as llama-cpp-python does."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's declared extension API)

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Transformers' (and llama-cpp-python's) tojson: no HTML escaping, unicode kept.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _context_filter(method: Callable[..., Any]) -> Callable[..., Any]:
    """A bound method as a pass_context filter (the marker cannot be set on a method)."""

    @jinja2.pass_context
    def call(context: Any, *args: Any) -> Any:
        return method(context, *args)

    return call


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """llama-cpp-python's chat-template environment, with every costly operation metered."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, budget: RenderBudget) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self.budget = budget
        self.weights: dict[str, int] = {}
        self.recursive_weight = 1
        # lorem ipsum has no place in a chat prompt, and its arguments size its output.
        self.globals.pop("lipsum", None)
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        for kind in ("iter", "concat", "list", "tuple", "dict"):
            self.filters[_guard_name(kind)] = _context_filter(getattr(self, f"_{kind}"))

    def _finalize(self, value: Any) -> Any:
        return _current_meter(self.budget).account(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        meter = _current_meter(self.budget)
        meter.step(COST_BINOP)
        estimate = binop_estimate(meter, operator, left, right)
        if isinstance(left, int) and isinstance(right, int) and estimate > MAX_INT_DIGITS:
            raise OverBudget(f"a number of more than {MAX_INT_DIGITS} digits")
        meter.charge(estimate)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        meter = _current_meter(self.budget)
        if isinstance(obj, (Macro, BlockReference, LoopContext)):
            return self._call_nested(meter, context, obj, args, kwargs)
        meter.step(COST_CALL)
        target, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
        wrapped = getattr(obj, "__wrapped__", None)  # the sandbox's str.format wrapper
        if isinstance(getattr(wrapped, "__self__", None), str):
            target, name = wrapped.__self__, wrapped.__name__  # type: ignore[union-attr]
        if isinstance(target, (str, bytes)):
            if name == "join" and args:
                args = (meter.materialize(args[0]), *args[1:])
            meter.charge(str_method_estimate(meter, target, name, (*args, *kwargs.values())))
        return meter.account(super().call(context, obj, *args, **kwargs))

    def _call_nested(
        self, meter: Meter, context: Any, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A macro, block or ``loop(...)`` call: one level deeper, charged by its body size."""
        if isinstance(obj, LoopContext):
            # loop(children) in a recursive for: the new level iterates like any loop.
            args = (self._iter(context, args[0], self.recursive_weight), *args[1:]) if args else ()
            meter.step(COST_CALL + self.recursive_weight)
        else:
            default = max(self.weights.values(), default=1)
            meter.step(COST_CALL + self.weights.get(obj.name, default))
        meter.enter()
        try:
            return meter.account(super().call(context, obj, *args, **kwargs))
        finally:
            meter.depth -= 1

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        # Filters marked pass_context/eval_context/environment take that object first.
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

        def guarded(*args: Any, **kwargs: Any) -> Any:
            meter = _current_meter(self.budget)
            meter.step(COST_FILTER)
            value, rest = args[skip], args[skip + 1 :]
            if name in ("join", "sum"):  # sized before they run, so a generator is listed first
                value = meter.materialize(value)
                args = (*args[:skip], value, *rest)
            for extra in (*rest, *kwargs.values()):
                if isinstance(extra, int) and extra > meter.value_cap:
                    raise OverBudget(f"filter {name} given {extra}, over {meter.value_cap}")
            if name not in _CHEAP_FILTERS:
                meter.charge(meter.size(value))
            if name in _AMPLIFYING_FILTERS:
                meter.charge(filter_estimate(meter, name, [value, *rest], kwargs))
            if name in _LAZY_FILTERS and value:
                # Jinja's lazy filters start with ``if value:``; only then is it iterated.
                args = (*args[:skip], self._iter(None, value, COST_ITEM), *rest)
            return meter.account(func(*args, **kwargs))

        return update_wrapper(guarded, func)

    # The guard filters the instrumented template calls (pass_context: never folded).
    def _iter(self, context: Any, iterable: Any, weight: int) -> Any:
        try:
            iterator = iter(iterable)
        except TypeError:
            return iterable  # let Jinja raise its own "not iterable" error
        return self._count(_current_meter(self.budget), iterator, weight)

    @staticmethod
    def _count(meter: Meter, iterator: Iterator[Any], weight: int) -> Iterator[Any]:
        for item in iterator:
            meter.iterate(weight)
            yield item

    def _concat(self, context: Any, parts: tuple[Any, ...]) -> str:
        meter = _current_meter(self.budget)
        meter.step(COST_FILTER)
        meter.charge(sum(meter.size(part) for part in parts))
        return "".join([str(part) for part in parts])  # Jinja's str_join

    def _list(self, context: Any, items: tuple[Any, ...]) -> list[Any]:
        return self._literal(list(items))

    def _tuple(self, context: Any, items: tuple[Any, ...]) -> tuple[Any, ...]:
        return self._literal(items)

    def _dict(self, context: Any, flat: tuple[Any, ...]) -> dict[Any, Any]:
        return self._literal(dict(zip(flat[::2], flat[1::2], strict=True)))

    def _literal(self, value: Any) -> Any:
        meter = _current_meter(self.budget)
        meter.step(COST_FILTER)
        return meter.account(value)


# -- the public renderer


def _input_size(obj: Any, level: int = 0) -> int:
    """Chars and items of what the caller passes in (trusted shapes, possibly large)."""
    if isinstance(obj, str):
        return len(obj)
    if level > MAX_NESTING:
        return 1
    if isinstance(obj, Mapping):
        return 1 + sum(
            _input_size(k, level + 1) + _input_size(v, level + 1) for k, v in obj.items()
        )
    if isinstance(obj, (list, tuple)):
        return 1 + sum(_input_size(item, level + 1) for item in obj)
    return 1


class GuardedTemplate:
    """A compiled chat template that renders within its budget or raises one-line errors.

    Thread-safe: each render has its own meter (a ContextVar), so serve workers can share one.
    """

    def __init__(
        self,
        template: jinja2.Template,
        label: str,
        hint: str,
        budget: RenderBudget,
        source: str = "",
    ):
        self._template = template
        self.label = label
        self.hint = hint
        self.budget = budget
        self.source = source  # the template's text (tool calling reads its format from it)

    @classmethod
    def compile(
        cls,
        text: object,
        label: str,
        budget: RenderBudget | None = None,
        hint: str = DEFAULT_HINT,
    ) -> GuardedTemplate:
        """Parse and compile ``text``; ``label`` names it in errors ("the GGUF's chat template")."""
        budget = budget or RenderBudget()
        label = escape_untrusted(label, limit=120)
        if not isinstance(text, str):
            raise TemplateError(f"{label} is not text (a {type(text).__name__} value); {hint}")
        if len(text) > budget.max_source_chars:
            raise TemplateError(
                f"{label} is {len(text)} characters long, over the {budget.max_source_chars} "
                f"a chat template may have; {hint}"
            )
        env = _GuardedEnvironment(budget)
        instrument = _Instrument()
        try:
            with wall_time_backstop(budget.max_wall_seconds):
                tree = instrument.visit(env.parse(text))
                env.weights, env.recursive_weight = instrument.weights, instrument.recursive_weight
                template = env.from_string(tree)
        except jinja2.TemplateSyntaxError as exc:
            where = f" (line {exc.lineno})" if exc.lineno else ""
            raise TemplateError(
                f"{label} does not parse: {_first_line(exc)}{where}; {hint}"
            ) from None
        except Exception as exc:
            # Untrusted input at a trust boundary: whatever breaks, the user gets one line.
            raise _failure(label, hint, exc) from None
        return cls(template, label, hint, budget, text)

    def error(self, verb: str, detail: str) -> TemplateError:
        """A TemplateError about this template: ``<label> <verb>: <detail>; <hint>``."""
        return TemplateError(f"{self.label} {verb}: {escape_untrusted(detail)}; {self.hint}")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt for ``messages``, exactly as llama-cpp-python's Jinja2ChatFormatter makes it.

        ``extra`` are further template variables: ``tools``, ``functions``, ``function_call``
        and ``tool_choice`` default to None as in llama-cpp-python (templates test them with
        ``is not none``).
        """
        return self.render_with_cost(
            messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        ).text

    def render_with_cost(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> RenderCost:
        """:meth:`render`, with what it spent on each budgeted counter."""
        variables: dict[str, Any] = {
            "functions": None,
            "function_call": None,
            "tools": None,
            "tool_choice": None,
            **extra,
            "messages": [dict(message) for message in messages],
            "eos_token": eos_token,
            "bos_token": bos_token,
            "raise_exception": _raise_exception,
            "add_generation_prompt": add_generation_prompt,
            "strftime_now": _strftime_now,
        }
        meter = Meter(self.budget, _input_size(variables), len(messages))
        token = METER.set(meter)
        pieces = self._template.generate(variables)
        out: list[str] = []
        try:
            with wall_time_backstop(meter.wall_cap):
                for piece in pieces:
                    meter.emit(piece)
                    out.append(piece)
        except Exception as exc:
            # Untrusted input at a trust boundary: whatever breaks, the user gets one line.
            raise _failure(self.label, self.hint, exc) from None
        finally:
            pieces.close()
            METER.reset(token)
        return RenderCost(
            text="".join(out),
            loop_iterations=meter.iterations,
            operations=meter.operations,
            work=meter.work,
            max_depth=meter.max_depth,
            output_chars=meter.output,
        )


def _first_line(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, jinja2.TemplateError) else str(exc)
    lines = (message or "").strip().splitlines()
    return escape_untrusted(lines[0] if lines else type(exc).__name__, limit=200)


def _failure(label: str, hint: str, exc: BaseException) -> TemplateError:
    """The one line for an exception raised while compiling or rendering a template."""
    detail = _first_line(exc)
    if isinstance(exc, OverBudget):
        verb = "went over its budget"
    elif isinstance(exc, _Raised):
        verb = "refused the conversation"
    elif isinstance(exc, SecurityError):
        verb = "was stopped by the sandbox"
    elif isinstance(exc, RecursionError):
        verb, detail = "went over its budget", "Python's recursion limit"
    elif isinstance(exc, MemoryError):
        verb, detail = "went over its budget", "out of memory"
    elif isinstance(exc, jinja2.TemplateNotFound):
        verb, detail = "failed", f"it includes or imports another template ({detail})"
    elif isinstance(exc, jinja2.TemplateError):
        verb = "failed"
    else:
        verb, detail = "failed", f"{type(exc).__name__}: {detail}"
    return TemplateError(f"{label} {verb}: {detail}; {hint}")
