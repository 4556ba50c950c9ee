"""The email notifier against aiosmtpd, a real SMTP server on 127.0.0.1 (port 0): plain,
STARTTLS with AUTH and implicit TLS with a trustme CA, the message's parts and headers,
the retry-or-give-up table, and the password kept out of errors and logs."""

from __future__ import annotations

import logging
import socket
import ssl
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from invoice_watch.config import Config
from invoice_watch.errors import NotifyError, PermanentNotifyError, RetryableNotifyError
from invoice_watch.notify import build_notifiers
from invoice_watch.notify.email import EmailNotifier, TlsMode, classify_smtp_error, group_message_id
from invoice_watch.notify.render import plain
from invoice_watch.notify.render.email import email_html
from tests.fakes_smtp import Sink, StartServer
from tests.test_notify_render import grouped_events, pending_event, resolved_failed_event

USERNAME = "alerts@example.com"
PASSWORD = "s3cret-Smtp-Passw0rd"
FROM = "invoice-watch <alerts@example.com>"
TO = ["oncall@example.com", "finance@example.com"]


class PickySink(Sink):
    """Refuses the recipients in ``refused`` at RCPT time."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refused:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def check_password(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


class Pki:
    """A CA the notifier trusts (through ``ca_file``) and a certificate for 127.0.0.1."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_context = self.context_for(self.ca)

    @staticmethod
    def context_for(ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def notifier(
    port: int,
    tls: TlsMode = "none",
    *,
    ca_file: Path | None = None,
    username: str | None = None,
    password: str | None = None,
) -> EmailNotifier:
    return EmailNotifier(
        "mail",
        host="127.0.0.1",
        port=port,
        tls=tls,
        ca_file=ca_file,
        username=username,
        password=password,
        from_addr=FROM,
        to=TO,
        timeout=10,
    )


def starttls_server_options(pki: Pki) -> dict[str, Any]:
    return {
        "tls_context": pki.server_context,
        "require_starttls": True,
        "auth_required": True,
        "auth_require_tls": True,
        "authenticator": check_password,
    }


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the decision table --------------------------------------------------------------


def _wrapped(cause: BaseException) -> aiosmtplib.SMTPConnectError:
    """What aiosmtplib raises when the connection itself fails (cause chained)."""
    try:
        raise aiosmtplib.SMTPConnectError("Error connecting to 127.0.0.1 on port 465") from cause
    except aiosmtplib.SMTPConnectError as exc:
        return exc


def _refused(*codes: int) -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(code, "no", f"r{code}@x") for code in codes]
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiosmtplib.SMTPResponseException(421, "closing"), RetryableNotifyError),
        (aiosmtplib.SMTPDataError(451, "try later"), RetryableNotifyError),
        (aiosmtplib.SMTPDataError(452, "storage"), RetryableNotifyError),
        (aiosmtplib.SMTPSenderRefused(450, "busy", "a@x"), RetryableNotifyError),
        (aiosmtplib.SMTPAuthenticationError(454, "temporary auth failure"), RetryableNotifyError),
        (aiosmtplib.SMTPConnectResponseError(421, "too many"), RetryableNotifyError),
        (_refused(450, 451), RetryableNotifyError),
        (aiosmtplib.SMTPDataError(550, "rejected"), PermanentNotifyError),
        (aiosmtplib.SMTPDataError(554, "spam"), PermanentNotifyError),
        (aiosmtplib.SMTPSenderRefused(553, "not yours", "a@x"), PermanentNotifyError),
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), PermanentNotifyError),
        (aiosmtplib.SMTPAuthenticationError(530, "auth required"), PermanentNotifyError),
        (aiosmtplib.SMTPHeloError(501, "bad helo"), PermanentNotifyError),
        (aiosmtplib.SMTPConnectResponseError(554, "go away"), PermanentNotifyError),
        (_refused(550, 451), RetryableNotifyError),  # the 451 one is worth retrying
        (_refused(550, 553), PermanentNotifyError),
        (_refused(), PermanentNotifyError),
        (aiosmtplib.SMTPConnectError("refused"), RetryableNotifyError),
        (_wrapped(ConnectionRefusedError(111, "refused")), RetryableNotifyError),
        (aiosmtplib.SMTPServerDisconnected("lost"), RetryableNotifyError),
        (aiosmtplib.SMTPConnectTimeoutError("slow"), RetryableNotifyError),
        (aiosmtplib.SMTPReadTimeoutError("slow"), RetryableNotifyError),
        (TimeoutError(), RetryableNotifyError),
        (ConnectionResetError(), RetryableNotifyError),
        (OSError(101, "network unreachable"), RetryableNotifyError),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), PermanentNotifyError),
        (_wrapped(ssl.SSLCertVerificationError(1, "verify failed")), PermanentNotifyError),
        (ssl.SSLError(1, "wrong version number"), PermanentNotifyError),
        (ssl.SSLEOFError(8, "EOF in violation of protocol"), RetryableNotifyError),
        (aiosmtplib.SMTPException("STARTTLS extension not supported"), PermanentNotifyError),
        (aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported"), PermanentNotifyError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_classify_smtp_error_table(exc: BaseException, expected: type[NotifyError]) -> None:
    assert classify_smtp_error(exc) is expected


# --- delivery ------------------------------------------------------------------------


async def test_send_plain_delivers_text_and_html_parts(smtp_server: StartServer) -> None:
    sink = Sink()
    events = [pending_event()]
    await notifier(await smtp_server(sink)).send(events)
    [envelope] = sink.envelopes
    assert envelope.mail_from == "alerts@example.com"
    assert envelope.rcpt_tos == TO
    message = sink.message()
    assert message["Subject"] == "[invoice-watch] FIRING pending-over-budget: Production $6,000.00"
    assert message["From"] == FROM
    assert message["To"] == ", ".join(TO)
    assert message["Date"] == "Sun, 15 Nov 2026 12:00:00 +0000"
    assert message["Message-ID"] == events[0].message_id
    plain_part = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain_part is not None and html is not None
    # SMTP carries CRLF line ends.
    assert plain_part.get_content().replace("\r\n", "\n") == plain.text(events)
    assert html.get_content().replace("\r\n", "\n") == email_html(events)


async def test_send_starttls_with_auth(smtp_server: StartServer, pki: Pki) -> None:
    sink = Sink()
    port = await smtp_server(sink, **starttls_server_options(pki))
    mailer = notifier(port, "starttls", ca_file=pki.ca_file, username=USERNAME, password=PASSWORD)
    await mailer.send([resolved_failed_event()])
    [session] = sink.sessions
    assert session.authenticated
    assert session.ssl is not None  # the message went over TLS
    assert sink.message()["Subject"].startswith("[invoice-watch] RESOLVED failed-charge")


async def test_send_implicit_tls(smtp_server: StartServer, pki: Pki) -> None:
    sink = Sink()
    port = await smtp_server(sink, implicit_tls=pki.server_context)
    await notifier(port, "implicit", ca_file=pki.ca_file).send(grouped_events())
    assert sink.message()["Subject"] == "[invoice-watch] 12 alerts: 9 FIRING, 3 RESOLVED"


async def test_send_grouped_message_id_is_stable(smtp_server: StartServer) -> None:
    sink = Sink()
    mailer = notifier(await smtp_server(sink))
    events = grouped_events()
    await mailer.send(events)
    await mailer.send(list(reversed(events)))
    first, second = sink.message(0)["Message-ID"], sink.message(1)["Message-ID"]
    assert first == second == group_message_id(events)
    assert first != group_message_id(events[:-1])
    assert first.startswith("<group-") and first.endswith("@invoice-watch>")


def test_build_message_single_event_id_is_the_events() -> None:
    event = pending_event()
    mailer = notifier(25)
    assert mailer.build_message([event])["Message-ID"] == event.message_id
    assert mailer.build_message([event])["Message-ID"] == event.message_id


# --- failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("451 4.3.0 Mail server temporarily rejected message", RetryableNotifyError),
        ("550 5.7.1 Message rejected as spam", PermanentNotifyError),
    ],
)
async def test_send_server_reply_decides(
    smtp_server: StartServer, reply: str, expected: type[NotifyError]
) -> None:
    port = await smtp_server(Sink(reply))
    with pytest.raises(expected) as info:
        await notifier(port).send([pending_event()])
    assert type(info.value) is expected
    assert f"server replied {reply[:3]}" in str(info.value)


