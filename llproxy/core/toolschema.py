"""An operator's tool call checked against the JSON Schema the client sent, safely inside
the process that holds the desk: a reference resolves only inside the schema (nothing is
ever fetched), the schema's depth and size are bounded before it is used, the validation's
work is bounded as it runs, and patterns run on RE2, which cannot backtrack. Whatever goes
wrong is a `SchemaRefusal` whose message the operator can read."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import jsonschema
import re2  # type: ignore[import-untyped]
import referencing
from jsonschema.exceptions import ValidationError

# Containers (objects and arrays) nested in one schema; real tools' schemas stay far below,
# and a deep one would exhaust the interpreter's stack inside jsonschema.
MAX_DEPTH = 48
MAX_NODES = 10_000  # values of any kind in one schema
# Keyword evaluations in one check, the metaschema's included: a schema whose references
# fan out (a refers to b twice, b to c twice, ...) is refused instead of running for hours.
MAX_STEPS = 100_000
# What the schemas of one request may cost together when it arrives (a tenth of a second
# or so): a client sends them, the serving process pays. Those left unchecked then are
# checked when an operator calls them.
ARRIVAL_STEPS = 20_000
_RE2_MEMORY = 8 << 20
MAX_MESSAGE = 500  # characters of jsonschema's message in a refusal

Keyword = Callable[[Any, Any, Any, dict[str, Any]], Iterable[ValidationError] | None]


class SchemaRefusal(Exception):
    """The schema cannot be used, or the arguments do not fit it; the message says which."""


class _TooMuchWork(Exception):
    pass


class _Budget:
    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooMuchWork


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("toolschema_budget")


def schema_problems(schemas: Mapping[str, Any], steps: int = ARRIVAL_STEPS) -> dict[str, str]:
    """Why each named schema cannot be used: its shape past the bounds, invalid under its
    draft's metaschema, a pattern RE2 cannot run. The checks share `steps`; once they are
    spent the rest go unchecked here. References are followed only when arguments are
    checked, so `check` may still find a fault in one."""
    problems: dict[str, str] = {}
    budget = _Budget(steps)
    for name, schema in schemas.items():
        try:
            _check_shape(schema)
            with _bounded_work(budget):
                _valid_schema(schema)
        except SchemaRefusal as refusal:
            if budget.left < 0:
                break  # out of steps: this one is not to blame
            problems[name] = str(refusal)
    return problems


def check(schema: dict[str, Any], arguments: Any) -> None:
    """Return when `arguments` fit `schema`; raise SchemaRefusal otherwise."""
    _check_shape(schema)
    with _bounded_work(_Budget(MAX_STEPS)):
        base = _valid_schema(schema)
        # An empty registry: its only resources are the schema itself and the published
        # metaschemas jsonschema carries; any other reference is unresolvable.
        validator = _bounded(base)(schema, registry=referencing.Registry())
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "arguments"
        reason = f"arguments do not fit the tool's schema: {where}: {_short(error.message)}"
        raise SchemaRefusal(reason)


def _valid_schema(schema: Any) -> type[Any]:
    """The validator class of the schema's draft, once the schema is valid under it."""
    base: type[Any] = jsonschema.validators.validator_for(schema)
    meta = _bounded(jsonschema.validators.validator_for(base.META_SCHEMA, default=base))
    problem = jsonschema.exceptions.best_match(
        meta(base.META_SCHEMA, format_checker=_REGEX_FORMAT).iter_errors(schema)
    )
    if problem is not None:
        raise SchemaRefusal(f"the tool's schema is invalid: {_short(problem.message)}")
    return base


@contextlib.contextmanager
def _bounded_work(budget: _Budget) -> Iterator[None]:
    """Run jsonschema within the budget; whatever it raises becomes a SchemaRefusal."""
    token = _budget.set(budget)
    try:
        yield
    except SchemaRefusal:
        raise
    except _TooMuchWork:
        raise SchemaRefusal("the tool's schema takes too much work to check") from None
    except RecursionError:
        raise SchemaRefusal("the tool's schema refers to itself without end") from None
    except Exception as exc:
        raise SchemaRefusal(f"the tool's schema cannot be checked: {_reason(exc)}") from None
    finally:
        _budget.reset(token)


def _short(message: str) -> str:
    """jsonschema's messages quote the value: a whole large one is no use to a person."""
    if len(message) <= MAX_MESSAGE:
        return message
    half = MAX_MESSAGE // 2  # the value comes first, what is wrong with it last
    return f"{message[:half]} … {message[-half:]}"


