"""What a configuration reload (SIGHUP) does with each setting.

:data:`APPLY` maps every key of the config model (as written in the file, ``*`` for a
list item or a mapping's name) to how a running daemon takes a new value of it;
:func:`changes` compares two configurations key by key through that table, and
:meth:`App.reload <invoice_watch.app.App.reload>` does what the changed keys need, or
refuses the whole reload, naming the keys, when one of them needs a restart. A setting
is never silently ignored (issue 14 §2): ``tests/test_reload.py`` walks the pydantic
models and fails on any key missing from the table, so a new key is classified by one
line here (``"poll.full_listing_every": Apply.CYCLE,``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from invoice_watch.config import Config


class Apply(enum.Enum):
    """How a reload applies a changed setting. The new configuration always replaces
    the old one, between two cycles; each kind says what else is done."""

    CYCLE = "read by every cycle"
    ATLAS = "a new Atlas client"
    NOTIFIERS = "new notifiers"
    DELIVERY = "the delivery limits"
    RULES = "the rules (and what the state keeps settled)"
    SCHEDULE = "the poll schedule, from the last cycle's start"
    HTTP = "the HTTP endpoint, listening anew"
    LOGGING = "the log level and format"
    RESTART = "only at start: the reload is refused"


APPLY: dict[str, Apply] = {
    # atlas.*: the client is built from the whole section (and the organizations' names)
    "atlas.base_url": Apply.ATLAS,
    "atlas.ui_url": Apply.CYCLE,  # links in messages, built by each cycle
    "atlas.api": Apply.ATLAS,
    "atlas.auth.public_key": Apply.ATLAS,
    "atlas.auth.private_key": Apply.ATLAS,
    "atlas.auth.client_id": Apply.ATLAS,
    "atlas.auth.client_secret": Apply.ATLAS,
    "atlas.timeout": Apply.ATLAS,
    "atlas.max_concurrency": Apply.ATLAS,
    "atlas.retries": Apply.ATLAS,
    "atlas.max_backoff": Apply.ATLAS,
    "atlas.max_response_size": Apply.ATLAS,
    "atlas.proxy": Apply.ATLAS,
    "organizations.*.id": Apply.ATLAS,
    "organizations.*.name": Apply.ATLAS,  # the client names organizations in its errors
    "poll.interval": Apply.SCHEDULE,
    "poll.jitter": Apply.SCHEDULE,
    "poll.full_listing_every": Apply.CYCLE,  # FullListings takes it at each cycle
    "state.path": Apply.RESTART,  # the open, locked state file cannot move
    "state.url": Apply.RESTART,  # nor the database (nor its lease) change under it
    "state.password": Apply.RESTART,
    "ha.lease_ttl": Apply.RESTART,
    "delivery.max_age": Apply.DELIVERY,
    "delivery.max_backoff": Apply.DELIVERY,
    "delivery.retention": Apply.DELIVERY,
    "delivery.group_over": Apply.CYCLE,
    # notifiers.*: every notifier is built anew from its section
    "notifiers.*.type": Apply.NOTIFIERS,
    "notifiers.*.webhook_url": Apply.NOTIFIERS,
    "notifiers.*.token": Apply.NOTIFIERS,
    "notifiers.*.channel": Apply.NOTIFIERS,
    "notifiers.*.api_url": Apply.NOTIFIERS,
    "notifiers.*.proxy": Apply.NOTIFIERS,
    "notifiers.*.host": Apply.NOTIFIERS,
    "notifiers.*.port": Apply.NOTIFIERS,
    "notifiers.*.tls": Apply.NOTIFIERS,
    "notifiers.*.ca_file": Apply.NOTIFIERS,
    "notifiers.*.username": Apply.NOTIFIERS,
    "notifiers.*.password": Apply.NOTIFIERS,
    "notifiers.*.from": Apply.NOTIFIERS,
    "notifiers.*.to": Apply.NOTIFIERS,
    "notifiers.*.timeout": Apply.NOTIFIERS,
    "notifiers.*.url": Apply.NOTIFIERS,
    "notifiers.*.secret": Apply.NOTIFIERS,
    "notifiers.*.headers": Apply.NOTIFIERS,
    "notifiers.*.routing_key": Apply.NOTIFIERS,
    "notifiers.*.notices": Apply.NOTIFIERS,
    "notifiers.*.resend_every": Apply.NOTIFIERS,
    "notifiers.*.quiet_hours.timezone": Apply.DELIVERY,
    "notifiers.*.quiet_hours.from": Apply.DELIVERY,
    "notifiers.*.quiet_hours.to": Apply.DELIVERY,
    "notifiers.*.quiet_hours.days": Apply.DELIVERY,
    "notifiers.*.quiet_hours.except": Apply.DELIVERY,
    # rules.*: evaluated by every cycle; what is kept settled follows them
    "rules.*.name": Apply.RULES,
    "rules.*.type": Apply.RULES,
    "rules.*.notify": Apply.RULES,
    "rules.*.orgs": Apply.RULES,
    "rules.*.severity": Apply.RULES,
    "rules.*.repeat": Apply.RULES,
    "rules.*.send_resolved": Apply.RULES,
    "rules.*.enabled": Apply.RULES,
    "rules.*.statuses": Apply.RULES,
    "rules.*.threshold": Apply.RULES,
    "rules.*.from": Apply.RULES,
    "rules.*.to": Apply.RULES,
    "rules.*.percent": Apply.RULES,
    "rules.*.window": Apply.RULES,
    "rules.*.budget": Apply.RULES,
    "rules.*.min_elapsed": Apply.RULES,
    "rules.*.after": Apply.RULES,
    "rules.*.by": Apply.RULES,
    "rules.*.baseline": Apply.RULES,
    "rules.*.min_increase": Apply.RULES,
    "rules.*.sensitivity": Apply.RULES,
    # usage.* and reports.*: checked, not acted on yet (issue 19); read when they are
    "usage.refresh": Apply.CYCLE,
    "reports.*.name": Apply.CYCLE,
    "reports.*.schedule": Apply.CYCLE,
    "reports.*.timezone": Apply.CYCLE,
    "reports.*.notify": Apply.CYCLE,
    "reports.*.orgs": Apply.CYCLE,
    "reports.*.combined": Apply.CYCLE,
    "reports.*.enabled": Apply.CYCLE,
    "http.listen": Apply.HTTP,
    "http.max_connections": Apply.HTTP,
    "http.idle_timeout": Apply.HTTP,
    "log.level": Apply.LOGGING,
    "log.format": Apply.LOGGING,
}


def keys(model: type[BaseModel] = Config) -> list[str]:
    """Every key of ``model``, dotted as in the file (``*`` for a list item or a
    mapping's name), through every member of a union (each notifier and rule type)."""
    return sorted(set(_keys(model, "")))


def _keys(tp: Any, prefix: str) -> Iterator[str]:
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin in (Union, UnionType):
        for member in get_args(tp):
            if member is not NoneType:
                yield from _keys(member, prefix)
    elif origin is list and _is_model_like(get_args(tp)[0]):
        yield from _keys(get_args(tp)[0], f"{prefix}*.")
    elif origin is dict and _is_model_like(get_args(tp)[1]):
        yield from _keys(get_args(tp)[1], f"{prefix}*.")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, field in tp.model_fields.items():
            yield from _keys(field.annotation, f"{prefix}{field.alias or name}.")
    else:
        yield prefix.removesuffix(".")


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model_like(tp: Any) -> bool:
    """A model, or a union with a model among its members (a list of those has keys)."""
    tp = _unwrap(tp)
    if get_origin(tp) in (Union, UnionType):
        return any(_is_model_like(m) for m in get_args(tp))
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def values(config: Config, key: str, *, given: bool = False) -> dict[str, object]:
    """The values of ``key`` (a pattern of :data:`APPLY`) in ``config``, by concrete
    path: ``values(c, "notifiers.*.to") == {"notifiers.mail.to": [...]}``. A section or
    a union member without the key has no value. ``given``: only the values the file
    sets (not the defaults)."""
    out: dict[str, object] = {}
    _values(config, key.split("."), (), out, given)
    return out


def _values(
    value: object, parts: list[str], path: tuple[str, ...], out: dict[str, object], given: bool
) -> None:
    if not parts:
        out[".".join(path)] = value
        return
    part, rest = parts[0], parts[1:]
    if part == "*":
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            return
        for name, item in items:
            _values(item, rest, (*path, name), out, given)
        return
    if not isinstance(value, BaseModel):  # an absent optional section
        return
    fields = type(value).model_fields
    field = next((n for n, f in fields.items() if part in (n, f.alias)), None)
    if field is None or (given and not rest and field not in value.model_fields_set):
        return
    _values(getattr(value, field), rest, (*path, part), out, given)


def changes(old: Config, new: Config, *, given: bool = False) -> dict[str, Apply]:
    """The keys whose values differ between ``old`` and ``new`` (concrete paths, e.g.
    ``notifiers.mail.to``), each with how a reload applies it. ``given``: only those
    that one of the two files sets (what a person changed: renaming a webhook notifier
    changes its ``token`` from unset to absent, which is no news)."""
    changed: dict[str, Apply] = {}
    for key, how in APPLY.items():
        before, after = values(old, key), values(new, key)
        if given:
            named = values(old, key, given=True).keys() | values(new, key, given=True).keys()
        for path in sorted(before.keys() | after.keys()):
            if before.get(path, _ABSENT) != after.get(path, _ABSENT) and (
                not given or path in named
            ):
                changed[path] = how
    return changed


_ABSENT = object()
