"""The text values of the configuration, each checked for what its consumer accepts:
:class:`Secret`, and the ``Annotated`` types the models use for names, HTTP and SMTP
logins, host names, URLs, email addresses, Slack channels, organization ids, invoice
statuses, time zones, paths and ``http.listen``.

Every text value reaches a log line, and most reach an HTTP or SMTP header, so none may
hold a control character (a CR/LF from ``${VAR}`` would crash or inject a header).
Messages quote the value, except for secrets. Durations, sizes and money are in
:mod:`invoice_watch.config.quantities`.
"""

from __future__ import annotations

import base64
import email.policy
import functools
import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo
from yarl import URL

from invoice_watch import constants, redact
from invoice_watch.concealed import Concealed
from invoice_watch.report.schedule import zone

# (and lone surrogates, which a YAML escape "\ud800" or an undecodable ${VAR} makes:
# no text, and the models' encoding of them failed with a traceback)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def control_problem(value: str) -> str | None:
    """What is wrong with a control character in ``value`` (None if there is none)."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    char = found.group()
    what = (
        "a line break"
        if char in _LINE_BREAKS
        else "a tab"
        if char == "\t"
        else f"the lone surrogate U+{ord(char):04X}, which is no character"
        if "\ud800" <= char <= "\udfff"
        else f"the control character U+{ord(char):04X}"
    )
    return f"contains {what}; remove it"


def _text(value: str) -> str:
    if problem := control_problem(value):
        raise ValueError(problem)
    return value


class Secret(Concealed):
    """A secret string: ``get()`` returns it; ``repr``, ``str`` and JSON dumps show
    ``<secret>``. Compares by value. Usable as a pydantic field type (from ``str``)."""

    __slots__ = ()

    def __init__(self, value: str) -> None:
        super().__init__(value)
        redact.register(value)  # so that no server can echo it into a log

    def get(self) -> str:
        return self._value

    def __str__(self) -> str:
        return redact.REDACTED

    @classmethod
    def _from_text(cls, text: str) -> Secret:
        if not text:
            raise ValueError("the secret is empty; set it, or use `<key>_file: path`")
        if problem := control_problem(text):  # never the value itself: it is a secret
            raise ValueError(f"the secret {problem}")
        return cls(text)


MAX_NAME = 200


def _check_name(value: str) -> str:
    _text(value)
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > MAX_NAME:
        raise ValueError(f"is {len(value)} characters long; keep it under {MAX_NAME}")
    return value


# A name shown in messages, logs and email subjects: rules, organizations, notifiers.
Name = Annotated[str, AfterValidator(_check_name)]

# Visible ASCII but `:` (it ends the user name of Basic and Digest), and `"` and `\`:
# no Atlas key or client id has them, so one is a stray character from a quoting slip
# (aiohttp would escape them in Digest's `username="..."`, RFC 7616 §3.4).
_HEADER_TOKEN = re.compile(r"[!#-9;-\[\]-~]{1,256}")


def _matching(pattern: re.Pattern[str], problem: str) -> AfterValidator:
    """A check that the whole text (of a :class:`Secret` too) matches ``pattern``; else
    the error is the quoted value followed by ``problem``, or for a secret ``problem``
    alone: it never quotes a secret."""

    def check(value: str | Secret) -> str | Secret:
        secret = isinstance(value, Secret)
        text = value.get() if isinstance(value, Secret) else _text(value)
        if not pattern.fullmatch(text):
            raise ValueError(problem if secret else f"`{text}` {problem}")
        return value

    return AfterValidator(check)


# The user name of HTTP Digest (public_key) or Basic (client_id) authentication.
HttpLogin = Annotated[
    str,
    _matching(
        _HEADER_TOKEN,
        'cannot be an HTTP user name: use printable ASCII without spaces, `:`, `"` or '
        "`\\` (up to 256 characters); check for a stray character",
    ),
]


def _check_smtp_login(value: str) -> str:
    _text(value)
    if not value or len(value) > 256:
        raise ValueError("must be 1 to 256 characters long")
    return value


SmtpLogin = Annotated[str, AfterValidator(_check_smtp_login)]


_BEARER = re.compile(r"[A-Za-z0-9._~+/-]{1,1024}=*")  # b64token, RFC 6750 §2.1


# A secret sent as ``Authorization: Bearer <token>`` (Slack).
BearerToken = Annotated[
    Secret,
    _matching(
        _BEARER,
        "the token cannot be sent as `Authorization: Bearer`: it holds a space, a "
        "quote or another character tokens never have; copy it again",
    ),
]

_WHSEC = "whsec_"
_WHSEC_BYTES = (24, 64)  # Standard Webhooks 1.0, "Signature scheme": 192 to 512 bits
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_NOT_WHSEC = (
    "is not a Standard Webhooks signing secret: write whsec_ followed by the base64 of 24 "
    "to 64 random bytes, e.g. `echo whsec_$(openssl rand -base64 32)`, and give the "
    "receiver the same"
)


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64): the decoded
    bytes. :class:`ValueError` when it is not one (never quoting it)."""
    body = secret.removeprefix(_WHSEC)
    if body == secret or not _BASE64.fullmatch(body):
        raise ValueError(f"the secret {_NOT_WHSEC}")
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError as exc:  # (binascii's text never quotes the data)
        raise ValueError(f"the secret {_NOT_WHSEC}") from exc
    low, high = _WHSEC_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"the secret holds {len(key)} bytes and {_NOT_WHSEC}")
    return key


