"""The email notifier: one message (plain text + HTML alternatives) per ``send``, over
SMTP with STARTTLS, implicit TLS or none, via ``aiosmtplib``.

:func:`classify_smtp_error` is the one place that decides whether a failure is worth
retrying: 4xx replies, refused connections and timeouts are; 5xx replies, failed
authentication and TLS failures (untrusted certificate, wrong ``tls`` mode) are not.

A server answers each recipient on its own (RFC 5321 §4.2.5: RCPT TO), and the message
is the server's for those it accepted. So, per recipient, as an operator expects:

- accepted: done; never sent to again for this message (no duplicate);
- refused for now (4xx: greylisted, a full mailbox): retried, with the outbox's backoff
  until ``delivery.max_age``, for those recipients only: ``send`` raises
  :class:`RetryableNotifyError` with ``owed`` naming them, the outbox keeps the list,
  and the next ``send`` gets it as ``recipients`` (one no longer in ``to`` is dropped);
  the later messages do not wait for them (one full mailbox for days must not hold up
  everyone's alerts), and each carries its events' time as its ``Date``;
- refused for good (5xx: no such user): an ERROR line with the server's reply, once,
  and never tried again for this message; it holds up no one else. Only when every
  recipient is refused for good is the message failed
  (:class:`PermanentNotifyError`).

A server's reply text is the server's: it may echo the credentials (``535 … <base64 of
the password>``), and aiosmtplib decodes bytes that are not UTF-8 as lone surrogates.
Every error and warning goes through :func:`invoice_watch.safe_text.server_text` with
the password as a secret (its base64 forms, alone for AUTH LOGIN or with the user name
for AUTH PLAIN, are removed too): redacted, control characters escaped, bounded.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Literal

import aiosmtplib

from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify.base import BaseNotifier, Recipients
from invoice_watch.notify.render import plain
from invoice_watch.notify.render.email import email_html, email_subject
from invoice_watch.report.outbox import ReportMessage, report_email
from invoice_watch.safe_text import server_text
from invoice_watch.types import AlertEvent, Part

logger = logging.getLogger(__name__)

TlsMode = Literal["starttls", "implicit", "none"]

_MESSAGE_MAX = 400  # server replies can be long


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if any: aiosmtplib wraps some in SMTPConnectError."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__
    return None


def classify_smtp_error(exc: BaseException) -> type[NotifyError]:
    """Whether a failed SMTP delivery can succeed later."""
    tls_error = _ssl_error(exc)
    if tls_error is not None:
        # A connection cut mid-handshake is transient; every other TLS failure (the
        # certificate, the protocol) needs a change of settings.
        if isinstance(tls_error, ssl.SSLEOFError):
            return RetryableNotifyError
        return PermanentNotifyError
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # Any recipient refused for now (4xx) is worth retrying, for it alone.
        codes = [refused.code for refused in exc.recipients]
        temporary = any(400 <= code < 500 for code in codes)
        return RetryableNotifyError if temporary else PermanentNotifyError
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return RetryableNotifyError if 400 <= exc.code < 500 else PermanentNotifyError
    if isinstance(exc, TimeoutError | OSError):  # aiosmtplib's connection errors included
        return RetryableNotifyError
    # The server lacks something we need (AUTH, STARTTLS, SMTPUTF8): settings must change.
    return PermanentNotifyError


def group_message_id(events: Sequence[AlertEvent]) -> str:
    """A Message-ID for a grouped message, the same for the same events in any order."""
    if len(events) == 1:
        return events[0].message_id
    digest = hashlib.sha256("|".join(sorted(e.event_id for e in events)).encode())
    return f"<group-{digest.hexdigest()[:32]}@invoice-watch>"


class EmailNotifier(BaseNotifier):
    """Sends alert mail through one SMTP server to a fixed list of recipients."""

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        tls: TlsMode = "starttls",
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        from_addr: str,
        to: Sequence[str],
        timeout: float = 30,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.tls = tls
        self.ca_file = ca_file
        self.username = username
        self._password = password
        self.from_addr = from_addr
        self.to = list(to)
        self.timeout = timeout

    def __repr__(self) -> str:
        password = "<secret>" if self._password is not None else None
        return (
            f"EmailNotifier(name={self.name!r}, host={self.host!r}, port={self.port}, "
            f"tls={self.tls!r}, username={self.username!r}, password={password}, "
            f"to={self.to!r})"
        )

    def build_message(self, events: Sequence[AlertEvent], part: Part | None = None) -> EmailMessage:
        """The message for ``events``: plain text and HTML parts, stable Message-ID.

        Within RFC 5322's limits by construction: the subject is clipped
        (:data:`~invoice_watch.notify.render.email.SUBJECT_MAX`), headers are folded at
        78 characters, and a body with a line longer than 78 is sent quoted-printable
        (``email``'s content manager decides), so no line on the wire exceeds 998; a
        grouped message holds at most ``MESSAGE_MAX_EVENTS`` events."""
        message = EmailMessage()
        message["Subject"] = email_subject(events, part)
        message["From"] = self.from_addr
        message["To"] = ", ".join(self.to)
        # The events' time, not the send time: a retried message stays the same message.
        message["Date"] = format_datetime(max(e.at for e in events))
        message["Message-ID"] = group_message_id(events)
        message.set_content(plain.text(events, part))
        message.add_alternative(email_html(events, part), subtype="html")
        return message

    def _tls_context(self) -> ssl.SSLContext:
        """The system CAs, plus ``ca_file`` when set."""
        context = ssl.create_default_context()
        if self.ca_file is not None:
            context.load_verify_locations(cafile=self.ca_file)
        return context

    async def _send(
        self, events: Sequence[AlertEvent], part: Part | None, recipients: Recipients
    ) -> None:
        """Send the message to ``recipients`` (those of ``to`` still owed it; None: all
        of ``to``): see the module docstring for what each recipient's answer does."""
        await self._mail(lambda to: self.build_message(events, part), recipients)

    async def send_report(
        self, msg: ReportMessage, *, recipients: Sequence[str] | None = None
    ) -> None:
        """Send a report (:mod:`invoice_watch.report.outbox`): its HTML with the chart
        inline, and its text; ``recipients`` as for :meth:`send`."""
        await self._mail(
            lambda to: report_email(msg, from_addr=self.from_addr, to=self.to), recipients
        )

    async def _mail(
        self, build: Callable[[list[str]], EmailMessage], recipients: Sequence[str] | None
    ) -> None:
        """Send the message ``build`` makes to ``recipients`` (module docstring)."""
        to = self.to
        if recipients is not None:
            owed = set(recipients)
            to = [address for address in self.to if address in owed]
            if not to:  # `to` changed since: those still owed are no longer recipients
                logger.info(
                    "email notifier %r: the recipients still owed a message (%s) are no "
                    "longer in `to`: nothing left to send",
                    self.name,
                    ", ".join(recipients),
                )
                return
        message = build(to)
        if self.tls == "none":
            context = None
        else:
            try:
                context = self._tls_context()
            except (OSError, ssl.SSLError) as exc:
                raise PermanentNotifyError(
                    f"email notifier {self.name!r}: cannot load ca_file {self.ca_file}: "
                    f"{exc.strerror or exc}; fix the path or the file's contents"
                ) from exc
        try:
            refused, _ = await aiosmtplib.send(
                message,
                recipients=to,
                hostname=self.host,
                port=self.port,
                start_tls=self.tls == "starttls",
                use_tls=self.tls == "implicit",
                tls_context=context,
                username=self.username,
                password=self._password,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:  # every recipient refused
            answers = {r.recipient: (r.code, r.message) for r in exc.recipients}
            error = self._refusals(to, answers)
            raise error or PermanentNotifyError(self._describe(exc)) from exc
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
            raise classify_smtp_error(exc)(self._describe(exc)) from exc
        if refused:  # the others have it: sending it again would duplicate it for them
            answers = {r: (answer.code, answer.message) for r, answer in refused.items()}
            if error := self._refusals(to, answers):
                raise error
        logger.debug("email notifier %r: sent %s", self.name, message["Message-ID"])

    def _refusals(
        self, to: list[str], answers: dict[str, tuple[int, str]]
    ) -> RetryableNotifyError | None:
        """What the refusals of some recipients (``answers``: recipient -> (code,
        reply)) make of the message sent to ``to`` (module docstring): the error to
        raise when some are owed it still, None when it is done (or, every recipient
        refused for good, failed: the caller's error says why)."""
        later = [r for r in to if r in answers and 400 <= answers[r][0] < 500]
        never = [r for r in to if r in answers and r not in later]
        took = len(to) - len(later) - len(never)
        where = f"email notifier {self.name!r} ({self.host}:{self.port}, tls {self.tls})"
        if not later and not took:
            return None
        for recipient in never:
            code, reply = answers[recipient]
            logger.error(
                "%s: %s refused the message for good: %s; it is not sent to that "
                "recipient again, and the others are not held up; check `to`",
                where,
                server_text(recipient, _MESSAGE_MAX),
                server_text(f"{code} {reply}", _MESSAGE_MAX, secrets=self._secrets()),
            )
        if not later:
            return None
        # The same words at every attempt for the same answers: logged once (deliver/telling.py).
        replies = "; ".join(f"{r}: {answers[r][0]} {answers[r][1]}" for r in later)
        text = server_text(
            f"refused for now by {replies}; retried for "
            f"{'those' if len(later) > 1 else 'that'} recipient{'s' * (len(later) > 1)} only",
            _MESSAGE_MAX,
            secrets=self._secrets(),
        )
        # Owed to fewer than all of `to` (others took it, or it was only for them):
        # the outbox remembers whom, and the server works for the others.
        owed = tuple(later) if later != self.to else None
        return RetryableNotifyError(f"{where}: {text}", owed=owed)

    def _describe(self, exc: BaseException) -> str:
        """What went wrong and what to do about it, without the password."""
        where = f"email notifier {self.name!r} ({self.host}:{self.port}, tls {self.tls})"
        tls_error = _ssl_error(exc)
        if tls_error is not None:
            what = f"TLS failed: {tls_error.reason or tls_error}"
            hint = "check `tls` (starttls/implicit/none), `port` and `ca_file`"
        elif isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            what = f"login refused: {exc.code} {exc.message}"
            hint = "check `username` and `password`"
        elif isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            what = "all recipients refused: " + "; ".join(
                f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients
            )
            hint = "check `to`"
        elif isinstance(exc, aiosmtplib.SMTPResponseException):
            what = f"server replied {exc.code} {exc.message}"
            hint = "" if 400 <= exc.code < 500 else "the server refused the message"
        elif isinstance(exc, aiosmtplib.SMTPConnectError | ConnectionError):
            what = f"cannot connect: {exc}"
            hint = "is the server up, and are `host` and `port` right?"
        elif isinstance(exc, TimeoutError):
            what = "timed out"
            hint = "the server is slow or unreachable"
        else:
            what = str(exc) or type(exc).__name__
            hint = ""
        text = server_text(f"{what}; {hint}".rstrip("; "), _MESSAGE_MAX, secrets=self._secrets())
        return f"{where}: {text}"

    def _secrets(self) -> list[str]:
        """The password: :func:`~invoice_watch.redact.redact` removes its base64 forms
        too, alone (AUTH LOGIN) or within another (AUTH PLAIN), which a server may echo."""
        return [self._password] if self._password else []
