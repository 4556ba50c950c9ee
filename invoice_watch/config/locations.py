"""Where each value of a configuration file is, and the problems found there: the
marks (line and column) of every value and key by dotted path, each pydantic error's
``loc`` mapped back to its value's mark with a message that says how to fix it, and the
problems of a rule or notifier whose type is unknown, reported whatever its type.

A value reported once (a bad ``${VAR}``, a control character...) is *broken*: its other
errors, and the checks of the mappings that hold it, would only repeat it or quote a
value that must not be shown.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Tag, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from yaml.error import Mark

from invoice_watch.config.models import Config
from invoice_watch.errors import ConfigProblem

# A dotted path in the document, as a tuple: ("rules", 0, "notify", 1).
Loc = tuple[str | int, ...]


def located(filename: str, mark: Mark | None, loc: Loc, message: str) -> ConfigProblem:
    """A problem of the value at ``loc``, found at ``mark`` (None: the file's start)."""
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    return ConfigProblem(filename, line, column, ".".join(str(p) for p in loc), message)


def in_file_order(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """``problems`` by line, column and path, as an editor walks the file."""
    return sorted(problems, key=lambda p: (p.line, p.column, p.path))


@dataclass
class Locations:
    """Where each value of one file starts, by dotted path, and the problems found."""

    filename: str
    problems: list[ConfigProblem] = field(default_factory=list)
    marks: dict[Loc, Mark] = field(default_factory=dict)  # start of each value
    key_marks: dict[Loc, Mark] = field(default_factory=dict)  # start of each mapping key
    broken: set[Loc] = field(default_factory=set)  # values already reported
    holds_broken: set[Loc] = field(default_factory=set)  # and every path above them

    def set_broken(self, loc: Loc) -> None:
        """``loc`` was reported: its other errors and its mappings' checks would only
        repeat it (or quote a value that must not be shown)."""
        self.broken.add(loc)
        self.holds_broken.update(loc[:n] for n in range(len(loc)))

    def is_broken(self, loc: Loc) -> bool:
        """Whether ``loc``, a value inside it, or a value holding it was reported."""
        return loc in self.holds_broken or self._in_broken(loc)

    def _in_broken(self, loc: Loc) -> bool:
        """Whether ``loc`` or a value holding it was reported."""
        return any(loc[:n] in self.broken for n in range(len(loc) + 1))

    def report(self, mark: Mark | None, loc: Loc, message: str) -> None:
        """Add a problem of the value at ``loc``, found at ``mark``."""
        self.problems.append(located(self.filename, mark, loc, message))

    def report_at(self, loc: Loc, message: str) -> None:
        """Add a problem of the value at ``loc``, found where that value starts."""
        self.report(self.marks[loc], loc, message)

    def report_validation(
        self, exc: ValidationError, data: Any, context: Mapping[str, Any]
    ) -> None:
        """Report each error of ``exc``, raised by validating ``data`` with the validation
        ``context``, at its value."""
        for error in exc.errors(include_url=False, include_input=False):
            kind = error["type"]
            loc, missing = _document_loc(error["loc"], data, kind == "missing")
            # A value already reported: skip its errors and its mappings' model checks.
            if self.is_broken(loc):
                continue
            value = _value_at(data, loc)
            if kind in _UNTAGGED and isinstance(value, dict):
                # The type is unknown: still report what is wrong whatever the type.
                self._report_untagged(_type_at(error["loc"]), value, loc, context)
            if kind in ("union_tag_invalid", "union_tag_not_found"):
                missing = kind == "union_tag_not_found"
                loc = (*loc, "type")
            if missing:
                mark = self.marks.get(loc[:-1])
            elif kind == "extra_forbidden":
                mark = self.key_marks.get(loc)
            else:
                mark = self.marks.get(loc)
            self.report(mark, loc, _message(error, loc, error["loc"]))

    def _report_untagged(
        self, union: Any, value: dict[str, Any], loc: Loc, context: Mapping[str, Any]
    ) -> None:
        """The problems of a mapping whose type (the union's tag) is unknown: keys that no
        type has, required keys every type has, and values that no type accepts."""
        fields = _union_fields(union)
        for key in value.keys() - fields.keys():
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            self.report(
                self.key_marks.get((*loc, key)),
                (*loc, key),
                f"unknown key `{key}`; {hint}{_NO_TYPE.get(str(loc[0]), 'no type has it')} "
                f"(keys: {', '.join(fields)})",
            )
        models = _union_members(union)
        for key, owners in fields.items():
            key_loc = (*loc, key)
            if key == "type":  # the tag: pydantic's own error says what is wrong
                continue
            if key not in value:
                required = all(info.is_required() for info in owners.values())
                if required and len(owners) == len(models):
                    self.report(self.marks.get(loc), key_loc, f"missing required key `{key}`")
                continue
            if self._in_broken(key_loc):
                continue
            for error in _field_errors(key, owners, value[key], context) or []:
                error_loc = (*key_loc, *error["loc"])
                self.report(
                    self.marks.get(error_loc, self.marks.get(key_loc)),
                    error_loc,
                    _message(error, error_loc, error_loc),
                )


# Errors of a discriminated union whose tag is unknown or missing (rules, notifiers) or
# ambiguous (atlas.auth, discriminated by its keys).
_UNTAGGED = ("union_tag_invalid", "union_tag_not_found", "auth_kind")
_NO_TYPE = {
    "rules": "no rule type has it",
    "notifiers": "no notifier type has it",
    "atlas": "neither an API key nor a service account has it",
}


def _union_members(union: Any) -> list[type[BaseModel]]:
    union = _unwrap(union)
    members = [_unwrap(m) for m in get_args(union)] if get_origin(union) else []
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def _union_fields(union: Any) -> dict[str, dict[type[BaseModel], FieldInfo]]:
    """Each key any member of ``union`` has -> the members that have it, and its field."""
    fields: dict[str, dict[type[BaseModel], FieldInfo]] = {}
    for model in _union_members(union):
        for name, info in model.model_fields.items():
            fields.setdefault(info.alias or name, {})[model] = info
    return fields


_ADAPTERS: dict[tuple[type[BaseModel], str], TypeAdapter[Any]] = {}


def _field_errors(
    key: str, owners: Mapping[type[BaseModel], FieldInfo], value: Any, context: Mapping[str, Any]
) -> list[Any] | None:
    """None if the field ``key`` of any model in ``owners`` accepts ``value``, else the
    first one's errors (each ``loc`` relative to the value)."""
    first: list[Any] | None = None
    for model, info in owners.items():
        adapter = _ADAPTERS.get((model, key))
        if adapter is None:
            annotation: Any = info.annotation
            if info.metadata:
                annotation = Annotated[annotation, *info.metadata]
            adapter = TypeAdapter(annotation)
            _ADAPTERS[(model, key)] = adapter
        try:
            adapter.validate_python(value, context=dict(context))
            return None
        except ValidationError as exc:
            first = first or exc.errors(include_url=False, include_input=False)
    return first


def _value_at(data: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _document_loc(loc: tuple[int | str, ...], data: Any, missing: bool) -> tuple[Loc, bool]:
    """A pydantic ``loc`` as a path in the document: union tags dropped; for a missing
    key, the key's path and True."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            path.append(part)
        elif missing and i == len(loc) - 1:
            return (*path, part), True
        # else: a union tag such as "invoice_status", not part of the document
    return tuple(path), False


def _message(error: Any, loc: Loc, pydantic_loc: tuple[int | str, ...]) -> str:
    """A message for one pydantic error that says how to fix it."""
    kind, ctx = error["type"], error.get("ctx") or {}
    key = loc[-1] if loc else ""
    if kind == "missing":
        return f"missing required key `{key}`"
    if kind == "extra_forbidden":
        allowed = _keys(_type_at(pydantic_loc[:-1]))
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"unknown key `{key}`; {hint}allowed here: {', '.join(allowed)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(_tags(_type_at(pydantic_loc)))
        if kind == "union_tag_not_found":
            return f"missing required key `type`; one of: {tags}"
        return f"unknown type `{ctx.get('tag')}`; use one of: {tags}"
    if kind == "value_error":
        return str(ctx["error"])
    if kind in ("literal_error", "enum"):
        return f"use one of: {ctx['expected']}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than"):
        bound = {"greater_than_equal": "at least", "less_than_equal": "at most"}
        limit = ctx.get("ge", ctx.get("le", ctx.get("gt")))
        return f"must be {bound.get(kind, 'more than')} {limit}"
    hints = {
        "string_type": "expected text (quote the value)",
        "int_type": "expected a whole number",
        "int_parsing": "expected a whole number",
        "int_parsing_size": "expected a whole number, and this one is far too large",
        "finite_number": "must be a finite number",
        "int_from_float": "expected a whole number",
        "float_type": "expected a number",
        "float_parsing": "expected a number",
        "bool_type": "expected true or false",
        "bool_parsing": "expected true or false",
        "list_type": "expected a list (`- item` lines or [a, b])",
        "dict_type": "expected a mapping (`key: value` lines)",
        "model_type": "expected a mapping (`key: value` lines)",
        "model_attributes_type": "expected a mapping (`key: value` lines)",
        "path_type": "expected a file path",
        "too_short": "must not be empty: give at least one entry",
        "string_too_short": "must not be empty",
    }
    return hints.get(kind, str(error["msg"]))


def _type_at(loc: tuple[int | str, ...]) -> Any:
    """The annotated type found at a pydantic ``loc`` under Config (None if unknown)."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = tp.model_fields.items()
            tp = next((f.annotation for n, f in fields if part in (n, f.alias)), None)
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (Union, UnionType):
            tp = next((m for m in get_args(tp) if part in _tags(m)), None)
        else:
            return None
    return tp


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional (a union with None and one other member)."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, UnionType) and NoneType in get_args(tp):
            (tp,) = (m for m in get_args(tp) if m is not NoneType)
        else:
            return tp


def _tags(tp: Any) -> list[str]:
    """The discriminator tags a union member (or every member of a union) answers to."""
    if get_origin(tp) is Annotated:
        tags = [m.tag for m in get_args(tp)[1:] if isinstance(m, Tag)]
        if tags:
            return tags
    tp = _unwrap(tp)
    if get_origin(tp) in (Union, UnionType):
        return [tag for member in get_args(tp) for tag in _tags(member)]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "type" in tp.model_fields:
        return [str(a) for a in get_args(tp.model_fields["type"].annotation)]
    return []


def _keys(tp: Any) -> list[str]:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or name for name, f in tp.model_fields.items()]
    return []