def _reason(exc: Exception) -> str:
    """A short reason; an unresolvable reference is the one a client is likely to send."""
    cause: BaseException = exc
    while not isinstance(cause, referencing.exceptions.Unresolvable) and cause.__cause__:
        cause = cause.__cause__
    if isinstance(cause, referencing.exceptions.Unresolvable):
        return f"$ref {cause.ref!r} does not resolve inside the schema"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _check_shape(schema: Any) -> None:
    """Refuse a schema too deep or too large before jsonschema walks it (iteratively, so
    the check itself cannot run out of stack)."""
    nodes = 0
    pending: list[tuple[Any, int]] = [(schema, 1)]
    patterns_by_name = False
    unevaluated = False
    while pending:
        value, depth = pending.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SchemaRefusal(f"the tool's schema is too large (over {MAX_NODES} values)")
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
            patterns_by_name |= "patternProperties" in value
            unevaluated |= "unevaluatedProperties" in value
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise SchemaRefusal(f"the tool's schema is nested too deep (over {MAX_DEPTH} levels)")
        pending.extend((child, depth + 1) for child in children)
    # jsonschema evaluates unevaluatedProperties with Python's backtracking regexes on the
    # patternProperties in scope; keyword overrides cannot reach that code.
    if patterns_by_name and unevaluated:
        raise SchemaRefusal(
            "the tool's schema combines patternProperties with unevaluatedProperties, "
            "which llproxy does not check"
        )


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would write every bad pattern to stderr
    options.max_mem = _RE2_MEMORY
    return options


_RE2_OPTIONS = _options()


def _search(pattern: str, text: str) -> bool:
    try:
        return re2.compile(pattern, _RE2_OPTIONS).search(text) is not None
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else "invalid"
        raise SchemaRefusal(f"the tool's schema has a pattern RE2 cannot run: {reason}") from None


def _compiles(pattern: object) -> bool:
    if isinstance(pattern, str):
        re2.compile(pattern, _RE2_OPTIONS)
    return True


# The metaschema's one format that matters here: a pattern must be one RE2 runs.
_REGEX_FORMAT = jsonschema.FormatChecker(formats=())
_REGEX_FORMAT.checks("regex", raises=re2.error)(_compiles)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for name, value in instance.items():
            if _search(pattern, name):
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = sorted(
        name
        for name in instance
        if name not in known and not any(_search(pattern, name) for pattern in patterns)
    )
    if validator.is_type(additional, "object"):
        for name in extras:
            yield from validator.descend(instance[name], additional, path=name)
    elif additional is False and extras:
        listed = ", ".join(repr(name) for name in extras)
        verb = "was" if len(extras) == 1 else "were"
        yield ValidationError(f"Additional properties are not allowed ({listed} {verb} unexpected)")


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[Any]:
    # jsonschema compares items pairwise when they do not sort (objects): quadratic time.
    if unique and validator.is_type(instance, "array"):
        keys = [_json_key(item) for item in instance]
        if len(set(keys)) < len(keys):
            yield ValidationError(f"{instance!r} has non-unique elements")


def _json_key(value: Any) -> Any:
    """A hashable key equal for values JSON Schema calls equal (1 and 1.0, not true and 1)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", int(value) if isinstance(value, float) and value.is_integer() else value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_json_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((name, _json_key(item)) for name, item in value.items()))
    return ("other", repr(value))


# Keywords whose jsonschema implementation can take more than linear time, done here.
_REPLACED_KEYWORDS: dict[str, Keyword] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}


def _counted(keyword: Keyword) -> Keyword:
    def run(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
        _budget.get().spend()
        yield from keyword(validator, value, instance, schema) or ()

    return run


_bounded_classes: dict[type[Any], type[Any]] = {}
_init_fields: dict[type[Any], tuple[tuple[str, str], ...]] = {}  # what evolve carries over


def _bounded(base: type[Any]) -> type[Any]:
    """The draft's validator with patterns on RE2 and every keyword paid from the budget."""
    if base in _bounded_classes.values():
        return base
    bounded = _bounded_classes.get(base)
    if bounded is None:
        keywords = {**base.VALIDATORS}
        for name in _REPLACED_KEYWORDS:
            if name in keywords:
                keywords[name] = _REPLACED_KEYWORDS[name]
        counted = {name: _counted(keyword) for name, keyword in keywords.items()}
        bounded = jsonschema.validators.extend(base, counted)  # type: ignore[no-untyped-call]
        bounded.evolve = _evolve
        _init_fields[bounded] = tuple(
            (a.name, a.alias) for a in attrs.fields(bounded) if a.init and a.alias
        )
        _bounded_classes[base] = bounded
    return bounded


def _evolve(self: Any, **changes: Any) -> Any:
    """jsonschema's `evolve` (a validator for a subschema), except that a subschema with a
    `$schema` of its own gets the bounded class of that draft: the plain one would run its
    patterns on Python's re, off the budget."""
    cls = type(self)
    schema = changes.setdefault("schema", self.schema)
    new = cls
    if isinstance(schema, dict) and "$schema" in schema:
        new = _bounded(jsonschema.validators.validator_for(schema, default=cls))
    for name, alias in _init_fields[cls]:
        if alias not in changes:
            changes[alias] = getattr(self, name)
    return new(**changes)
