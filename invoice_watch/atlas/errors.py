"""What each Atlas answer means for the operator: the one table of fixes.

:data:`FIXES` maps an answer (HTTP status and Atlas ``errorCode``), a transport failure
(connection refused, DNS, TLS, timeout, proxy) or a bound of this package to what is
wrong and what to do about it; :func:`explain` fills one in. :func:`classify_status` is
the one place where an HTTP status is retried or given up on. :class:`Explainer` knows
the configuration's side of a message (which credentials, which config keys, the proxy,
the organization's name) and turns an error answer, a transport exception, a token
endpoint's refusal or an unforeseen exception into the message of a
:class:`~invoice_watch.errors.FetchError`.

Text taken from a server (an error's ``detail``, a header, a Location) goes through
:func:`~invoice_watch.safe_text.server_text` before it is logged or stored: redacted,
escaped, on one line, short.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp
from yarl import URL

from invoice_watch.atlas.bounds import INT64_MAX
from invoice_watch.constants import (
    API_PREFIXES,
    LINKED_INVOICES_ROLES,
    OAUTH_TOKEN_PATH,
    REQUIRED_ROLE,
    V2_API_VERSION,
)
from invoice_watch.errors import FetchDataError
from invoice_watch.proxy import masked
from invoice_watch.safe_text import server_text, traceback_text

if TYPE_CHECKING:
    from invoice_watch.config import AtlasConfig

log = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_IP_CANDIDATE = re.compile(r"[0-9A-Fa-f:.]{3,45}")


class Decision(enum.Enum):
    """What to do with an HTTP status: the one place retry-or-give-up is decided."""

    OK = "ok"
    RETRY_AFTER = "retry-after"  # honour Retry-After when given, else back off
    BACKOFF = "backoff"  # exponential backoff with jitter
    AUTH = "auth"  # 401/403: credentials or role; never retried
    FAIL = "fail"  # retrying cannot help (a redirect, 404, 410, ...)


def classify_status(status: int) -> Decision:
    if 200 <= status < 300:
        return Decision.OK
    if status in (429, 503):
        return Decision.RETRY_AFTER
    if status in (401, 403):
        return Decision.AUTH
    if status >= 500 or status == 408:
        return Decision.BACKOFF
    return Decision.FAIL


# (HTTP status, Atlas `errorCode`) -> what is wrong and what to do about it. A status
# without a row of its own uses (status, None), then its class, (400, None) or (500, None).
# Rows whose key is a word are the answers that are not an HTTP status: the transport
# (connection refused, DNS, TLS, timeout, proxy), the OAuth token endpoint, redirects and
# the bounds of this package. Fields: {org} ("Name (id)"), {org_id}, {credentials} (API
# key or service account), {where} (its config keys), {role}, {linked_roles}, {ip}
# (" 203.0.113.5" when Atlas named it), {version}, {host}, {port}, {cause}, {timeout},
# {via} (", through the proxy ..."), {proxy}, {location}, {limit}, {page}, {cap}.
FIXES: Final[dict[tuple[int | str, str | None], str]] = {
    (401, None): (
        "Atlas refused the credentials: the {credentials} is wrong or was revoked, its "
        "secret is wrong, or it expired; check {where}"
    ),
    ("token", None): (
        "the OAuth token endpoint refused the service account: its client_id or "
        "client_secret is wrong, or the service account was deleted or its secret expired; "
        "check {where}"
    ),
    # RFC 6749 §5.2 error codes other than invalid_client / invalid_grant /
    # unauthorized_client (the "token" row): the request itself was refused as
    # malformed, which no credential fixes.
    ("token_request", None): (
        "the OAuth token endpoint refused the token request itself as malformed ({code}), "
        "not the service account's credentials: something between this machine and "
        "Atlas may alter requests (a proxy: atlas.proxy, or HTTPS_PROXY), or "
        "atlas.base_url names another server; if neither, report it as a bug"
    ),
    ("token_atlas", None): (
        "the OAuth token endpoint refused the service account with Atlas's "
        "{atlas_code}; check the service account in the Atlas UI (Organization Access "
        "Manager > Applications > Service Accounts) and {where}"
    ),
    ("token_not_oauth", None): (
        "the OAuth token endpoint {url} answered with something that is not an OAuth "
        "token ({content_type}): a proxy or a captive portal may be answering in Atlas's "
        "place, or atlas.base_url may name another server"
    ),
    ("not_atlas", None): (
        "{what} is not Atlas's ({content_type}, not an Atlas error): something between "
        "this machine and Atlas answered instead (a proxy, a firewall or a captive "
        "portal); check atlas.base_url and the proxy (atlas.proxy, or "
        "HTTPS_PROXY/HTTP_PROXY and NO_PROXY)"
    ),
    ("base_path", None): (
        "Atlas has no {url}: atlas.base_url ({base_url}) has a path, and invoice-watch "
        "adds the API's ({prefix}) itself; set atlas.base_url to {origin}"
    ),
    (403, "IP_ADDRESS_NOT_ON_ACCESS_LIST"): (
        "Atlas refused requests from this machine's IP address{ip}: add it to the API "
        "access list of the {credentials} (Atlas: Organization Access Manager > "
        "Applications > the API key or service account > API Access List)"
    ),
    (403, "ORG_REQUIRES_ACCESS_LIST"): (
        "{org} requires an API access list and the {credentials} has none: add this "
        "machine's IP address{ip} to its API access list"
    ),
    (403, None): (
        "the {credentials} may not read the invoices of {org}: grant it the {role} role on "
        "this organization ({linked_roles} to see its linked invoices too)"
    ),
    (404, "INVOICE_NOT_FOUND"): "Atlas no longer knows this invoice of {org}",
    (404, None): (
        "Atlas knows no organization {org_id} that the {credentials} can see: check "
        "organizations[].id in the configuration against the id in the organization's "
        "settings, and that the {credentials} belongs to that organization"
    ),
    (407, None): (
        "the proxy {proxy} wants credentials it was not given or refused them: check the "
        "user and password in its URL (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY)"
    ),
    (406, None): (
        "Atlas does not accept the API version this release of invoice-watch speaks "
        "({version}): upgrade invoice-watch"
    ),
    (410, None): (
        "Atlas retired the API version this release of invoice-watch speaks ({version}): "
        "upgrade invoice-watch"
    ),
    (429, None): (
        "Atlas kept rate-limiting the requests: lower atlas.max_concurrency or poll less "
        "often, or share the {credentials} with fewer clients"
    ),
    ("rate_limited", None): (
        "Atlas is rate-limiting the requests (should it go on: lower "
        "atlas.max_concurrency or poll less often, or share the {credentials} with fewer "
        "clients)"
    ),
    (400, None): (
        "Atlas refused the request: this release may not speak this Atlas (upgrade "
        "invoice-watch) or it is a bug (please report it with this message)"
    ),
    (500, None): "Atlas failed to answer (an error on its side)",
    ("redirect", None): (
        "Atlas answered with a redirect to {location}, which invoice-watch does not follow "
        "(credentials never leave atlas.base_url): if the API lives there, set "
        "atlas.base_url to it"
    ),
    ("refused", None): (
        "cannot connect to {host}:{port}{via}: connection refused (nothing listens "
        "there); check atlas.base_url"
    ),
    ("dns", None): (
        "the host name {host} does not resolve ({cause}); check atlas.base_url and this "
        "machine's DNS"
    ),
    ("tls", None): (
        "TLS with {host}:{port} failed ({cause}); check atlas.base_url, and behind a "
        "TLS-inspecting proxy add its CA to the system's trust store (or SSL_CERT_FILE)"
    ),
    ("timeout", None): "no answer within {timeout} (atlas.timeout) from {host}:{port}{via}",
    ("unreachable", None): (
        "cannot connect to {host}:{port}{via} ({cause}); check the network route and firewalls"
    ),
    ("broken", None): "the connection to {host}:{port}{via} broke off ({cause})",
    ("proxy", None): (
        "cannot go through the proxy {proxy} ({cause}); check atlas.proxy, or "
        "HTTPS_PROXY/HTTP_PROXY and NO_PROXY"
    ),
    ("proxy_plain", None): (
        "TLS with the proxy {proxy} failed ({cause}): it speaks plain HTTP; write its URL "
        "with http:// (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY), as is usual even for "
        "https:// requests, which go through it encrypted all the same"
    ),
    ("proxy_auth", None): (
        "the proxy {proxy} refused the request ({cause}); check the user and password in "
        "its URL (atlas.proxy, or HTTPS_PROXY/HTTP_PROXY)"
    ),
    ("too_large", None): (
        "the answer is larger than {limit} (atlas.max_response_size) and was dropped: a "
        "page of Atlas's listing is far smaller, so something else may be answering (a "
        "proxy, a captive portal); raise atlas.max_response_size if it really is Atlas"
    ),
    ("too_many_values", None): (
        "the answer holds up to {values} JSON values, more than the {cap} allowed (one per "
        "{per} bytes of atlas.max_response_size), and was dropped unparsed: Atlas's "
        "answers hold far fewer, so something else may be answering; raise "
        "atlas.max_response_size if it really is Atlas"
    ),
    ("repeated_page", None): (
        "page {page} of the listing repeats invoices of earlier pages only: the server "
        "ignores pageNum; the listing was stopped"
    ),
    ("page_cap", None): "the listing did not end within {cap} pages; it was stopped",
    ("unexpected", None): (
        "reading or parsing the answer failed unexpectedly ({cause}); the traceback is in the log"
    ),
}


class _Fields(dict[str, str]):
    """Format fields; one a message does not know reads as ``?``."""

    def __missing__(self, key: str) -> str:
        return "?"


# RFC 6749 §5.2 codes saying the token request was malformed, not that the client's
# credentials were wrong (invalid_client), or its grant refused (invalid_grant,
# unauthorized_client).
_MALFORMED_TOKEN_REQUEST = frozenset({"invalid_request", "unsupported_grant_type", "invalid_scope"})


def explain(status: int | str, error_code: str | None = None, **fields: str) -> str:
    """What to fix for an Atlas answer (``status`` and ``errorCode``) or for one of the
    word-keyed rows of :data:`FIXES`, with ``fields`` filled in."""
    for key in (
        (status, error_code),
        (status, None),
        ((status // 100) * 100 if isinstance(status, int) else status, None),
    ):
        template = FIXES.get(key)
        if template is not None:
            return template.format_map(_Fields(fields))
    return f"Atlas answered HTTP {status}"


def size_text(limit: int) -> str:
    """A byte count as the configuration writes it: ``16 MiB``, ``64 KiB``."""
    return f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit / 2**10:g} KiB"


def foreign(content_type: str) -> bool:
    """Whether an error answer's media type says a web page or text, not the JSON of an
    Atlas (or OAuth) error: a proxy's, a firewall's or a captive portal's answer."""
    media = content_type.lower()
    return media.startswith("text/") or "html" in media


