"""Which forward proxy an outbound HTTP request goes through: the one answer for the
Atlas client (its OAuth token request included) and the Slack notifiers.

A configured proxy (``atlas.proxy``, ``notifiers.<name>.proxy``) wins. Otherwise the
environment decides, as curl and most tools read it: ``http_proxy``/``HTTP_PROXY`` for
``http://`` URLs, ``https_proxy``/``HTTPS_PROXY`` for ``https://`` ones (the lowercase
name first), and ``no_proxy``/``NO_PROXY`` lists the hosts reached directly: ``*``,
host names (``example.com`` also covers its subdomains; a leading ``.`` or ``*.`` is
allowed), IP addresses and CIDR ranges (``10.0.0.0/8``, ``::1``), each optionally with
``:port``. Loopback (``localhost`` and names under it, ``127.0.0.0/8``, ``::1``) is
always reached directly, as Go's net/http and most tools do: a proxy elsewhere cannot
reach this machine's own servers (the demo's simulator, ``simulate``). A configured
proxy still applies there: the operator asked for it.

Why not aiohttp's ``trust_env=True``: it also reads ``~/.netrc`` and sends its
password as ``Authorization: Basic`` to any matching host, and it does not understand
CIDR ranges in ``NO_PROXY``. slack-sdk reads ``HTTPS_PROXY`` but ignores ``NO_PROXY``.

User info in a proxy URL (``http://user:password@proxy:3128``) becomes the
``Proxy-Authorization`` header sent to the proxy only. It is a credential as a whole
(some proxies take a token as the user name: ``http://APIKEY:@proxy``): the user name
and the password are registered with :mod:`invoice_watch.redact`, and :func:`masked`
shows neither, so that no log line, stored error or summary shows them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from invoice_watch import redact
from invoice_watch.concealed import Concealed

_NOT_A_PROXY = "is not a proxy URL: write it like http://proxy.example.com:3128"


def check_proxy_url(value: str) -> str:
    """``value`` if it is a usable proxy URL (``http://[user:password@]host[:port]``, or
    ``https://``), else :class:`ValueError` saying what is wrong. Registers the password
    for redaction. A URL without a scheme (``proxy:3128``, as some environments write
    it) is read as ``http://``."""
    text = value.strip()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        # urlsplit drops CR, LF and tabs silently; the URL given would still carry them.
        raise ValueError("contains a space or a control character: " + _NOT_A_PROXY)
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        # Not chained: the cause may quote the URL, and with it the proxy's password.
        raise ValueError(_NOT_A_PROXY) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(_NOT_A_PROXY)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path: write it like http://proxy.example.com:3128")
    if port == 0:
        raise ValueError("the proxy's port cannot be 0")
    for part in (parts.username, parts.password):
        if part:
            redact.register(unquote(part))
            redact.register(part)
    return text.rstrip("/")


def masked(url: str) -> str:
    """``url`` with its whole user info (user name and password: either may be the
    credential) replaced by ``<secret>``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact.REDACTED  # not a URL: nothing of it is shown
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{redact.REDACTED}@{host}").geturl()


class ProxyUrl(Concealed):
    """A configured proxy URL (``atlas.proxy``, ``notifiers.<name>.proxy``), checked by
    :func:`check_proxy_url`. ``url`` is the URL to use; ``repr``, ``str`` and JSON dumps
    show it with its user info masked. Usable as a pydantic field type (from ``str``)."""

    __slots__ = ()
    _expected = "expected a proxy URL like http://proxy.example.com:3128"

    def __init__(self, value: str) -> None:
        super().__init__(check_proxy_url(value))

    @property
    def url(self) -> str:
        return self._value

    def __str__(self) -> str:
        return masked(self._value)

    def __repr__(self) -> str:
        return repr(masked(self._value))


def _env(environ: Mapping[str, str], name: str) -> str | None:
    for key in (name.lower(), name.upper()):
        value = environ.get(key)
        if value is not None and value.strip():
            return value.strip()
    return None


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (the ``NO_PROXY`` syntax, see the module docstring) sends a
    request to ``host``:``port`` directly."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [::1]:8080
            inner, _, rest = entry[1:].partition("]")
            entry = inner
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:  # host:port (an IPv6 address has several colons)
            name, _, number = entry.partition(":")
            if number.isdigit():
                entry, entry_port = name, int(number)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = entry.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a name under it (RFC 6761
    §6.3), an address in ``127.0.0.0/8``, ``::1``, or an IPv4-mapped loopback address."""
    name = host.lower().strip("[]").rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def proxy_for(
    url: str, configured: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The proxy URL to send a request for ``url`` through, or None to go directly.

    ``configured``: the configuration's proxy for this client, which wins (loopback
    included); ``environ``: the environment (default ``os.environ``), never used for a
    :func:`loopback` host. An environment proxy URL that is not usable raises
    :class:`ValueError` naming the variable.
    """
    if configured:
        return configured
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or loopback(parts.hostname):
        return None
    name = f"{scheme}_proxy"
    value = _env(env, name)
    if value is None:
        return None
    no_proxy = _env(env, "no_proxy")
    port = parts.port or (443 if scheme == "https" else 80)
    if no_proxy and bypassed(parts.hostname, port, no_proxy):
        return None
    try:
        return check_proxy_url(value)
    except ValueError as exc:
        raise ValueError(f"{name.upper()} {exc}") from exc