def _check_signing_secret(value: Secret) -> Secret:
    signing_key(value.get())
    # Receivers' libraries use the key without its prefix: a receiver echoing that
    # part alone must not show it either.
    redact.register(value.get().removeprefix(_WHSEC))
    return value


# A webhook's signing secret (Standard Webhooks: ``whsec_`` + base64 of 24 to 64 bytes).
SigningSecret = Annotated[Secret, AfterValidator(_check_signing_secret)]

_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")


# PagerDuty's Events API v2 integration key (``routing_key``).
RoutingKey = Annotated[
    Secret,
    _matching(
        _ROUTING_KEY,
        "a PagerDuty routing key is the 32 letters and digits of an Events API v2 "
        "integration's Integration Key (Service > Integrations); copy it again",
    ),
]

# RFC 9110 §5.6.2: a field name is a token.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Headers a webhook's own sending sets: configured ones may not replace them.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "transfer-encoding", "host",
     "connection", "user-agent", "webhook-id", "webhook-timestamp", "webhook-signature"}
)  # fmt: skip


def _check_header_name(value: str) -> str:
    _text(value)
    if not _FIELD_NAME.fullmatch(value):
        raise ValueError(
            f"`{value}` is not an HTTP header name: letters, digits and !#$%&'*+.^_`|~- "
            "only, up to 64"
        )
    if value.lower() in RESERVED_HEADERS:
        raise ValueError(f"`{value}` is set by invoice-watch itself; remove it")
    return value


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


def _check_header_value(value: Secret) -> Secret:
    text = value.get()
    if not text.isascii() or not text.isprintable() or text != text.strip():
        raise ValueError(
            "a header value must be printable ASCII without leading or trailing spaces"
        )
    return value


