"""Every exception invoice_watch raises on purpose, in one hierarchy::

    InvoiceWatchError
    ├── UsageError               a command-line argument names nothing that exists
    ├── ConfigError              bad configuration file (all problems at once)
    ├── StateError               the SQLite state file cannot be used
    │   ├── StateLockedError     another daemon holds the state file
    │   └── StateFileGoneError   the state file was deleted or replaced under the daemon
    ├── UnstorableError          a value read cannot be stored (that organization's fault)
    ├── FetchError               one organization's read failed
    │   ├── FetchTimeout         the API did not answer in time
    │   ├── FetchAuthError       401/403: wrong key or missing role (never retried)
    │   ├── FetchStatusError     any other unexpected HTTP status
    │   └── FetchDataError       the body is not what the API promises
    ├── ListenError              the HTTP endpoint cannot listen on http.listen
    └── NotifyError              a notification could not be sent
        ├── RetryableNotifyError   try again later (maybe after ``retry_after``; for
        │                          the recipients ``owed`` only, when some got it)
        └── PermanentNotifyError   retrying cannot help (bad token, SMTP 5xx)

Third-party exceptions (aiohttp, slack-sdk, aiosmtplib, sqlite3, psycopg) are converted
where our code calls the library, with ``raise ... from exc``; they never cross a module
boundary. Messages say what to do about the problem, and never contain a secret.

``raise ... from None`` is allowed in one case only: the cause's text may carry a secret
or data we redact (a URL with its password, a config line, a server's answer as it
came), and a traceback (the daemon logs one for an unexpected failure) would show it.
Such a site says so in a comment above it (``# Not chained: ...``); every other
conversion chains its cause. The CLI prints an error's message, never its cause or a
traceback, so chaining changes no output.
"""

from __future__ import annotations

from dataclasses import dataclass


class InvoiceWatchError(Exception):
    """Base of every error raised by invoice_watch."""


class UsageError(InvoiceWatchError):
    """A command-line argument is wrong (an unknown organization or status): exit 2.
    The message lists what would be accepted."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file, located by file, line and column (from 1)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(InvoiceWatchError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(InvoiceWatchError):
    """The state file cannot be opened, migrated or written."""


class StateLockedError(StateError):
    """Another invoice-watch daemon is using the same state file."""


class StateFileGoneError(StateError):
    """The open state file is no longer the file at ``state.path`` (deleted, moved or
    replaced while the daemon ran): the daemon must stop (see Store.check_held)."""


class NotLeaderError(StateError):
    """A replica that does not hold the lease (PostgreSQL, ``ha``) tried to write: its
    fencing token is not the lease's, so the transaction wrote nothing."""


class UnstorableError(InvoiceWatchError):
    """The state file cannot take a value that was read (a string UTF-8 cannot encode, an
    integer beyond 64 bits): the fault is the data's, not the file's, so the cycle fails
    the part of the organization whose data it is, and commits the others."""


class FetchError(InvoiceWatchError):
    """Reading one organization's invoices failed; other organizations are unaffected."""

    def __init__(self, org_id: str, message: str) -> None:
        self.org_id = org_id
        super().__init__(f"organization {org_id}: {message}")


class FetchTimeout(FetchError):
    """The Atlas API did not answer in time."""


class FetchAuthError(FetchError):
    """401 or 403: the credentials are wrong or lack a role. Not retried."""


class FetchStatusError(FetchError):
    """An HTTP status the client cannot use."""

    def __init__(self, org_id: str, status: int, message: str) -> None:
        self.status = status
        super().__init__(org_id, message)


class FetchDataError(FetchError):
    """The response body is malformed or does not match the API's schema."""


class NotifyError(InvoiceWatchError):
    """A notification could not be delivered."""


class RetryableNotifyError(NotifyError):
    """A transient failure; ``retry_after`` (seconds) is the receiver's wish, if it said.
    ``owed``: when the failure is only some recipients' (an email some recipients took,
    or that was for some only, and that others refused for now), those recipients: the
    next attempt is for them alone, and the notifier's other messages are not held up
    by it (its server works). None when the failure is the whole attempt's."""

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        owed: tuple[str, ...] | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.owed = owed
        super().__init__(message)


class PermanentNotifyError(NotifyError):
    """Retrying cannot help: the notifier's settings or the receiver refused for good."""


class ListenError(InvoiceWatchError):
    """The HTTP endpoint cannot listen on ``http.listen`` (port in use, no permission)."""
