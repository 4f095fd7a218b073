"""Typed operations: what an agent serves remotely, and nothing else.

An operation is a name, a request record and a handler, put into an :class:`OperationTable`
explicitly — by the agent core for its own operations and by the services the agent program
wires in (:mod:`dpmigrate.agentd`). A method is never callable remotely just because it
exists: only a registered name is, and a name is registered once.

A request record is a frozen dataclass deriving from :class:`Request`; its annotations are
the wire contract. :func:`parse` builds one from a request's ``args`` and refuses anything
else — an unknown or missing argument, a value of the wrong JSON type, a bool where a number
is wanted, a name or a path outside its rule — with one :class:`ProtocolError` naming the
operation and the argument. A handler only ever sees well-formed values, and a refused
request reaches no handler, so it changes nothing.

Annotations a record may use::

    str  int  bool                 exactly that JSON type (a bool is never an int)
    float                          a number; an int is accepted and converted; finite only
    Name  AbsPath                  checked strings, see their rules below
    dict, dict[str, Any]           an object; its contents are the handler's to check
    list, list[Any], list[X]       an array; of X (a scalar or checked string) when given
    tuple[X, Y, ...]               an array of exactly that shape, e.g. [host, port]
    X | None                       X or null

An annotation outside this list is refused when the record is registered, not when a request
arrives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import traceback
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Protocol, TypeVar

from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.transports.resolver import NAME_RE

__all__ = [
    "AbsPath",
    "EventLog",
    "Name",
    "NoArgs",
    "Operation",
    "OperationTable",
    "Request",
    "Rule",
    "parse",
]

#: Longest path a request may carry (Linux's PATH_MAX).
MAX_PATH = 4096
_OP_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Request:
    """Base of request records; each subclass is a ``@dataclass(frozen=True)``."""


R = TypeVar("R", bound=Request)


@dataclasses.dataclass(frozen=True)
class NoArgs(Request):
    """The request of an operation that takes no arguments."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A checked kind of string: ``problem(value)`` says what is wrong with it, or None."""

    what: str  # with its article: "a name"
    problem: Callable[[str], str | None]


def _name_problem(value: str) -> str | None:
    if NAME_RE.fullmatch(value):  # fullmatch: "$" alone would let a final newline in
        return None
    return (
        f"{_show(value)} is not a name: use 1-128 characters from A-Z a-z 0-9 _ . : -, "
        "starting with a letter or a digit"
    )


def _path_problem(value: str) -> str | None:
    if not value.startswith("/"):
        return f"{_show(value)} is not an absolute path"
    if "\0" in value:
        return f"{_show(value)} contains a NUL byte"
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return f"{_show(value)} is not valid UTF-8"
    if size > MAX_PATH:
        return f"the path is longer than {MAX_PATH} bytes"
    if ".." in value.split("/"):
        return f"{_show(value)} has a '..' component; pass the path resolved"
    return None


#: An app, stage, node or ring name. The same alphabet as ring names
#: (:func:`dpmigrate.transports.resolver.check_ring_name`): names end up in file and socket
#: names, so a name can never be ``..``, hold a ``/`` or start like an option.
Name = Annotated[str, Rule("a name", _name_problem)]
#: An absolute path with no NUL byte and no ``..`` component, at most :data:`MAX_PATH` bytes.
AbsPath = Annotated[str, Rule("an absolute path", _path_problem)]