# A configured header's value: may be a credential, so a secret (never shown).
HeaderValue = Annotated[Secret, AfterValidator(_check_header_value)]

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@functools.lru_cache(maxsize=256)  # pure; tests and reloads load the same values
def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a DNS name (None when it is one)."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "is not a valid host name"
    labels = ascii_host.removesuffix(".").split(".")
    if len(ascii_host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return "is not a host name or an IP address"
    return None


def _check_host(value: str) -> str:
    _text(value)
    if problem := _host_problem(value):
        raise ValueError(f"`{value}` {problem}: write e.g. smtp.example.com or 192.0.2.10")
    return value


Hostname = Annotated[str, AfterValidator(_check_host)]


def _check_channel(value: str) -> str:
    _text(value)
    if not value or len(value) > 81 or any(c.isspace() for c in value):
        raise ValueError(
            f"`{value}` is not a Slack channel: give its name (#billing-alerts, no spaces, "
            "80 characters at most) or its id (C0123456789)"
        )
    return value


SlackChannel = Annotated[str, AfterValidator(_check_channel)]


@functools.lru_cache(maxsize=256)  # pure; tests and reloads load the same values
def _url_problem(value: str, *, endpoint: bool) -> str | None:
    """Why aiohttp cannot use ``value`` as a URL (None when it can). An ``endpoint`` is a
    base that paths are appended to: no user info, query or fragment."""
    if problem := control_problem(value):
        return problem
    if any(c.isspace() for c in value):
        return "contains a space"
    if not value.startswith(("https://", "http://")):
        return "does not start with https:// (or http://): write it like https://cloud.mongodb.com"
    try:
        url = URL(value)  # what aiohttp makes of it
        port = url.explicit_port
    except ValueError:  # yarl's message may quote a part of a secret URL
        return "is not a valid URL: check the host name and the port (1 to 65535)"
    if not url.raw_host or _host_problem(url.raw_host):
        return "has no valid host name: write it like https://cloud.mongodb.com"
    if port == 0:
        return "has port 0: give a port from 1 to 65535, or none"
    if endpoint and (url.user is not None or url.password is not None):
        return "holds user:password@: credentials go in their own settings"
    if endpoint and (url.query_string or url.fragment or "?" in value or "#" in value):
        return "has a query (?...) or a fragment (#...): give the base URL only"
    return None


def _check_url(value: str) -> str:
    if problem := _url_problem(value, endpoint=True):
        raise ValueError(f"`{value}` {problem}" if not _CONTROL.search(value) else problem)
    return value.rstrip("/")


# An http(s) base URL that paths are appended to (Atlas API and UI, Slack API).
Url = Annotated[str, AfterValidator(_check_url)]


def _check_secret_url(value: Secret) -> Secret:
    if problem := _url_problem(value.get(), endpoint=False):
        raise ValueError(f"the URL {problem}")  # never the value itself: it is a secret
    # Its token may be echoed alone: its path, its query and each query value are
    # secrets too (a Slack webhook's path, a Teams workflow's `sig=`).
    url = URL(value.get())
    for piece in (url.path, url.query_string, *url.query.values()):
        redact.register(piece)  # shorter than a secret can be: ignored
    return value


# A secret http(s) URL, used as it is (a Slack incoming webhook).
SecretUrl = Annotated[Secret, AfterValidator(_check_secret_url)]


@functools.lru_cache(maxsize=256)  # pure; tests and reloads load the same values
def _address_problem(value: str) -> str | None:
    """Why ``value`` is not one address the email package and SMTP accept."""
    if problem := control_problem(value):
        return problem
    try:
        header = email.policy.default.header_factory("To", value)
        addresses = header.addresses
    except Exception:  # the stdlib parser raises IndexError, ValueError...
        return _NOT_AN_ADDRESS
    if len(addresses) != 1:
        return "must be one address (give several as a list: [a@example.com, b@example.com])"
    address = addresses[0]
    if not address.username.isascii() or not address.domain.isascii():
        return (
            "has non-ASCII characters in the address: SMTP needs the domain in its "
            "xn-- form and an ASCII user part"
        )
    if header.defects or not address.username or not address.domain:
        return _NOT_AN_ADDRESS
    domain = address.domain
    literal = domain.startswith("[") and domain.endswith("]")
    if _host_problem(domain[1:-1] if literal else domain):
        return "has an invalid domain: write it like alerts@example.com"
    return None


_NOT_AN_ADDRESS = "is not an email address: write it like alerts@example.com"


def _check_address(value: str) -> str:
    if problem := _address_problem(value):
        raise ValueError(problem if _CONTROL.search(value) else f"`{value}` {problem}")
    return value


EmailAddress = Annotated[str, AfterValidator(_check_address)]


_ORG_ID = re.compile(r"[0-9a-f]{24}")


OrgId = Annotated[
    str,
    _matching(
        _ORG_ID,
        "is not an organization id: ids are 24 lowercase hex characters (Atlas UI: "
        "Organization Settings)",
    ),
]


def _check_status(value: str) -> str:
    _text(value)
    if value.upper() not in constants.INVOICE_STATUSES:
        raise ValueError(
            f"unknown invoice status `{value}`; use one of: "
            + ", ".join(constants.INVOICE_STATUSES)
        )
    return value.upper()


InvoiceStatus = Annotated[str, AfterValidator(_check_status)]


def _check_zone(value: str) -> str:
    zone(value)
    return value


# An IANA time zone name (``Europe/Paris``, ``UTC``): quiet hours, report schedules.
TimeZoneName = Annotated[str, AfterValidator(_check_zone)]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths resolve against the config file's folder (context ``base_dir``)."""
    _text(str(value))
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    return base / value if base is not None and not value.is_absolute() else value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


_LISTEN = re.compile(r"(?:\[(?P<ipv6>[^\[\]]+)\]|(?P<host>[^\[\]:]+)):(?P<port>[0-9]{1,5})")


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``http.listen``) -> (host, port); an IPv6 address in brackets,
    ``[::1]:9100``, as in a URL (RFC 3986 §3.2.2). Raises ValueError."""
    _text(listen)
    m = _LISTEN.fullmatch(listen)
    host = (m["ipv6"] or m["host"]) if m else ""
    ipv6 = m is not None and m["ipv6"] is not None
    if (
        m is None
        or _host_problem(host)
        or (ipv6 and ":" not in host)  # [name]:port
        or int(m["port"]) > 65535
    ):
        hint = (
            " (an IPv6 address goes in brackets: [::1]:9100)"
            if listen.count(":") > 1 or "[" in listen or "]" in listen
            else ""
        )
        raise ValueError(
            f"`{listen}` is not HOST:PORT{hint}: write e.g. 127.0.0.1:9100 (or 0.0.0.0:9100 "
            "to listen on every interface)"
        )
    return host, int(m["port"])