@dataclass(frozen=True, slots=True)
class ApiError:
    """What an error answer's ``ApiError`` body says (all optional)."""

    code: str | None = None
    detail: str = ""  # through server_text
    parameters: tuple[str, ...] = ()  # through server_text

    def evidence(self, status: int) -> str:
        """``HTTP 403 IP_ADDRESS_NOT_ON_ACCESS_LIST: <detail>``."""
        text = f"HTTP {status}"
        if self.code:
            text += f" {self.code}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def ip(self) -> str:
        """The first IP address named by the detail or the parameters, else ``""``."""
        for text in (self.detail, *self.parameters):
            for candidate in _IP_CANDIDATE.findall(text):
                try:
                    return str(ipaddress.ip_address(candidate.strip(".:")))
                except ValueError:
                    continue
        return ""

    def ip_field(self) -> str:
        """The ``{ip}`` field of :data:`FIXES`: `` 203.0.113.5``, or ``""``."""
        ip = self.ip()
        return f" {ip}" if ip else ""


def parse_api_error(body: bytes) -> ApiError:
    """An error answer's ``ApiError`` (``errorCode``, ``detail``, ``parameters``: Atlas
    sends strings and numbers there, the spec says objects); empty when the body is not
    one. Never raises."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ApiError()
    if not isinstance(data, dict):
        return ApiError()
    code = data.get("errorCode")
    detail = data.get("detail")
    if not isinstance(detail, str):
        detail = data.get("reason") if isinstance(data.get("reason"), str) else ""
    raw = data.get("parameters")
    parameters = (
        [p for p in raw[:10] if type(p) is str or (type(p) is int and abs(p) <= INT64_MAX)]
        if isinstance(raw, list)
        else []
    )
    return ApiError(
        code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None,
        server_text(detail),
        tuple(server_text(str(p), 60) for p in parameters),
    )


class Explainer:
    """The configuration's side of every message: which credentials (API key or service
    account) and their config keys, the API version, the timeout, the proxy requests go
    through (``proxy``, None for none), the organizations' names (``org_names``)."""

    def __init__(
        self, config: AtlasConfig, org_names: Mapping[str, str], proxy: str | None
    ) -> None:
        from invoice_watch.config import DigestAuth  # see Transport.__init__

        digest = isinstance(config.auth, DigestAuth)
        self.credentials = "API key" if digest else "service account"
        self.where = (
            "atlas.auth.public_key and private_key (or private_key_file)"
            if digest
            else "atlas.auth.client_id and client_secret (or client_secret_file)"
        )
        self.version = V2_API_VERSION if config.api == "v2" else f"{config.api} (v1.0)"
        self.base = config.base_url.rstrip("/")
        self.prefix = API_PREFIXES[config.api]
        self.proxy = proxy
        self._timeout = f"{config.timeout.total_seconds():g}s"
        self._org_names = dict(org_names)

    def org_label(self, org_id: str) -> str:
        """``Name (id)``, or the id of an organization without a name."""
        name = self._org_names.get(org_id)
        return f"{name} ({org_id})" if name and name != org_id else org_id

    def fields(self, org_id: str, url: URL) -> dict[str, str]:
        """What :func:`explain` may name about a request of ``org_id`` to ``url``."""
        return {
            "org": self.org_label(org_id),
            "org_id": org_id,
            "credentials": self.credentials,
            "where": self.where,
            "role": REQUIRED_ROLE,
            "linked_roles": LINKED_INVOICES_ROLES,
            "version": self.version,
            "host": url.host or "?",
            "port": str(url.port),
            "timeout": self._timeout,
            "via": f", through the proxy {masked(self.proxy)}" if self.proxy else "",
            "proxy": masked(self.proxy) if self.proxy else "?",
            "ip": "",
        }

    def answer(
        self,
        status: int,
        error: ApiError,
        content_type: str,
        fields: dict[str, str],
        *,
        url: str,
        throttled: int,
    ) -> str:
        """What to fix for an error answer (not a redirect) to ``url``, with its
        ``ApiError``: its row of :data:`FIXES`; a first 429 (``throttled`` is how many
        came in a row) is only rate-limiting, a 404 under an ``atlas.base_url`` that has
        a path is that path, and a refusal that is a web page is not Atlas's."""
        if status == 404 and URL(self.base).path not in ("", "/"):
            return explain(
                "base_path",
                url=url,
                base_url=self.base,
                prefix=self.prefix,
                origin=str(URL(self.base).origin()),
            )
        if throttled == 1:  # not "kept rate-limiting" yet
            return explain("rate_limited", **fields)
        if (
            classify_status(status) in (Decision.AUTH, Decision.FAIL)
            and status != 407
            and error.code is None
            and foreign(content_type)
        ):
            return explain(
                "not_atlas", what="the answer", content_type=server_text(content_type, 60)
            )
        return explain(status, error.code, **{**fields, "ip": error.ip_field()})

    def transport(self, exc: BaseException, url: URL) -> tuple[str, dict[str, str]]:
        """The :data:`FIXES` row of a request that got no usable answer, and its fields:
        host and port (of the proxy when it is the one that failed) and the cause."""
        host, port = url.host or "?", url.port
        if isinstance(exc, aiohttp.ClientConnectorError):
            host, port = exc.host, exc.port
        os_error = getattr(exc, "os_error", None)
        strerror = getattr(os_error, "strerror", None) or str(os_error or exc)
        fields = {"host": host, "port": str(port), "cause": server_text(strerror, 120)}
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            fields["cause"] = f"HTTP {exc.status}"
            return ("proxy_auth" if exc.status == 407 else "proxy"), fields
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return "proxy", fields
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return "dns", fields
        proxy = URL(self.proxy) if self.proxy else None
        if isinstance(exc, aiohttp.ClientSSLError):
            if proxy is not None and (host, port) == (proxy.host, proxy.port):
                # TLS with the proxy itself (an https:// proxy URL) failed.
                plain = getattr(os_error, "reason", None) == "WRONG_VERSION_NUMBER"
                return ("proxy_plain" if plain else "proxy"), fields
            return "tls", fields
        if isinstance(exc, TimeoutError):
            if proxy is not None and proxy.scheme == "https":
                fields["via"] = (
                    f", through the proxy {masked(self.proxy or '')} (its URL says "
                    "https://, but most proxies speak plain HTTP: then write http://)"
                )
            return "timeout", fields
        if isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(os_error, ConnectionRefusedError):
                return "refused", fields
            return "unreachable", fields
        if isinstance(exc, aiohttp.ClientPayloadError):
            fields["cause"] = "the answer was cut short"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            fields["cause"] = "the server closed the connection"
        elif not isinstance(exc, aiohttp.ClientOSError):
            fields["cause"] = type(exc).__name__
        return "broken", fields

    def token_refused(
        self, status: int, code: str, api: ApiError, content_type: str, fields: dict[str, str]
    ) -> str:
        """What to fix when the OAuth token endpoint refused the token request (HTTP
        ``status``, RFC 6749 ``error`` ``code``, the Atlas ``ApiError`` it may hold instead):
        what its Atlas ``errorCode`` means when :data:`FIXES` has a row for it (an API
        access list, say), a word that the answer is not Atlas's (a proxy's or a
        firewall's page), else that the service account was refused; with the evidence."""
        if api.code and (status, api.code) in FIXES:
            fix = explain(status, api.code, **{**fields, "ip": api.ip_field()})
            return f"{fix} (the OAuth token endpoint: {api.evidence(status)})"
        if not code and not api.code and foreign(content_type):
            fix = explain(
                "not_atlas",
                what="the OAuth token endpoint's answer",
                content_type=server_text(content_type, 60),
            )
            return f"{fix} (HTTP {status})"
        if api.code:  # Atlas's own refusal, of a kind the table does not know
            fix = explain("token_atlas", **{**fields, "atlas_code": api.code})
            return f"{fix} ({api.evidence(status)})"
        cause = f"HTTP {status}" + (f" {code}" if code else "")
        if code in _MALFORMED_TOKEN_REQUEST:
            return f"{explain('token_request', **{**fields, 'code': code})} ({cause})"
        return f"{explain('token', **fields)} ({cause})"

    def token_unavailable(self, content_type: str, *, not_oauth: bool) -> str:
        """What to fix when the OAuth token endpoint gave no token: another status, or
        (``not_oauth``) a 200 that is not an OAuth token answer."""
        if not not_oauth:
            return "the OAuth token endpoint failed"
        return explain(
            "token_not_oauth",
            url=self.base + OAUTH_TOKEN_PATH,
            content_type=server_text(content_type, 60),
        )

    def unexpected(self, org_id: str, doing: str, exc: BaseException) -> FetchDataError:
        """An exception no check foresaw, while ``doing`` something for ``org_id``:
        logged with its traceback (redacted), returned as that org's FetchError."""
        log.error(
            "%s: %s failed unexpectedly; this organization's read counts as failed:\n%s",
            self.org_label(org_id),
            doing,
            traceback_text(exc),
        )
        cause = server_text(f"{type(exc).__name__}: {exc}", 200)
        return FetchDataError(org_id, explain("unexpected", cause=cause))
