"""A configured value that holds a credential and never shows it: the one base of
:class:`~invoice_watch.config.Secret` (shown as ``<secret>``) and
:class:`~invoice_watch.proxy.ProxyUrl` (shown with its user info masked).

What such a value shows is its ``str`` alone: ``repr`` derives from it, and so does a
pydantic JSON dump (``model_dump_json``); a Python dump (``model_dump``) keeps the
object itself, so that validating the dump again gives the same configuration. The
value is had only by asking for it by name (``Secret.get()``, ``ProxyUrl.url``).
Registering the value with :mod:`invoice_watch.redact` is each subclass's: it knows
which parts of it are secret.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


class Concealed:
    """A text value that is never shown; compares and hashes by value (same class).
    Usable as a pydantic field type (from ``str``; an instance is taken as it is).

    A subclass defines ``__str__`` (what is shown); it checks its text in ``__init__``
    or :meth:`_from_text` (raising :class:`ValueError` without quoting it), and names
    what it expects in ``_expected``, the error for a value that is not text."""

    __slots__ = ("_value",)
    _expected: ClassVar[str] = "expected a text value (quote it)"

    def __init__(self, value: str) -> None:
        self._value = value

    def __str__(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return str(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json"),
        )

    @classmethod
    def _validate(cls, value: object) -> Self:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise ValueError(cls._expected)
        return cls._from_text(value)

    @classmethod
    def _from_text(cls, text: str) -> Self:
        return cls(text)
