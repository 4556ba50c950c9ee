"""The PostgreSQL state's URL (``state.url``), its password (in the URL, e.g. as
``${PGPASSWORD}``, or ``state.password`` / ``state.password_file``), and how messages
name it: never with the password.

Everything else in the URL is libpq's: ``postgresql://user@host:port/dbname?sslmode=
verify-full&sslrootcert=/etc/ssl/ca.pem`` (the parameters go to libpq as they are;
https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


def display(url: str) -> str:
    """``url`` without its password (and without any ``password=`` parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}"
    query = "&".join(
        item for item in parts.query.split("&") if item and not item.startswith("password=")
    )
    return parts._replace(netloc=netloc, query=query).geturl()


@dataclass(frozen=True)
class StateUrl:
    """A PostgreSQL state's URL and its password (None: in the URL, or none). Its repr
    and :attr:`display` never show the password."""

    url: str
    password: str | None = None

    @property
    def display(self) -> str:
        return display(self.url)

    def __repr__(self) -> str:
        return f"StateUrl({self.display!r})"

    __str__ = __repr__

    def conninfo(self) -> str:
        """What libpq connects with (the password added when given apart)."""
        from psycopg.conninfo import make_conninfo  # (psycopg is loaded when used)

        if self.password is None:
            return self.url
        return make_conninfo(self.url, password=self.password)

    def secrets(self) -> tuple[str, ...]:
        """The password, wherever it is given: redacted from every message."""
        found = [self.password] if self.password else []
        parts = urlsplit(self.url)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        from psycopg.conninfo import conninfo_to_dict

        try:
            given = conninfo_to_dict(self.url).get("password")
        except Exception:  # a malformed URL: config validation says why
            given = None
        if isinstance(given, str) and given:
            found.append(given)
        return tuple(found)