class _Mismatch(Exception):
    """A value does not fit its annotation: what is wrong (``text``), what was ``expected``,
    and ``where`` inside the argument (an item's index)."""

    def __init__(self, text: str, expected: str = "", where: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.expected = expected
        self.where = where

    def __str__(self) -> str:
        return f"{self.text}; expected {self.expected}" if self.expected else self.text

    def inside(self, index: int) -> _Mismatch:
        return _Mismatch(self.text, self.expected, f"[{index}]{self.where}")


@dataclasses.dataclass(frozen=True)
class _Check:
    expected: str
    convert: Callable[[object], object]


def _kind(value: object) -> str:
    """A JSON value's type, in JSON's words."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
             list: "array", dict: "object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wrong(value: object, expected: str) -> _Mismatch:
    return _Mismatch(f"has the wrong type {_kind(value)}", expected)


def _exactly(kind: type, expected: str) -> _Check:
    def convert(value: object) -> object:
        if type(value) is not kind:  # bool is a subclass of int: compare exactly
            raise _wrong(value, expected)
        return value

    return _Check(expected, convert)


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(value, "a number")
    number = float(value)
    if not math.isfinite(number):
        raise _Mismatch(f"is {number}", "a finite number")
    return number


_SCALARS: dict[object, _Check] = {
    str: _exactly(str, "a string"),
    int: _exactly(int, "an int"),
    bool: _exactly(bool, "a bool"),
    float: _Check("a number", _number),
}
_OBJECT = _exactly(dict, "an object")
_ARRAY = _exactly(list, "an array")


def _checked_string(rule: Rule) -> _Check:
    def convert(value: object) -> object:
        if type(value) is not str:
            raise _wrong(value, rule.what)
        problem = rule.problem(value)
        if problem is not None:
            raise _Mismatch(f"is not valid: {problem}")
        return value

    return _Check(rule.what, convert)


def _element(annotation: object) -> _Check:
    """A list's or tuple's item: a scalar or a checked string, nothing nested."""
    if annotation in _SCALARS or typing.get_origin(annotation) is Annotated:
        return _compile(annotation)
    raise TypeError(f"arrays of {annotation!r} are not supported: items must be scalars")


def _array_of(item: _Check) -> _Check:
    def convert(value: object) -> object:
        if type(value) is not list:
            raise _wrong(value, f"an array of {item.expected}")
        out = []
        for i, element in enumerate(value):
            try:
                out.append(item.convert(element))
            except _Mismatch as err:
                raise err.inside(i) from None
        return out

    return _Check(f"an array of {item.expected}", convert)


def _shaped(items: tuple[_Check, ...]) -> _Check:
    expected = "[" + ", ".join(item.expected for item in items) + "]"

    def convert(value: object) -> object:
        if type(value) is not list:
            raise _wrong(value, expected)
        if len(value) != len(items):
            count = len(value)
            raise _Mismatch(f"has {count} item{'' if count == 1 else 's'}", expected)
        out = []
        for i, (item, element) in enumerate(zip(items, value, strict=True)):
            try:
                out.append(item.convert(element))
            except _Mismatch as err:
                raise err.inside(i) from None
        return tuple(out)

    return _Check(expected, convert)


def _optional(inner: _Check) -> _Check:
    expected = f"{inner.expected} or null"

    def convert(value: object) -> object:
        if value is None:
            return None
        try:
            return inner.convert(value)
        except _Mismatch as err:
            if err.where or err.expected != inner.expected:
                raise  # about a part of the value, or not about its type
            raise _Mismatch(err.text, expected) from None

    return _Check(expected, convert)


def _compile(annotation: object) -> _Check:
    """The check for one annotation; TypeError for an annotation this module does not know."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        rules = [extra for extra in args[1:] if isinstance(extra, Rule)]
        if args[0] is not str or len(rules) != 1:
            raise TypeError(f"{annotation!r}: only str carries a Rule, exactly one")
        return _checked_string(rules[0])
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation is dict or origin is dict:
        return _OBJECT
    if annotation is list or (origin is list and args in ((), (Any,))):
        return _ARRAY
    if origin is list:
        return _array_of(_element(args[0]))
    if origin is tuple and args and Ellipsis not in args:
        return _shaped(tuple(_element(arg) for arg in args))
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _optional(_compile(inner))
    raise TypeError(f"annotation {annotation!r} is not supported in a request record")


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    check: _Check
    required: bool


@functools.cache
def _fields(cls: type[Request]) -> tuple[_Field, ...]:
    """The compiled fields of a request record (checked once per record type)."""
    if not (isinstance(cls, type) and issubclass(cls, Request) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass deriving from Request")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"request record {cls.__qualname__} must be a frozen dataclass")
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        _Field(
            f.name,
            _compile(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def parse(cls: type[R], args: object, op: str | None = None) -> R:
    """Build a ``cls`` from a request's ``args`` (a JSON object), or raise ProtocolError.

    Every declared field must be there (unless it has a default) and fit its annotation; no
    other key may be. ``op`` names the operation in the message (default: the record's name).
    """
    what = f"operation {op or cls.__name__!r}"
    if not isinstance(args, dict):
        raise ProtocolError(f"{what}: 'args' must be an object, not {_kind(args)}")
    fields = _fields(cls)
    extra = sorted(set(args) - {f.name for f in fields})
    if extra:
        raise ProtocolError(
            f"{what}: unknown argument(s) {', '.join(map(_show, extra))}; it takes "
            + (", ".join(repr(f.name) for f in fields) or "none")
        )
    values: dict[str, object] = {}
    for f in fields:
        if f.name not in args:
            if f.required:
                raise ProtocolError(f"{what}: missing argument {f.name!r} ({f.check.expected})")
            continue
        try:
            values[f.name] = f.check.convert(args[f.name])
        except _Mismatch as err:
            raise ProtocolError(f"{what}: argument {f.name!r}{err.where} {err}") from None
    return cls(**values)


class EventLog(Protocol):
    """The agent's event stream: ``log("event name", level="info", field=value, ...)``
    (:class:`dpmigrate.eventlog.EventLog`)."""

    def __call__(self, event: str, /, *, level: str = "info", **fields: Any) -> object: ...


@dataclasses.dataclass(frozen=True)
class Operation:
    name: str
    request_type: type[Request]
    handler: Callable[[Any], object]


class OperationTable:
    """The operations one agent serves: name → (request record, handler).

    Register everything before the agent starts serving; registration is not locked against
    concurrent dispatch.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._ops: dict[str, Operation] = {}

    def register(self, name: str, request_type: type[R], handler: Callable[[R], object]) -> None:
        """Serve ``name``: parse its args as ``request_type`` and call ``handler`` with it.

        A name already registered, a malformed name or an unsupported record is refused here
        (ValueError, TypeError), at start-up, not when a request arrives.
        """
        if not _OP_NAME_RE.fullmatch(name):
            raise ValueError(f"operation name {name!r} must match {_OP_NAME_RE.pattern}")
        if name in self._ops:
            raise ValueError(
                f"operation {name!r} is already registered (by "
                f"{_qualname(self._ops[name].handler)}); each name is registered once"
            )
        _fields(request_type)  # refuse a bad record now
        self._ops[name] = Operation(name, request_type, handler)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def get(self, name: str) -> Operation:
        """The registered operation ``name`` (KeyError if there is none)."""
        return self._ops[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._ops

    def dispatch(self, op: object, args: object) -> dict[str, Any]:
        """Run one request; the reply is ``{"ok": True, "result": ...}`` or
        ``{"ok": False, "error": TEXT}``. Never raises: a refused request (unknown, malformed,
        or refused by its handler with a DpmigrateError, ValueError or KeyError) gets its
        message; anything else is a bug, logged with its traceback and answered as an internal
        error, and the connection goes on."""
        entry = self._ops.get(op) if isinstance(op, str) else None
        if entry is None:
            return {
                "ok": False,
                "error": f"unknown operation {_show(op)}; this agent serves "
                + ", ".join(self.names()),
            }
        try:
            request = parse(entry.request_type, args, entry.name)
            result = entry.handler(request)
        except (DpmigrateError, ValueError, KeyError) as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug must not take the agent (or the connection) down
            self._log("internal error", level="error", op=entry.name, error=repr(err),
                      traceback=traceback.format_exc())  # fmt: skip
            return {"ok": False, "error": f"internal error in {entry.name}: {err!r}"}
        return {"ok": True, "result": result}


def _qualname(handler: Callable[..., object]) -> str:
    return getattr(handler, "__qualname__", repr(handler))