async def test_send_some_recipients_refused_is_delivered_and_logged(
    smtp_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    sink = PickySink({"finance@example.com"})
    await notifier(await smtp_server(sink)).send([pending_event()])
    assert sink.envelopes[0].rcpt_tos == ["oncall@example.com"]
    [record] = [
        r
        for r in caplog.records
        if r.name == "invoice_watch.notify.email" and r.levelno >= logging.WARNING
    ]
    assert record.levelno == logging.ERROR
    assert "finance@example.com refused the message for good: 550 5.1.1" in record.getMessage()


class GreySink(PickySink):
    """Refuses ``grey`` for now (450) while it is set, and the ``refused`` for good."""

    def __init__(self, grey: str | None, refused: set[str] = set()) -> None:  # noqa: B006
        super().__init__(refused)
        self.grey = grey

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address == self.grey:
            return "450 4.2.0 greylisted, try again later"
        return await super().handle_RCPT(server, session, envelope, address, options)


async def test_send_a_recipient_refused_for_now_is_owed_the_message_alone(
    smtp_server: StartServer,
) -> None:
    """NEW-2: a 450 for one recipient while the other took the message: retryable, for
    that recipient only (``owed``); sent again with ``recipients``, only it is asked."""
    sink = GreySink("finance@example.com")
    mailer = notifier(await smtp_server(sink))
    with pytest.raises(RetryableNotifyError) as info:
        await mailer.send([pending_event()])
    assert info.value.owed == ("finance@example.com",)
    assert "refused for now by finance@example.com: 450 4.2.0 greylisted" in str(info.value)
    assert [e.rcpt_tos for e in sink.envelopes] == [["oncall@example.com"]]
    sink.grey = None
    await mailer.send([pending_event()], recipients=info.value.owed)
    assert [e.rcpt_tos for e in sink.envelopes] == [["oncall@example.com"], ["finance@example.com"]]
    assert sink.message()["To"] == ", ".join(TO)  # the same message, to the same list


async def test_send_every_recipient_refused_for_now_is_the_whole_attempts_failure(
    smtp_server: StartServer,
) -> None:
    """Every recipient of `to` refused for now: no recipient's alone (``owed`` None),
    so the outbox holds the notifier's queue as for a server down; a retry for some
    recipients only, refused again, is still theirs alone."""
    sink = GreySink("finance@example.com")
    mailer = notifier(await smtp_server(sink))
    mailer.to = ["finance@example.com"]
    with pytest.raises(RetryableNotifyError) as info:
        await mailer.send([pending_event()])
    assert info.value.owed is None
    mailer.to = TO
    with pytest.raises(RetryableNotifyError) as info:
        await mailer.send([pending_event()], recipients=["finance@example.com"])
    assert info.value.owed == ("finance@example.com",)
    assert sink.envelopes == []


async def test_send_refused_for_now_and_for_good_retries_the_one_for_now(
    smtp_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """NEW-2: one 450 and one 550, no recipient took it: not failed for good, but
    retried for the 450 one; the 550 one is logged with the server's reply."""
    sink = GreySink("finance@example.com", {"oncall@example.com"})
    with pytest.raises(RetryableNotifyError) as info:
        await notifier(await smtp_server(sink)).send([pending_event()])
    assert info.value.owed == ("finance@example.com",)
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "oncall@example.com refused the message for good: 550 5.1.1 No such user" in error


async def test_send_owed_recipients_no_longer_in_to_are_not_sent_to(
    smtp_server: StartServer,
) -> None:
    sink = Sink()
    await notifier(await smtp_server(sink)).send([pending_event()], recipients=["gone@x.org"])
    assert sink.envelopes == []


async def test_send_all_recipients_refused_is_permanent(smtp_server: StartServer) -> None:
    port = await smtp_server(PickySink(set(TO)))
    with pytest.raises(PermanentNotifyError, match=r"all recipients refused: .*check `to`"):
        await notifier(port).send([pending_event()])


async def test_send_wrong_password_is_permanent(
    smtp_server: StartServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = await smtp_server(Sink(), **starttls_server_options(pki))
    wrong = "Wr0ng-" + PASSWORD
    mailer = notifier(port, "starttls", ca_file=pki.ca_file, username=USERNAME, password=wrong)
    with pytest.raises(PermanentNotifyError) as info:
        await mailer.send([pending_event()])
    assert "login refused: 535" in str(info.value)
    assert "check `username` and `password`" in str(info.value)
    said = [r.getMessage() for r in caplog.records]
    said += ["".join(traceback.format_exception(info.value)), repr(mailer)]
    assert not [text for text in said if wrong in text or PASSWORD in text]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_send_untrusted_certificate_is_permanent(
    smtp_server: StartServer, pki: Pki, tls: TlsMode
) -> None:
    stranger = Pki.context_for(trustme.CA())  # signed by a CA nobody trusts
    if tls == "implicit":
        port = await smtp_server(Sink(), implicit_tls=stranger)
    else:
        port = await smtp_server(Sink(), tls_context=stranger, require_starttls=True)
    with pytest.raises(PermanentNotifyError, match="TLS failed: CERTIFICATE_VERIFY_FAILED"):
        await notifier(port, tls, ca_file=pki.ca_file).send([pending_event()])


async def test_send_starttls_not_offered_is_permanent(smtp_server: StartServer) -> None:
    port = await smtp_server(Sink())  # no tls_context: no STARTTLS
    with pytest.raises(PermanentNotifyError, match="STARTTLS extension not supported"):
        await notifier(port, "starttls").send([pending_event()])


async def test_send_missing_ca_file_is_permanent(smtp_server: StartServer, tmp_path: Path) -> None:
    port = await smtp_server(Sink())
    mailer = notifier(port, "starttls", ca_file=tmp_path / "missing.pem")
    with pytest.raises(PermanentNotifyError, match=r"cannot load ca_file .*missing\.pem"):
        await mailer.send([pending_event()])


async def test_send_connection_refused_is_retryable(closed_port: int) -> None:
    with pytest.raises(RetryableNotifyError, match="cannot connect"):
        await notifier(closed_port, password=PASSWORD, username=USERNAME).send([pending_event()])


def test_repr_hides_password() -> None:
    mailer = notifier(25, username=USERNAME, password=PASSWORD)
    assert PASSWORD not in repr(mailer)
    assert "password=<secret>" in repr(mailer)


async def test_build_notifiers_email_from_config_delivers(
    smtp_server: StartServer, pki: Pki, config_factory: Callable[..., Config]
) -> None:
    sink = Sink()
    port = await smtp_server(sink, **starttls_server_options(pki))
    config = config_factory(
        notifiers={
            "console": {"type": "console"},
            "mail": {
                "type": "email",
                "host": "127.0.0.1",
                "port": port,
                "ca_file": str(pki.ca_file),
                "username": USERNAME,
                "password": PASSWORD,
                "from": FROM,
                "to": TO,
            },
        }
    )
    mailer = build_notifiers(config.notifiers)["mail"]
    assert isinstance(mailer, EmailNotifier)
    assert (mailer.tls, mailer.timeout) == ("starttls", 30.0)
    await mailer.send([pending_event()])
    assert sink.sessions[0].authenticated
