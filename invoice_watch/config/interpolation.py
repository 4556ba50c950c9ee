"""``${VAR}`` interpolation of the configuration's scalar values, as the Compose
specification defines it (https://compose-spec.io, "Interpolation"): ``${NAME}``,
``${NAME:-default}`` / ``${NAME-default}``, ``${NAME:?message}`` / ``${NAME?message}``,
and ``$$`` for a literal ``$``; a ``$`` before anything else stays as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from urllib.parse import quote

_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bad>\{))"
)


class InterpolationError(Exception):
    """A ``${...}`` that cannot be replaced; the message says what to set or write."""


def interpolate(
    text: str,
    env: Mapping[str, str],
    *,
    limit: int | None = None,
    encode: Callable[[str], str] | None = None,
) -> str:
    """``text`` with every ``${...}`` replaced from ``env``; raises InterpolationError,
    also when the result would be longer than ``limit`` characters (a value that names
    a long variable thousands of times), before building it. ``encode``: applied to
    each value put in (a URL's percent-encoding)."""

    def substitute(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        if m["bad"]:
            raise InterpolationError(
                "invalid ${...}: write ${NAME}, ${NAME:-default} or ${NAME:?message}, "
                "and $$ for a literal $"
            )
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None and value is None:
            raise InterpolationError(
                f"environment variable {name} is not set; set it, or give a default "
                f"with ${{{name}:-default}}"
            )
        if op is not None and op.endswith("-") and missing:
            return str(arg)
        if op is not None and op.endswith("?") and missing:
            raise InterpolationError(f"{name}: {arg or 'environment variable is not set'}")
        return str(value)

    parts: list[str] = []
    size = end = 0
    for m in _VARIABLE.finditer(text):
        value = substitute(m)
        if encode is not None and not m["dollar"]:
            value = encode(value)
        for part in (text[end : m.start()], value):
            size += len(part)
            parts.append(part)
        end = m.end()
        if limit is not None and size > limit:
            raise InterpolationError(
                f"the value is longer than {limit:,} characters once its ${{...}} are "
                "replaced; is a variable named many times, or a variable too long?"
            )
    parts.append(text[end:])
    return "".join(parts)


def variables(text: str) -> list[str]:
    """The names of the variables that ``text`` refers to, in order."""
    return [m["name"] for m in _VARIABLE.finditer(text) if m["name"]]


def interpolate_url(text: str, env: Mapping[str, str], *, limit: int | None = None) -> str:
    """A URL (``scheme://user:password@host/...``) with every ``${...}`` replaced, those
    in its user info (before the authority's ``@``) percent-encoded (RFC 3986 §3.2.1):
    a password with ``@``, ``/``, ``#``, ``%``, ``:``, ``?`` or ``+`` in a variable is
    given as it is, and never read as a host or a path."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return interpolate(text, env, limit=limit)
    # The authority ends at the template's first /, ? or # (a ${...}'s value is not
    # looked at); the user info at its last @.
    masked = _VARIABLE.sub(lambda m: "x" * len(m[0]), rest)
    end = min((i for i in (masked.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = masked.rfind("@", 0, end)
    if at < 0:
        return interpolate(text, env, limit=limit)
    head = interpolate(rest[:at], env, limit=limit, encode=lambda v: quote(v, safe=""))
    tail = interpolate(rest[at + 1 :], env, limit=limit)
    return f"{scheme}://{head}@{tail}"
